"""train.py: config, data set, sampler, checkpoints, parallel equivalence, exact resume, the demo path.

The training runs use the demo model on a tiny synthetic set (3 clips of 13 frames, 32x48, 5 cameras)
and go through train.train() / `python train.py` end to end.
"""

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import embed
from _dist import free_port
import prepare
import train
from model import build_dit

REPO = Path(__file__).resolve().parent.parent
CAMS = train.WAYMO_CAMERAS


def synthetic_data(root, num_frames):
    """3 synthetic clips (32x48, 5 cameras) with random 64-d front-camera caption embeddings."""
    names = prepare.write_synthetic_dataset(str(root), 3, num_frames=num_frames, height=32, width=48, seed=0)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        embed.save_embedding(root / "t5_xxl" / "pinhole_front" / f"{name}.pickle", rng.standard_normal((5 + i, 64)))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("synthetic"), num_frames=13)


def small(data_dir, out, **extra):
    """Overrides of the demo preset for a tiny, fast run on data_dir."""
    args = dict(dataset_dir=str(data_dir), output_root=str(out), height=32, width=48, num_frames=5, batch_size=1,
                num_workers=0, synthetic_clips=0, t5_dir="", sample_every=0, log_every=1, max_iter=4, save_every=4)
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run_dir(out):
    return Path(out) / "posttraining" / "demo" / "demo_cpu"


def launch(args, rank=None, world=None, port=None):
    """`python train.py --config demo ARGS` as a subprocess (optionally one rank of a gloo group)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", "demo", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, expect=0):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, out[-3000:]
    return out


def log_of(out):
    return [json.loads(line) for line in (run_dir(out) / "log.jsonl").read_text().splitlines()]


def model_file(out, it):
    return torch.load(run_dir(out) / "checkpoints" / "model" / f"iter_{it:09d}.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------
# config


def test_presets_resolve_and_overrides_are_type_checked():
    for name in train.PRESETS:
        train.resolve_config(name)
    c = train.resolve_config("waymo5views", ["lr=1", "max_iter=10", "init=''", "name=x y", "adam_betas=[0.9, 0.95]",
                                             "sample_guidance=[7]", "adjust_video_noise=False"])
    assert c["lr"] == 1.0 and isinstance(c["lr"], float) and c["max_iter"] == 10 and c["init"] == ""
    assert c["name"] == "x y" and c["adam_betas"] == (0.9, 0.95) and c["adjust_video_noise"] is False
    assert (c["height"], c["width"], c["num_frames"]) == (704, 1280, 29)
    assert train.resolve_config("waymo5views_480p")["width"] == 848
    lora = train.resolve_config("waymo5views_lora")
    assert (lora["lora_rank"], lora["lora_alpha"]) == (16, 16)
    for override, message in (("max_iters=5", "did you mean max_iter"), ("max_iter=2.5", "expected int"),
                              ("adjust_video_noise=1", "expected bool"), ("batch_size=True", "expected int"),
                              ("max_iter", "not key=value"), ("cp=2", "context parallelism"),
                              ("num_frames=8", "1 \\+ 4k"), ("sample_guidance=['a']", "expected list"),
                              ("adam_betas=[0.9]", "two values"), ("warmup_iters=300", "warmup_iters < decay"),
                              ("sample_conditional_frames=3", "0, 1 or 2"), ("lora_rank=-1", "lora_rank"),
                              (f"camera_to_view_id={dict(train.DEFAULTS['camera_to_view_id'], pinhole_front=9)}",
                               "must be 0..6")):
        with pytest.raises(ValueError, match=message):
            train.resolve_config("demo", [override])
    with pytest.raises(ValueError, match="unknown config"):
        train.resolve_config("waymo")


# ------------------------------------------------------------------------------------------------
# data


def test_dataset_windows_views_captions_and_split(data_dir):
    clips = train.index_dataset(data_dir, CAMS, "pinhole_front", num_frames=5)
    names = sorted(p.stem for p in (data_dir / "videos" / CAMS[0]).glob("*.mp4"))
    assert [c["clip"] for c in clips] == names[:2]  # int(0.1 * 3) + 1 = 1 clip held out
    val = train.index_dataset(data_dir, CAMS, "pinhole_front", num_frames=5, split="val")
    assert [c["clip"] for c in val] == names[2:]
    ds = train.MultiviewDataset(clips, CAMS, train.WAYMO_VIEW_IDS, "pinhole_front", 5, 32, 48)
    assert len(ds) == 2 * (13 - 5 + 1)  # every start frame
    s = ds[9 + 3]  # clip 1, start frame 3
    assert (s["clip"], s["start_frame"], s["fps"]) == (names[1], 3, 10.0)
    assert s["video"].dtype == torch.uint8 and s["video"].shape == (5, 5, 3, 32, 48)
    for v, cam in enumerate(CAMS):  # camera order and frame window: compare with a plain full decode
        frames = np.stack(imageio.mimread(data_dir / "videos" / cam / f"{names[1]}.mp4"))[3:8]
        assert torch.equal(s["video"][v], torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert s["view_ids"].tolist() == [4, 5, 0, 1, 2]
    ctx = s["t5_text_embeddings"].view(5, 512, 64)
    caption = embed.load_embedding(data_dir / "t5_xxl" / "pinhole_front" / f"{names[1]}.pickle")
    assert torch.equal(ctx[2, :6], torch.from_numpy(caption)) and not ctx[2, 6:].any()
    assert not ctx[[0, 1, 3, 4]].any()


def test_resize_stretches_and_truncates():
    frames = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    out = train.resize_frames(frames, 8, 16)
    ref = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255, size=(8, 16),
                                          mode="bilinear", antialias=True)
    ref = (ref * 255).clamp(0, 255).floor()  # truncation, not rounding
    assert out.shape == (2, 3, 8, 16) and out.dtype == torch.uint8
    assert (out.double() - ref).abs().max() <= 1 and (out.double() == ref).float().mean() > 0.95
    assert torch.equal(train.resize_frames(frames, 20, 30), torch.from_numpy(frames).permute(0, 3, 1, 2))


def _copy_clip(src_root, src, dst_root, dst):
    for cam in CAMS:
        (dst_root / "videos" / cam).mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / "videos" / cam / f"{src}.mp4", dst_root / "videos" / cam / f"{dst}.mp4")
    emb = dst_root / "t5_xxl" / "pinhole_front"
    emb.mkdir(parents=True, exist_ok=True)
    shutil.copy(src_root / "t5_xxl" / "pinhole_front" / f"{src}.pickle", emb / f"{dst}.pickle")


def test_broken_clips_are_reported_once_by_name_and_skipped(data_dir, tmp_path, capsys):
    src = sorted(p.stem for p in (data_dir / "videos" / CAMS[0]).glob("*.mp4"))[0]
    root = tmp_path / "ds"
    for name in ("a_good", "b_garbage", "c_noembedding", "d_short", "e_good", "f_val"):
        _copy_clip(data_dir, src, root, name)
    (root / "videos" / "pinhole_side_right" / "b_garbage.mp4").write_bytes(b"not a video")
    (root / "t5_xxl" / "pinhole_front" / "c_noembedding.pickle").unlink()
    with imageio.get_writer(root / "videos" / "pinhole_front_left" / "d_short.mp4", fps=10) as w:
        for _ in range(3):
            w.append_data(np.zeros((32, 48, 3), np.uint8))
    clips = train.index_dataset(root, CAMS, "pinhole_front", num_frames=5)
    err = capsys.readouterr().err
    assert [c["clip"] for c in clips] == ["a_good", "e_good"]
    for name, why in (("b_garbage", "unreadable"), ("c_noembedding", "no T5 embedding"), ("d_short", "3 frames")):
        lines = [ln for ln in err.splitlines() if name in ln]
        assert len(lines) == 1 and why in lines[0], err

    # A clip that breaks after indexing: its samples map to the next clip's first window, one warning.
    ds = train.MultiviewDataset(clips, CAMS, train.WAYMO_VIEW_IDS, "pinhole_front", 5, 32, 48)
    (root / "videos" / "pinhole_front" / "a_good.mp4").write_bytes(b"broken now")
    first, second = ds[0], ds[4]
    assert first["clip"] == second["clip"] == "e_good" and first["start_frame"] == second["start_frame"] == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "a_good" in warnings[0] and "unreadable video" in warnings[0], warnings
    assert ds[9 + 2]["start_frame"] == 2  # the good clip's own samples are unaffected


def test_sampler_is_distributed_sampler_order_and_resumes_mid_epoch():
    n, world, batch = 7, 2, 2
    for rank in range(world):
        ours = train.ResumableSampler(n, rank, world, batch, seed=0)
        ref = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
        stream, it = iter(ours), []
        for epoch in range(3):
            ref.set_epoch(epoch)
            want = list(ref)[:ours.batches_per_epoch * batch]  # the loader drops the last partial batch
            it += want
            assert [next(stream) for _ in want] == want
        for start in (1, 2, 3):  # resuming at iteration `start` continues the same stream
            resumed = iter(train.ResumableSampler(n, rank, world, batch, seed=0, start_iter=start))
            assert [next(resumed) for _ in range(len(it) - start * batch)] == it[start * batch:]


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_interrupted_checkpoint_write_never_becomes_latest(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    payload = lambda i: {k: {"value": torch.full((3,), float(i))} for k in train.KINDS}  # noqa: E731
    train.write_checkpoint(ckpt, 2, payload(2))
    assert train.latest_checkpoint(ckpt) == 2
    calls = []
    real = train._save_file

    def failing(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        real(obj, path)

    monkeypatch.setattr(train, "_save_file", failing)
    with pytest.raises(OSError, match="injected"):
        train.write_checkpoint(ckpt, 4, payload(4))
    assert train.latest_checkpoint(ckpt) == 2
    assert not list(ckpt.rglob("iter_000000004.pt")) and not list(ckpt.rglob(".*tmp*"))
    assert torch.load(ckpt / "model" / "iter_000000002.pt")["value"][0] == 2


# ------------------------------------------------------------------------------------------------
# model plumbing


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def demo_dit_inputs(seed, V, T=2, H=4, W=6):
    """Inputs of one demo-DiT forward: latent, timesteps, caption embeddings (V x 512), condition mask."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, V * T, H, W, generator=g), torch.rand(1, V * T, generator=g),
            torch.randn(1, V * 512, 64, generator=g), torch.zeros(1, 1, V * T, H, W))


def test_activation_checkpointing_recomputes_all_but_attention_with_identical_gradients():
    grads, attention_calls = {}, {}
    V = 3
    inputs = demo_dit_inputs(1, V)
    for mode in ("none", "full", "save_attention"):
        torch.manual_seed(0)
        net = build_dit("demo", dtype=torch.float32)
        net.skip_empty_text = False
        train.apply_activation_checkpointing(net, mode)
        with CountOps() as ops:
            out = net(*inputs, fps=torch.tensor([10.0]))
            out.square().mean().backward()
        grads[mode] = [p.grad for p in net.parameters()]
        attention_calls[mode] = sum(n for k, n in ops.counts.items() if "attention" in k and "backward" not in k)
    per_pass = len(net.blocks) * (1 + V)  # self-attention and one cross-attention per view, every block
    # save_attention keeps self-attention's outputs; the cheap cross-attentions run again in backward
    assert attention_calls == {"none": per_pass, "full": 2 * per_pass,
                               "save_attention": per_pass + len(net.blocks) * V}
    for mode in ("full", "save_attention"):
        assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[mode]))


def test_saved_linear_blocks_skip_the_recompute_of_their_non_widening_linears():
    """saved_linear_blocks=K: blocks 0..K-1 keep q, k, v, the output projections and the MLP's second layer
    (per view with text: cross q and output), so backward runs those matmuls K times fewer; same gradients."""
    V = 3
    inputs = demo_dit_inputs(3, V, H=16, W=24)  # 576 tokens: more rows than the 128 input features
    mm, grads = {}, {}
    for linear_blocks in (0, 1, 4):
        torch.manual_seed(0)
        net = build_dit("demo", dtype=torch.float32)
        net.skip_empty_text = False  # every view's cross-attention runs
        train.apply_activation_checkpointing(net, "save_attention", saved_linear_blocks=linear_blocks)
        with CountOps() as ops:
            net(*inputs, fps=torch.tensor([10.0])).square().mean().backward()
        mm[linear_blocks] = ops.counts["aten::mm"]
        grads[linear_blocks] = [p.grad for p in net.parameters()]
    kept_per_block = 4 + 1 + 2 * V  # q, k, v, o; fc2; per view cross q and output (k, v widen 64 -> 128)
    assert mm[1] == mm[0] - kept_per_block and mm[4] == mm[0] - 4 * kept_per_block
    for k in (1, 4):
        assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[k])), k
    for overrides, message in ((["saved_linear_blocks=2", "activation_checkpointing=full"], "needs activation"),
                               (["saved_linear_blocks=3", "saved_attention_blocks=2",
                                 "activation_checkpointing=save_attention"], "0 up to the 2 blocks")):
        with pytest.raises(ValueError, match=message):
            train.resolve_config("demo", overrides)


def test_uncheckpointed_blocks_skip_the_recompute_of_the_last_blocks():
    """uncheckpointed_blocks=U: the last U blocks run once (no recompute), same gradients as 'none'."""
    inputs = demo_dit_inputs(2, V=2)
    mm, grads = {}, {}
    for mode, plain in (("none", 0), ("full", 0), ("full", 1), ("full", 4), ("save_attention", 3)):
        torch.manual_seed(0)
        net = build_dit("demo", dtype=torch.float32)
        net.skip_empty_text = False
        train.apply_activation_checkpointing(net, mode, uncheckpointed_blocks=plain)
        with CountOps() as ops:
            net(*inputs, fps=torch.tensor([10.0])).square().mean().backward()
        mm[mode, plain] = ops.counts["aten::mm"] + ops.counts["aten::addmm"]
        grads[mode, plain] = [p.grad for p in net.parameters()]
    L = len(net.blocks)
    per_block = (mm["full", 0] - mm["none", 0]) / L  # the matmuls one recomputed block adds
    assert per_block > 0
    assert mm["full", 1] == mm["none", 0] + (L - 1) * per_block
    assert mm["full", 4] == mm["none", 0]  # all 4 blocks of the demo DiT left alone
    assert mm["save_attention", 3] == mm["none", 0] + per_block  # block 0 checkpointed, 1..3 not
    for key in grads:
        assert all(torch.equal(a, b) for a, b in zip(grads["none", 0], grads[key])), key
    with pytest.raises(ValueError, match="uncheckpointed_blocks=5"):
        train.check_config(train.resolve_config("demo", ["uncheckpointed_blocks=5"]))


def test_bf16_keeps_fp32_master_weights_and_lora_trains_only_adapters(data_dir, tmp_path):
    pytest.importorskip("lora")
    config = train.resolve_config("demo", small(data_dir, tmp_path, max_iter=1, save_every=1, precision="bf16",
                                                lora_rank=4, lora_alpha=4))
    result = train.train(config)
    assert np.isfinite(result["losses"]).all()
    sd = model_file(tmp_path, 1)
    assert all(v.dtype == torch.float32 for v in sd.values())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        init = build_dit("demo", dtype=torch.float32).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in sd.items() if k.startswith("net.") and "lora_" not in k}
    assert base.keys() == {f"net.{k}" for k in init}
    assert all(torch.equal(base[f"net.{k}"], v) for k, v in init.items())  # frozen
    lora_b = [v for k, v in sd.items() if k.startswith("net.") and ".lora_B." in k]
    assert len(lora_b) == 10 * 4 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: trained


# ------------------------------------------------------------------------------------------------
# distributed equivalence and exact resume (subprocesses, like real runs)


def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(data_dir, tmp_path):
    port = free_port()
    procs = [launch(small(data_dir, tmp_path / "two", max_iter=3, save_every=3), rank=r, world=2, port=port)
             for r in range(2)]
    for p in procs:
        finish(p)
    finish(launch(small(data_dir, tmp_path / "one", max_iter=3, save_every=3, batch_size=2)))
    two, one = log_of(tmp_path / "two"), log_of(tmp_path / "one")
    assert np.allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=0)
    assert np.allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-4, atol=0)
    a, b = model_file(tmp_path / "two", 3), model_file(tmp_path / "one", 3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_kill_and_resume_is_bit_exact(data_dir, tmp_path):
    ref = launch(small(data_dir, tmp_path / "ref", max_iter=6, save_every=2))
    args = small(data_dir, tmp_path / "run", max_iter=6, save_every=2)
    ckpt = run_dir(tmp_path / "run") / "checkpoints"
    finish(launch(args + ["debug_kill=save:4"]), expect=-9)  # killed while writing checkpoint 4
    assert train.latest_checkpoint(ckpt) == 2
    assert not (ckpt / "trainer" / "iter_000000004.pt").exists()
    out = finish(launch(args + ["debug_kill=step:5"]), expect=-9)  # resumes at 2, saves 4, killed after 5
    assert "resuming from" in out and "iter_000000002" in out
    assert train.latest_checkpoint(ckpt) == 4
    out = finish(launch(args))  # resumes at 4, finishes
    assert "iter_000000004" in out
    finish(ref)
    run, want = log_of(tmp_path / "run"), log_of(tmp_path / "ref")
    assert [r["iter"] for r in run] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in run] == [r["loss"] for r in want]
    assert [r["grad_norm"] for r in run] == [r["grad_norm"] for r in want]
    a, b = model_file(tmp_path / "run", 6), model_file(tmp_path / "ref", 6)
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()
    opt = lambda out: torch.load(run_dir(out) / "checkpoints" / "optim" / "iter_000000006.pt")["state"]  # noqa
    oa, ob = opt(tmp_path / "run"), opt(tmp_path / "ref")
    assert all(torch.equal(oa[p][s], ob[p][s]) for p in ob for s in ob[p])


def test_demo_command_prepares_embeds_trains_and_samples(tmp_path):
    """The demo path on a reduced scale: synthetic clips, tiny T5, embeddings, training, sample mp4s."""
    args = [f"dataset_dir={tmp_path / 'synthetic'}", f"t5_dir={tmp_path / 't5'}", f"output_root={tmp_path / 'out'}",
            "synthetic_clips=2", "synthetic_frames=9", "height=32", "width=48", "num_frames=5", "max_iter=3",
            "save_every=3", "sample_every=3", "sample_steps=2", "sample_guidance=[2.0]", "log_every=1"]
    out = finish(launch(args))
    assert (tmp_path / "t5" / "config.json").exists()
    assert len(list((tmp_path / "synthetic" / "t5_xxl" / "pinhole_front").glob("*.pickle"))) == 2
    assert len(log_of(tmp_path / "out")) == 3 and "done at iteration 3" in out
    if train._sample_module() is not None:
        mp4s = sorted(p.name for p in (run_dir(tmp_path / "out") / "samples").glob("*.mp4"))
        assert mp4s == ["iter_000000003_ema_guidance2.mp4", "iter_000000003_reg_guidance2.mp4"]


def test_resume_applies_changed_optimizer_settings_and_never_repeats_log_lines(data_dir, tmp_path):
    """lr / weight decay given on a resume take effect (the schedule keeps its place); a run killed before
    its first checkpoint leaves no log lines for the restart to repeat."""
    ref = finish(launch(small(data_dir, tmp_path / "ref", max_iter=4, save_every=2)))
    args = small(data_dir, tmp_path / "run", max_iter=4, save_every=2)
    finish(launch(args[:-1] + ["save_every=0", "debug_kill=step:1"]), expect=-9)  # logged 1, no checkpoint
    finish(launch(args + ["max_iter=2"]))
    out = finish(launch(args + ["lr=0.004", "weight_decay=0.25"]))
    assert "in effect from here" in out and "'lr': (0.001, 0.004)" in out and ref
    run, want = log_of(tmp_path / "run"), log_of(tmp_path / "ref")
    assert [r["iter"] for r in run] == [1, 2, 3, 4]
    assert [r["lr"] for r in run[:2]] == [r["lr"] for r in want[:2]]
    assert [r["lr"] for r in run[2:]] == pytest.approx([4 * r["lr"] for r in want[2:]], rel=1e-12)
    groups = torch.load(run_dir(tmp_path / "run") / "checkpoints" / "optim" / "iter_000000004.pt")["param_groups"]
    assert {(g["weight_decay"], g["initial_lr"]) for g in groups} == {(0.25, 0.004)}


def test_resume_trims_the_log_and_survives_a_line_cut_short(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "loss": 1.2}\n{"iter": 4, "lo')
    train.trim_log(log, 2)
    assert [json.loads(ln)["iter"] for ln in log.read_text().splitlines()] == [1, 2]


def test_caption_embeddings_of_the_wrong_width_are_named(data_dir, tmp_path):
    """A clip embedded with another T5 fails up front with its file named, not deep inside k_proj."""
    src = sorted(p.stem for p in (data_dir / "videos" / CAMS[0]).glob("*.mp4"))[0]
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        _copy_clip(data_dir, src, root, name)
    embed.save_embedding(root / "t5_xxl" / "pinhole_front" / "b.pickle", np.ones((4, 32)))
    config = train.resolve_config("demo", small(root, tmp_path / "out"))
    with pytest.raises(ValueError, match=r"b\.pickle \(32-d\)"):
        train.train(config)


def test_offload_all_steps_in_the_background_with_the_same_numbers(data_dir, tmp_path, monkeypatch):
    """offload=all (CPU AdamW on a background thread, overlapping the next VAE encode) trains like offload=none.

    Every step's optimizer work is checked to run on the background thread and to be finished before the
    next forward reads the weights, a checkpoint is written or training returns.
    """
    threads, order = [], []
    step = torch.optim.AdamW.step

    def spy_step(self, *a, **k):
        threads.append(__import__("threading").current_thread().name)
        order.append("step")
        return step(self, *a, **k)

    forward = train.diffusion_loss

    def spy_forward(*a, **k):
        order.append("forward")
        return forward(*a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    monkeypatch.setattr(train, "diffusion_loss", spy_forward)
    runs = {}
    for offload in ("none", "all"):
        threads.clear(), order.clear()
        out = tmp_path / offload
        train.train(train.resolve_config("demo", small(data_dir, out, max_iter=4, save_every=2, offload=offload)))
        runs[offload] = (log_of(out), model_file(out, 4), list(threads), list(order))
    (log_n, sd_n, thr_n, ord_n), (log_a, sd_a, thr_a, ord_a) = runs["none"], runs["all"]
    assert ord_n == ord_a == ["forward", "step"] * 4  # each step done before the next forward
    assert all(t.startswith("optimizer-step") for t in thr_a) and not any(t.startswith("optimizer") for t in thr_n)
    for key in ("loss", "grad_norm", "lr"):
        assert np.allclose([r[key] for r in log_a], [r[key] for r in log_n], rtol=1e-5, atol=0), key
    assert sd_a.keys() == sd_n.keys()
    for k in sd_n:  # the weights and the EMA of the last checkpoint
        assert torch.allclose(sd_a[k], sd_n[k], rtol=1e-5, atol=1e-6), k
