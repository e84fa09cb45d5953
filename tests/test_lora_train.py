"""LoRA post-training end to end: train.py with lora_rank/lora_alpha on the demo DiT, then sample.py.

One LoRA run (rank 4, alpha 8: a scale of 2, so an alpha that gets lost on the way shows) fine-tunes a
random "pre-trained" demo DiT (init=<file>) on two synthetic samples for 6 steps, saving every step.
It is checked against independent references: the loss on a fixed batch before and after, every base
weight bit for bit against the init file, the power EMA recomputed in float64 from the per-step
checkpoints, a killed and resumed run against the uninterrupted one, and sample.py's merged net
against the unmerged one (adapters as low-rank branches) and a float64 merge.
"""

import json

import numpy as np
import pytest
import torch

import embed
import lora
import prepare
import sample
import train
from model import build_dit
from test_train import finish, launch, log_of, model_file, run_dir, small

RANK, ALPHA, STEPS = 4, 8, 6
N_LINEARS = 10  # LoRA-wrapped linears per block: q/k/v/output of both attentions + the two MLP linears


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and the in-process run then matches the subprocesses
    (test_train.launch sets OMP_NUM_THREADS=1) bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lora_args(root, out, **extra):
    """Overrides of the demo preset: LoRA on the base file, a learning rate that shows in 6 steps."""
    args = dict(init=root / "base.pt", lora_rank=RANK, lora_alpha=ALPHA, lr=1e-2, warmup_iters=0, max_iter=STEPS,
                save_every=1)
    args.update(extra)
    return small(root / "data", out, **args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data (3 clips of 5 frames -> 2 training samples), the base DiT file, and the LoRA run (in process)."""
    root = tmp_path_factory.mktemp("lora_train")
    names = prepare.write_synthetic_dataset(str(root / "data"), 3, num_frames=5, height=32, width=48, seed=0)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        embed.save_embedding(root / "data" / "t5_xxl" / "pinhole_front" / f"{name}.pickle",
                             rng.standard_normal((5 + i, 64)))
    # The "pre-trained" base: the official init leaves AdaLN at zero; perturb everything so all paths matter.
    torch.manual_seed(0)
    base = build_dit("demo", dtype=torch.float32)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(base.state_dict(), root / "base.pt")
    config = train.resolve_config("demo", lora_args(root, root / "ref"))
    result = train.train(config)
    return dict(root=root, config=config, losses=result["losses"], base=base.state_dict(),
                caption=root / "data" / "t5_xxl" / "pinhole_front" / f"{names[0]}.pickle")


def ckpt_path(out, it):
    return run_dir(out) / "checkpoints" / "model" / f"iter_{it:09d}.pt"


def is_adapter(key):
    return ".lora_A." in key or ".lora_B." in key


def injected_demo(sd=None):
    """The demo DiT with rank-4 alpha-8 adapters (lora.inject_lora), loaded strictly from `sd` if given."""
    net = build_dit("demo", device="meta", dtype=torch.float32)
    lora.inject_lora(net, RANK, ALPHA)
    if sd is not None:
        net.load_state_dict(sd, strict=True, assign=True)
    return net


@torch.no_grad()
def fixed_batch_loss(net, config, draws=4):
    """train.py's objective on both training samples x `draws` fixed noise draws (caption kept, sigma ~ lognormal)."""
    config = dict(config, text_dropout=0.0, high_sigma_ratio=0.0)
    clips = train.index_dataset(config["dataset_dir"], config["camera_keys"], config["front_camera_key"], 5)
    ds = train.MultiviewDataset(clips, config["camera_keys"], config["camera_to_view_id"], config["front_camera_key"],
                                5, config["height"], config["width"])
    vae = train.build_vae(config, torch.device("cpu"), torch.float32)
    V, losses = len(config["camera_keys"]), []
    for i in range(len(ds)):
        batch = torch.utils.data.default_collate([ds[i]])
        x0 = train.encode_batch(vae, batch, torch.device("cpu"), V)
        context, view_ids, fps = train.batch_inputs(batch, torch.device("cpu"), x0.shape[2] // V)
        for k in range(draws):
            noise = train.draw_training_noise(config, x0.shape[1:], V, 10 ** 6 + k, [i], torch.device("cpu"))
            losses.append(train.diffusion_loss(net, x0, context, view_ids, fps, noise, V, config["loss_scale"]).item())
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------------
# training


def test_lora_run_lowers_the_loss_and_keeps_every_base_weight(run):
    out = run["root"] / "ref"
    sd = model_file(out, STEPS)
    assert len(run["losses"]) == STEPS and np.isfinite(run["losses"]).all()

    # Layout: the official PEFT keys (what lora.inject_lora gives a fresh demo DiT), under net. and net_ema.
    want = injected_demo().state_dict()
    assert sd.keys() == {f"{p}.{k}" for p in ("net", "net_ema") for k in want}
    assert sum(k.endswith(".lora_A.default.weight") for k in want) == N_LINEARS * 4  # 4 demo blocks
    for k, v in want.items():
        assert sd[f"net.{k}"].shape == v.shape and sd[f"net.{k}"].dtype == torch.float32, k
    assert all((run_dir(out) / "checkpoints" / kind / f"iter_{STEPS:09d}.pt").is_file() for kind in train.KINDS)

    # Frozen: every non-adapter weight, in net. and net_ema., is the init file's bit for bit.
    for prefix in ("net.", "net_ema."):
        base = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in sd.items()
                if k.startswith(prefix) and not is_adapter(k)}
        assert base.keys() == run["base"].keys()
        assert all(torch.equal(base[k], v) for k, v in run["base"].items()), prefix
    trained_b = [v for k, v in sd.items() if k.startswith("net.") and ".lora_B." in k]
    assert all(v.abs().sum() > 0 for v in trained_b)  # B starts at 0

    # The loss on a fixed batch (fixed noise draws): the base (= the LoRA init, B = 0) vs the trained adapters.
    base_net = build_dit("demo", checkpoint=str(run["root"] / "base.pt"), dtype=torch.float32)
    trained = injected_demo({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
    before, after = fixed_batch_loss(base_net, run["config"]), fixed_batch_loss(trained, run["config"])
    assert after < 0.7 * before, (before, after)  # measured: 20.3 -> 10.7


def test_optimizer_holds_only_adapters_and_ema_averages_them(run):
    out = run["root"] / "ref"
    adapters = sorted(k for k in injected_demo().state_dict() if is_adapter(k))
    optim = torch.load(run_dir(out) / "checkpoints" / "optim" / f"iter_{STEPS:09d}.pt", weights_only=True)
    assert sorted(optim["state"]) == adapters
    assert sorted(p for g in optim["param_groups"] for p in g["params"]) == adapters
    trainer = torch.load(run_dir(out) / "checkpoints" / "trainer" / f"iter_{STEPS:09d}.pt", weights_only=True)
    assert sorted(trainer["trainable"]) == adapters

    # The power EMA in float64 from the per-step weights: after step 1 it is those weights (beta 0),
    # then shadow = beta(k - 1) shadow + (1 - beta(k - 1)) w_k after step k.
    steps = [model_file(out, it) for it in range(1, STEPS + 1)]
    final = steps[-1]
    for name in adapters:
        shadow = steps[0][f"net.{name}"].double()
        for k in range(2, STEPS + 1):
            beta = train.ema_beta(k - 1, run["config"]["ema_rate"])
            shadow = beta * shadow + (1 - beta) * steps[k - 1][f"net.{name}"].double()
        got = final[f"net_ema.{name}"].double()
        torch.testing.assert_close(got, shadow, rtol=1e-6, atol=1e-7)
        if ".lora_B." in name:  # a real average, not a copy of the last weights
            assert (got - final[f"net.{name}"].double()).abs().max() > 1e-4 * got.abs().max()


def test_waymo5views_lora_preset_trains_only_the_adapters_of_the_2b_net():
    config = train.resolve_config("waymo5views_lora")
    assert (config["lora_rank"], config["lora_alpha"]) == (16, 16)
    net = build_dit("2b", device="meta", dtype=torch.float32)
    trainable = train.setup_trainable(net, config)
    params = dict(net.named_parameters())
    assert len(trainable) == 2 * 280 and all(is_adapter(n) for n in trainable)
    assert sum(params[n].numel() for n in trainable) == 22_937_600  # the official experiment's count
    assert [n for n, p in params.items() if p.requires_grad] == trainable
    optimizer, _ = train.build_optimizer(config, [params[n] for n in trainable])
    assert [p for g in optimizer.param_groups for p in g["params"]] == [params[n] for n in trainable]


def test_killed_lora_run_resumes_bit_exact(run):
    """Killed after step 5 with the last checkpoint at 3: the resumed run redoes 4-5 and ends as the reference."""
    args = lora_args(run["root"], run["root"] / "resumed", save_every=3)
    finish(launch(args + ["debug_kill=step:5"]), expect=-9)
    ckpt = run_dir(run["root"] / "resumed") / "checkpoints"
    assert train.latest_checkpoint(ckpt) == 3
    out = finish(launch(args))
    assert "resuming from" in out and "iter_000000003" in out
    got, want = log_of(run["root"] / "resumed"), log_of(run["root"] / "ref")
    assert [r["iter"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want] == run["losses"]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    a, b = model_file(run["root"] / "resumed", STEPS), model_file(run["root"] / "ref", STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)  # net. and the EMA
    opt = lambda out: torch.load(run_dir(out) / "checkpoints" / "optim" / f"iter_{STEPS:09d}.pt")  # noqa: E731
    oa, ob = opt(run["root"] / "resumed"), opt(run["root"] / "ref")
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][p][s], ob["state"][p][s]) for p in ob["state"] for s in ob["state"][p])


# ------------------------------------------------------------------------------------------------
# sampling the checkpoint


def test_sample_py_merged_and_unmerged_give_the_same_video(run, monkeypatch):
    """The same sample.py command with the adapters folded in (default) and as branches (--lora_unmerged).

    "The same": latents within 1e-5 relative (float32 rounding of W x + s B A x vs (W + s B A) x through
    3 sampler steps) and uint8 videos at most one level apart; the base model's sample is far from both.
    """
    out = run["root"] / "ref"
    ckpt = ckpt_path(out, STEPS)
    generated = []
    real = sample.generate

    def recording(net, *args, **kwargs):  # sample.main's call: keep the net and (video, latent)
        video, latent = real(net, *args, **kwargs)
        generated.append((net, video, latent))
        return video, latent

    monkeypatch.setattr(sample, "generate", recording)

    def sample_py(*extra, ckpt=ckpt):
        n = len(generated)
        save = run["root"] / "samples" / f"s{n}.mp4"
        sample.main(["--ckpt", str(ckpt), "--prompt", str(run["caption"]), "--uncond", "zero", "--guidance", "3",
                     "--steps", "3", "--seed", "1", "--device", "cpu", "--save_path", str(save), *extra])
        assert save.is_file() and json.loads(save.with_suffix(".json").read_text())["view_ids"] == [4, 5, 0, 1, 2]
        return generated[n]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    (net, merged_video, merged), (branches, unmerged_video, unmerged) = sample_py(), sample_py("--lora_unmerged")
    assert len(lora.lora_modules(branches)) == N_LINEARS * 4 and not lora.lora_modules(net)
    assert rel(unmerged, merged) < 1e-5  # measured 2e-6
    assert (merged_video.int() - unmerged_video.int()).abs().max() <= 1  # measured: 1 pixel in 7680 off by 1
    assert (merged_video != unmerged_video).float().mean() < 1e-3
    _, _, base = sample_py("--run_config", str(run_dir(out) / "checkpoints" / "config.json"),
                           ckpt=run["root"] / "base.pt")
    assert rel(base, merged) > 1e-2  # the adapters change the sample

    # The command's merged weights (alpha from the run config) are W + (alpha / r) B A, here in float64.
    sd = model_file(out, STEPS)
    for name in ("blocks.0.self_attn.q_proj", "blocks.3.cross_attn.v_proj", "blocks.2.mlp.layer2"):
        w, a, b = (sd[f"net.{name}.{k}.weight"].double() for k in ("base_layer", "lora_A.default", "lora_B.default"))
        torch.testing.assert_close(net.state_dict()[f"{name}.weight"].double(), w + ALPHA / RANK * b @ a,
                                   rtol=0, atol=1e-6)

    # lora.py's merge CLI takes alpha from the run config too: its plain weights equal the command's net.
    lora.main(["--lora", str(ckpt), "--out", str(run["root"] / "merged.safetensors")])
    from safetensors.torch import load_file
    exported = load_file(str(run["root"] / "merged.safetensors"))
    assert exported.keys() == net.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in net.state_dict().items())

    # An adapter-only file over the base named by the run config (init=): the same net as the full checkpoint.
    torch.save({k: v for k, v in sd.items() if k.startswith("net.") and is_adapter(k)}, run["root"] / "adapters.pt")
    only = sample.load_dit_for_sampling(run["root"] / "adapters.pt", run["config"], dtype=torch.float32,
                                        base_ckpt=run["config"]["init"], lora_alpha=ALPHA)
    assert all(torch.equal(only.state_dict()[k], v) for k, v in net.state_dict().items())
    branches = sample.load_dit_for_sampling(run["root"] / "adapters.pt", run["config"], dtype=torch.float32,
                                            base_ckpt=run["config"]["init"], lora_alpha=ALPHA, merge_lora=False)
    want = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    assert branches.state_dict().keys() == want.keys()
    assert all(torch.equal(branches.state_dict()[k], v) for k, v in want.items())
    assert {m.scale for _, m in lora.lora_modules(branches)} == {ALPHA / RANK}
