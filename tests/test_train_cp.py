"""train.py with context parallelism: cp ranks split one sample's latent frames; cp=2 must train like cp=1.

End to end through `python train.py --config demo` (gloo processes, fp32, the demo DiT on 3 tiny synthetic
clips of 5 cameras). The reference is one process with batch 2; the same two samples per step are then
trained by 2 processes with cp=2 (dp=1, batch 2) and by 4 processes with dp=2 x cp=2 (batch 1 per group).
Loss sequence, gradient norms and the final weights (and EMA) must agree to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import train
from _dist import free_port, run_gloo
from model import VAE_PRESETS, WanVAE, build_dit
from test_train import synthetic_data

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("synthetic"), num_frames=9)


def overrides(data_dir, out, **extra):
    """The demo preset shrunk to 3 steps on data_dir: 5 frames = 2 latent frames per view, 4x6 latents."""
    args = dict(dataset_dir=str(data_dir), output_root=str(out), height=32, width=48, num_frames=5, num_workers=0,
                synthetic_clips=0, t5_dir="", sample_every=0, log_every=1, max_iter=3, save_every=3)
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def launch_group(args, world):
    """`python train.py --config demo ARGS` as `world` gloo ranks (plain single process for world=1)."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", "demo", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs):
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


def run_dir(out):
    return Path(out) / "posttraining" / "demo" / "demo_cpu"


def log_of(out):
    return [json.loads(line) for line in (run_dir(out) / "log.jsonl").read_text().splitlines()]


def model_file(out, it):
    return torch.load(run_dir(out) / "checkpoints" / "model" / f"iter_{it:09d}.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------


def test_cp_settings_are_checked():
    assert train.resolve_config("demo", ["num_frames=5", "cp=2"])["cp"] == 2  # 2 latent frames per view
    assert train.resolve_config("waymo5views", ["cp=8"])["cp"] == 8  # 29 frames = 8 latent frames
    with pytest.raises(ValueError, match=r"3 latent frames per view .*choose cp in \[1, 3\]"):
        train.resolve_config("demo", ["cp=2"])  # the demo's 9 frames are 3 latent frames
    with pytest.raises(ValueError, match="cp=0"):
        train.resolve_config("demo", ["cp=0"])
    config = train.resolve_config("demo", ["num_frames=5", "cp=2", "output_root=/nonexistent/never/written"])
    with pytest.raises(ValueError, match="cp=2 does not divide the 1 ranks"):
        train.train(config)  # one process cannot form a cp=2 group: refused before anything is written
    assert not os.path.exists("/nonexistent/never")


def _encode_worker(rank, world, path):
    torch.manual_seed(0)
    vae = WanVAE(**VAE_PRESETS["tiny"]).eval()
    g = torch.Generator().manual_seed(1)
    out = {}
    for V, per_call in ((5, 2), (1, 1)):  # 5 views: 3 + 2 per rank, in calls of 2; 1 view: rank 1 idle
        batch = dict(video=torch.randint(0, 256, (2, V, 5, 3, 16, 24), generator=g, dtype=torch.uint8))
        out[V] = dict(cp=train.encode_batch(vae, batch, "cpu", per_call, group=dist.group.WORLD),
                      one=train.encode_batch(vae, batch, "cpu", V))  # the single-rank path, all views at once
    torch.save(out, f"{path}.{rank}")


def test_vae_views_are_spread_over_the_cp_group_and_gathered(tmp_path):
    run_gloo(_encode_worker, 2, str(tmp_path / "z"))
    for rank in range(2):
        res = torch.load(tmp_path / f"z.{rank}", weights_only=True)
        for V, z in res.items():
            assert z["cp"].shape == z["one"].shape == (2, 16, V * 2, 2, 3)
            assert torch.allclose(z["cp"], z["one"], rtol=1e-5, atol=1e-6), (rank, V)
            assert z["one"].abs().sum() > 0


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, batch 2: (log, final model file)."""
    out = tmp_path_factory.mktemp("ref")
    finish(launch_group(overrides(data_dir, out, batch_size=2), world=1))
    model = model_file(out, 3)
    with torch.random.fork_rng():  # the demo's seeded scratch init: the weights must have moved past the tolerance
        torch.manual_seed(0)
        init = build_dit("demo", dtype=torch.float32).state_dict()
    moved = [k for k, v in init.items() if not torch.allclose(model[f"net.{k}"], v, rtol=1e-4, atol=1e-5)]
    assert len(moved) > 0.9 * len(init)
    return log_of(out), model


def assert_same_training(out, reference):
    want, want_model = reference
    got = log_of(out)
    assert [r["iter"] for r in got] == [1, 2, 3]
    assert np.allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=0)
    assert np.allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-4, atol=0)
    model = model_file(out, 3)
    assert model.keys() == want_model.keys()
    for k, v in want_model.items():  # net.* and net_ema.*
        assert torch.allclose(model[k], v, rtol=1e-5, atol=1e-6), k


def test_cp2_trains_like_one_process(data_dir, tmp_path, reference):
    # Activation checkpointing on here (the reference has none): the ring is recomputed in backward.
    out = finish(launch_group(overrides(data_dir, tmp_path, batch_size=2, cp=2,
                                        activation_checkpointing="save_attention"), world=2))
    assert "2 rank(s) = 1 data-parallel x cp 2" in out and "global batch 2" in out
    assert_same_training(tmp_path, reference)


def test_dp2_x_cp2_trains_like_one_process_with_the_doubled_batch(data_dir, tmp_path, reference):
    out = finish(launch_group(overrides(data_dir, tmp_path, batch_size=1, cp=2), world=4))
    assert "4 rank(s) = 2 data-parallel x cp 2" in out and "global batch 2" in out
    assert_same_training(tmp_path, reference)
