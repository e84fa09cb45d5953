"""sample.py: the sampler against the official golden trajectory, CFG, conditioning, loading, mp4 end to end.

References: tests/golden/sampler.pt (the official scheduler on a toy denoiser), closed-form ODE
solutions, PIL's resize, float64 LoRA merging, and the unsharded run for context parallelism.
Models are the random `demo` DiT and the `tiny` Wan VAE, fp32 on CPU, a few steps.
"""

import json
import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.distributed as dist

import sample
from _dist import run_gloo
from model import VAE_PRESETS, WanVAE, build_dit, denoise

GOLDEN = Path(__file__).parent / "golden" / "sampler.pt"
V, T_PIX, H, W = 3, 5, 32, 48  # 3 views x 5 pixel frames (2 latent) of 32x48 (latent 4x6, tokens 2x3)
T_LAT = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (and stalls badly when
    the other core is busy), so run this module single-threaded and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    """Frobenius relative error in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------------
# the sampler vs the golden trajectory


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def toy_x0(x, sigma):
    """The golden's toy denoiser tanh(x / (1 + sigma)) / 2 + 0.1, sigma as float32 (then x's dtype)."""
    s = torch.tensor(sigma, dtype=torch.float32).to(x.dtype)
    return torch.tanh(x / (1 + s)) * 0.5 + 0.1


def run_traced(x_init, sigmas):
    xs, x0s = [x_init], []
    out = sample.sample_ab2(toy_x0, x_init, sigmas, callback=lambda i, x0, x: (x0s.append(x0), xs.append(x)))
    return torch.stack(xs), torch.stack(x0s), out


def test_schedule_and_noise_match_golden(golden):
    cfg = golden["scheduler_config"]
    sigmas = sample.karras_sigmas(cfg["num_steps"], cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
    assert sigmas.dtype == torch.float64 and sigmas.shape == (36,)
    torch.testing.assert_close(sigmas, golden["sigmas"], rtol=1e-12, atol=0)
    assert torch.equal(sample.karras_sigmas(), golden["sigmas"])  # the defaults are the official ones
    noise = sample.initial_noise((2, 3), 0)
    assert noise.dtype == torch.float32 and torch.equal(noise, golden["x_init"])


def test_sampler_float32_matches_golden(golden):
    xs, x0s, out = run_traced(golden["x_init"], golden["sigmas"])
    assert xs.dtype == torch.float32 and xs.shape == golden["xs"].shape
    for got, want in ((xs, golden["xs"]), (x0s, golden["x0_preds"]), (out, golden["output"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert rel(got, want) < 1e-6


def test_sampler_float64_matches_golden(golden):
    """The same run with float64 states and denoiser: every step within 1e-6 of the float32 golden."""
    xs, x0s, out = run_traced(golden["x_init"].double(), golden["sigmas"])
    assert xs.dtype == torch.float64
    for i in range(len(golden["xs"])):
        assert rel(xs[i], golden["xs"][i]) < 1e-6, i
    for i in range(len(golden["x0_preds"])):
        assert rel(x0s[i], golden["x0_preds"][i]) < 1e-6, i
    assert rel(out, golden["output"]) < 1e-6


def test_ab2_step_is_exact_for_x0_linear_in_lambda():
    """dx/dlambda = x0 - x (lambda = -ln sigma) with x0 = a + b lambda: x = a + b (lambda - 1) + C e^-lambda.

    The AB2 step extrapolates x0 linearly in lambda and integrates exactly, so from an exact state it
    lands exactly on the solution, whatever the step sizes.
    """
    a, b, C = 0.7, -0.3, 5.0
    exact_x = lambda s: a + b * (-math.log(s) - 1) + C * s  # noqa: E731  (e^-lambda = sigma)
    x0 = lambda s: a + b * -math.log(s)  # noqa: E731
    for s_prev, s, s_next in ((200.0, 171.6, 146.8), (0.05, 0.03, 0.01), (3.0, 1.0, 0.2)):
        decay, h, b1, b2 = sample.ab2_coefficients(s_prev, s, s_next)
        got = decay * exact_x(s) + h * (b1 * x0(s) + b2 * x0(s_prev))
        assert abs(got - exact_x(s_next)) < 1e-12 * max(1.0, abs(exact_x(s_next)))


def test_sampler_solves_constant_x0_exactly():
    """x0 constant: x(sigma) = c + (sigma / sigma_0)(x_init - c); both step kinds are exact, final = c."""
    sigmas = sample.karras_sigmas(5)
    x_init = torch.tensor([3.0, -40.0], dtype=torch.float64)
    c = torch.tensor([0.25, -0.5], dtype=torch.float64)
    states = []
    out = sample.sample_ab2(lambda x, s: c, x_init, sigmas, callback=lambda i, x0, x: states.append(x))
    for i, x in enumerate(states):
        want = c + sigmas[i + 1] / sigmas[0] * (x_init - c)
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, c)


# ---------------------------------------------------------------------------------------------------
# guidance, conditioning


def demo_net(seed=0):
    """The demo DiT with random weights everywhere (the official init zeroes AdaLN, i.e. the blocks)."""
    torch.manual_seed(seed)
    net = build_dit("demo", dtype=torch.float32)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net.eval().requires_grad_(False)


def tiny_vae(seed=3):
    """The demo recipe for a random VAE (build_vae's docstring), written out: default init after seeding."""
    torch.manual_seed(seed)
    return WanVAE(**VAE_PRESETS["tiny"]).eval()


def text_context(seed, slot=0, tokens=7, n_views=V, dim=64):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(1, n_views * 512, dim)
    ctx[0, slot * 512: slot * 512 + tokens] = torch.randn(tokens, dim, generator=g)
    return ctx


def test_cfg_batch_of_two_equals_two_separate_branches():
    net = demo_net()
    cond, uncond = text_context(1), text_context(2, tokens=4)
    views = sample.latent_view_indices([0, 1, 2], T_LAT)
    fps = torch.tensor([10.0])
    x = torch.randn(1, 16, V * T_LAT, 4, 6) * 50
    sigma = 50.0  # mostly the net's prediction (c_out = -0.98), so the text matters
    s = torch.tensor([sigma])
    x0_c, _ = denoise(net, x, s, cond, views, fps)
    x0_u, _ = denoise(net, x, s, uncond, views, fps)
    got = sample.guided_x0_fn(net, cond, uncond, 7.0, views, fps)(x, sigma)
    torch.testing.assert_close(got, x0_c + 7.0 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
    assert (x0_c - x0_u).abs().max() > 1e-3  # the branches differ far beyond the tolerance above

    batch_sizes = []
    hook = net.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    got_g0 = sample.guided_x0_fn(net, cond, uncond, 0.0, views, fps)(x, sigma)  # guidance 0: cond only
    got_noop = sample.guided_x0_fn(net, cond, cond.clone(), 7.0, views, fps)(x, sigma)  # official empty negative
    hook.remove()
    assert batch_sizes == [1, 1]
    assert torch.equal(got_g0, x0_c) and torch.equal(got_noop, x0_c)


@pytest.mark.parametrize("n_pixel", [1, 5])
def test_conditional_frames_come_back_as_their_latents(n_pixel):
    """Final latent frames under the condition mask equal the VAE latents of the input frames exactly."""
    net, vae = demo_net(), tiny_vae()
    g = torch.Generator().manual_seed(4)
    frames = torch.randint(0, 256, (3, V, n_pixel, H, W), dtype=torch.uint8, generator=g)
    gt, mask = sample.encode_conditioning(vae, frames[None], T_LAT)
    noise = sample.initial_noise((1, 16, V * T_LAT, H // 8, W // 8), 1)
    latent = sample.sample_latents(net, noise, text_context(1), torch.zeros(1, V * 512, 64), 3.0,
                                   sample.latent_view_indices([4, 5, 0], T_LAT), torch.tensor([10.0]), gt, mask,
                                   steps=2)
    n_lat = 1 + (n_pixel - 1) // 4
    assert latent.shape == (1, 16, V * T_LAT, H // 8, W // 8)
    for v in range(V):
        want = vae.encode(frames[:, v][None])  # [1, 16, n_lat, 4, 6]
        got = latent[:, :, v * T_LAT: v * T_LAT + n_lat]
        assert torch.equal(got, want), v
        if n_lat < T_LAT:  # the free frames were generated, not copied
            assert not torch.equal(latent[:, :, v * T_LAT + n_lat], want[:, :, -1])


def test_resize_center_crop_matches_pil():
    from PIL import Image
    g = np.random.default_rng(0)
    frame = g.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    frame = np.asarray(Image.fromarray(frame).resize((45, 25), Image.NEAREST).resize((90, 50), Image.BILINEAR))
    got = sample.resize_center_crop(frame[None], H, W)[0].permute(1, 2, 0).numpy().astype(int)
    # cover: scale max(48/90, 32/50) = 0.64 -> 32 x ceil(57.6) = 58, crop 5 columns from the left
    ref = np.asarray(Image.fromarray(frame).resize((58, 32), Image.BILINEAR))[:, 5:5 + W].astype(int)
    assert got.shape == (H, W, 3)
    assert np.abs(got - ref).max() <= 2 and np.abs(got - ref).mean() < 0.5
    same = sample.resize_center_crop(frame[None], 50, 90)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(same, frame)  # already the target size: untouched


def write_mp4(path, frames_THW3, fps=10):
    w = imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                           ffmpeg_log_level="error", output_params=["-crf", "0"])
    for f in frames_THW3:
        w.append_data(f)
    w.close()


def test_conditioning_inputs_concatenated_or_per_view(tmp_path):
    """The last n frames of every view, from one time-concatenated file or from one file per view."""
    per_view = 6
    level = lambda v, t: 10 + 40 * v + 6 * t  # noqa: E731  a flat grey per (view, frame)
    clips = [np.stack([np.full((H, W, 3), level(v, t), np.uint8) for t in range(per_view)]) for v in range(V)]
    write_mp4(tmp_path / "all.mp4", np.concatenate(clips))
    for v in range(V):
        write_mp4(tmp_path / f"v{v}.mp4", clips[v])
    one = sample.load_conditioning_frames(str(tmp_path / "all.mp4"), V, 5, H, W)
    many = sample.load_conditioning_frames([str(tmp_path / f"v{v}.mp4") for v in range(V)], V, 5, H, W)
    assert one.shape == (3, V, 5, H, W) and one.dtype == torch.uint8
    assert (one.int() - many.int()).abs().max() <= 1
    for v in range(V):
        for k in range(5):
            assert abs(one[:, v, k].float().mean().item() - level(v, per_view - 5 + k)) < 2, (v, k)
    with pytest.raises(ValueError, match="do not split into 4 views"):
        sample.load_conditioning_frames(str(tmp_path / "all.mp4"), 4, 1, H, W)
    with pytest.raises(ValueError, match="2 files for 3 views"):
        sample.load_conditioning_frames([str(tmp_path / "v0.mp4")] * 2, V, 1, H, W)


# ---------------------------------------------------------------------------------------------------
# output layout


def test_layouts_and_atomic_mp4(tmp_path):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (3, V * T_PIX, H, W), dtype=torch.uint8, generator=g)
    views = [video[:, v * T_PIX:(v + 1) * T_PIX].permute(1, 2, 3, 0).numpy() for v in range(V)]  # [T, H, W, 3]
    stacked = sample.arrange_views(video.unflatten(1, (V, T_PIX)), "stacked")
    assert np.array_equal(stacked, np.concatenate(views, axis=1))  # views top to bottom
    grid = sample.arrange_views(video.unflatten(1, (V, T_PIX)), "grid", labels=["a", "b", "c"], label_height=16)
    assert grid.shape == (T_PIX, 16 + H, V * W, 3)
    assert np.array_equal(grid[:, 16:], np.concatenate(views, axis=2))  # views left to right, untouched
    assert grid[:, :16].max() > 128  # the labels are drawn (white, antialiased)

    ramp = torch.linspace(0, 255, W).round().to(torch.uint8)  # smooth, so the codec keeps it well
    out = sample.save_multiview_video(tmp_path / "o" / "x.mp4", ramp.expand(1, 3, V * T_PIX, H, W), V, fps=10)
    back = sample.read_video(str(out))[0]
    assert back.shape == (T_PIX, V * H, W, 3)
    assert np.abs(back.astype(int) - ramp.numpy()[None, None, :, None]).mean() < 2
    assert [p.name for p in out.parent.iterdir()] == ["x.mp4"]  # no temp files left
    with pytest.raises(ValueError, match="V=4"):
        sample.save_multiview_video(tmp_path / "bad.mp4", video, 4, fps=10)


# ---------------------------------------------------------------------------------------------------
# checkpoints


def test_official_checkpoint_strict_loading(tmp_path):
    net = demo_net(1)
    sd = {f"net.{k}": v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    sd["net.blocks.0.self_attn.q_norm._extra_state"] = torch.empty(0)  # TE metadata, ignored
    sd["net.accum_iteration"] = torch.tensor(7)
    torch.save(sd, tmp_path / "official.pt")
    loaded = sample.load_dit_for_sampling(tmp_path / "official.pt", "demo", dtype=torch.float32)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(KeyError, match="official.pt.*wrong shape"):
        sample.load_dit_for_sampling(tmp_path / "official.pt", "tiny")
    del sd["net.final_layer.linear.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match=r"missing \(1\): final_layer.linear.weight"):
        sample.load_dit_for_sampling(tmp_path / "broken.pt", "demo")


def test_lora_checkpoint_is_merged(tmp_path):
    """PEFT-layout keys (base_layer, lora_A/B.default) fold into W + B A, checked in float64."""
    net = demo_net(2)
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    name = "blocks.1.cross_attn.k_proj"
    w = sd.pop(f"net.{name}.weight")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g)
    sd.update({f"net.{name}.base_layer.weight": w, f"net.{name}.lora_A.default.weight": a,
               f"net.{name}.lora_B.default.weight": b})
    torch.save(sd, tmp_path / "lora.pt")
    loaded = sample.load_dit_for_sampling(tmp_path / "lora.pt", "demo", dtype=torch.float32)
    torch.testing.assert_close(loaded.state_dict()[f"{name}.weight"].double(), w.double() + b.double() @ a.double(),
                               rtol=1e-6, atol=1e-6)
    other = "blocks.0.mlp.layer1.weight"
    assert torch.equal(loaded.state_dict()[other], net.state_dict()[other])

    # adapter-only file + the base weights it was trained from
    torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, tmp_path / "base.pt")
    torch.save({k: v for k, v in sd.items() if ".lora_" in k}, tmp_path / "adapters.pt")
    merged = sample.load_dit_for_sampling(tmp_path / "adapters.pt", "demo", dtype=torch.float32,
                                          base_ckpt=tmp_path / "base.pt")
    for k, v in loaded.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k
    with pytest.raises(ValueError, match="only LoRA adapters"):
        sample.load_dit_for_sampling(tmp_path / "adapters.pt", "demo")


# ---------------------------------------------------------------------------------------------------
# end to end: our training-checkpoint layout + run config, text through a tiny T5, mp4 out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake training run: checkpoints/model/iter_*.pt (net. and a different net_ema.) + config.json."""
    from embed import make_tiny_t5
    root = tmp_path_factory.mktemp("run")
    make_tiny_t5(root / "t5", d_model=64)
    net, ema = demo_net(5), demo_net(6)
    sd = {**{f"net.{k}": v for k, v in net.state_dict().items()},
          **{f"net_ema.{k}": v for k, v in ema.state_dict().items()}}
    (root / "checkpoints" / "model").mkdir(parents=True)
    torch.save(sd, root / "checkpoints" / "model" / "iter_000000010.pt")
    config = {"model": "demo", "vae": "tiny", "vae_path": "", "vae_seed": 3, "height": H, "width": W,
              "num_frames": T_PIX, "camera_keys": ["side_left", "front_left", "front"], "front_camera_key": "front",
              "camera_to_view_id": {"front": 0, "side_left": 4, "front_left": 5}, "t5_dir": str(root / "t5"),
              "init": "", "lora_rank": 0, "lora_alpha": 0, "seed": 0}  # train.py's keys (a subset)
    (root / "checkpoints" / "config.json").write_text(json.dumps(config))
    return root, ema


def test_cli_end_to_end_on_our_checkpoint(run_dir):
    root, ema = run_dir
    ckpt = root / "checkpoints" / "model" / "iter_000000010.pt"
    out = root / "out" / "s.mp4"
    prompt = "A car drives down the road."
    sample.main(["--ckpt", str(ckpt), "--load_ema", "--prompt", prompt, "--uncond", "zero", "--guidance", "3",
                 "--steps", "2", "--seed", "5", "--save_path", str(out), "--grid", "--device", "cpu"])
    frames = sample.read_video(str(out))[0]
    assert frames.shape == (T_PIX, V * H, W, 3)  # views stacked vertically, 5 frames each
    grid = sample.read_video(str(out.with_name("s_grid.mp4")))[0]
    assert grid.shape == (T_PIX, 32 + H, V * W, 3)
    assert out.with_suffix(".txt").read_text().strip() == prompt
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["view_ids"] == [4, 5, 0] and settings["caption_view"] == 2 and settings["rope_fps"] == 10

    # Recompute independently: EMA weights, T5 caption in the front camera's slot (view id 0 -> slot 2),
    # zero uncond, the sampler, then decode view 1 alone and compare with its band of the mp4.
    from embed import encode_prompts, load_t5
    tok, enc = load_t5(root / "t5")
    ctx = torch.zeros(1, V * 512, 64)
    ctx[:, 2 * 512: 3 * 512] = encode_prompts([prompt], tok, enc)
    views = sample.latent_view_indices([4, 5, 0], T_LAT)
    vae = tiny_vae(3)
    x0_fn = sample.guided_x0_fn(ema, ctx, torch.zeros_like(ctx), 3.0, views, torch.tensor([10.0]))
    latent = sample.sample_ab2(x0_fn, sample.initial_noise((1, 16, V * T_LAT, H // 8, W // 8), 5),
                               sample.karras_sigmas(2))
    view1 = vae.decode(latent[:, :, T_LAT:2 * T_LAT])[0]  # [3, T, H, W]
    view1 = ((view1.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    luma = lambda rgb: rgb.astype(float) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    # yuv420p halves the chroma resolution (random VAE output is all fine detail): compare luma
    err = np.abs(luma(frames[:, H:2 * H]) - luma(view1)).mean()
    assert err < 4, err
    assert err < 0.3 * np.abs(luma(frames[:, :H]) - luma(view1)).mean()  # and it is not view 0


def test_settings_official_defaults_and_run_config():
    """No run config: the official 7 views 0..6 at 704x1280 x 29, caption in slot 0, fps 10 (30 on request)."""
    s = sample.resolve_settings(sample.parse_args(["--ckpt", "x.pt"]), None)
    assert (s["view_ids"], s["height"], s["width"], s["num_frames"]) == (list(range(7)), 704, 1280, 29)
    assert (s["caption_view"], s["fps"], s["rope_fps"], s["dit_preset"]) == (0, 10.0, 10.0, "2b")
    assert (s["vae_path"], s["vae_seed"]) == (sample.OFFICIAL["vae_path"], None)  # the official VAE, never random
    s = sample.resolve_settings(sample.parse_args(["--ckpt", "x.pt", "--official_fps30", "--view_ids", "4,5,0,1,2"]),
                                None)
    assert (s["fps"], s["rope_fps"], s["caption_view"]) == (10.0, 30.0, 2)  # mp4 at 10, RoPE as the script
    waymo = {"model": "2b", "vae": "wan2.1", "vae_path": "tok.pth", "vae_seed": 0, "height": 480, "width": 848,
             "num_frames": 29, "camera_keys": ["l", "fl", "f", "fr", "r"], "front_camera_key": "f",
             "camera_to_view_id": {"f": 0, "fr": 1, "r": 2, "l": 4, "fl": 5}, "init": "official.pt",
             "lora_rank": 16, "lora_alpha": 16}
    s = sample.resolve_settings(sample.parse_args(["--ckpt", "x.pt"]), waymo)
    assert s["view_ids"] == [4, 5, 0, 1, 2] and s["caption_view"] == 2 and (s["height"], s["width"]) == (480, 848)
    assert (s["vae_path"], s["vae_seed"], s["base_ckpt"], s["lora_alpha"]) == ("tok.pth", None, "official.pt", 16.0)
    assert s["labels"] == ["l", "fl", "f", "fr", "r"]
    s = sample.resolve_settings(sample.parse_args(["--ckpt", "x.pt", "--view_ids", "0,1,2,4,5"]), waymo)
    assert s["caption_view"] == 0 and s["labels"] == [f"view {i}" for i in (0, 1, 2, 4, 5)]  # slot follows ids
    s = sample.resolve_settings(sample.parse_args(["--ckpt", "x.pt"]), dict(waymo, vae_path=""))
    assert (s["vae_path"], s["vae_seed"]) == (None, 0)  # a run trained with a random VAE samples with it


def test_cli_skips_existing_and_reports_bad_input(run_dir, capsys):
    root, _ = run_dir
    ckpt = root / "checkpoints" / "model" / "iter_000000010.pt"
    out = root / "out2.mp4"
    out.write_bytes(b"done")
    sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--save_path", str(out), "--device", "cpu"])
    assert out.read_bytes() == b"done" and "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match="outside the model's 0..6"):
        sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--view_ids", "1,2,9", "--save_path",
                     str(root / "o3.mp4"), "--device", "cpu", "--steps", "1"])


# ---------------------------------------------------------------------------------------------------
# train.py's entry point and context parallelism


def training_batch():
    """train.py's loader form: video [B, V, T, 3, H, W], per-view ids [B, V], no n_views."""
    g = torch.Generator().manual_seed(8)
    return {"video": torch.randint(0, 256, (1, V, T_PIX, 3, H, W), dtype=torch.uint8, generator=g),
            "t5_text_embeddings": text_context(3, slot=2), "view_ids": torch.tensor([[4, 5, 0]]),
            "fps": torch.tensor([10.0], dtype=torch.float64)}


def test_sample_batch_for_training_matches_generate():
    net, vae, batch = demo_net(), tiny_vae(), training_batch()
    video = sample.sample_batch_for_training(net, vae, batch, guidance=2.0, seed=3, steps=2, num_conditional_frames=1)
    assert video.shape == (1, 3, V * T_PIX, H, W) and video.dtype == torch.uint8
    first = batch["video"][0, :, :1].permute(2, 0, 1, 3, 4)  # [3, V, 1, H, W]: frame 0 of every view
    ref, _ = sample.generate(net, vae, batch["t5_text_embeddings"], torch.zeros(1, V * 512, 64), view_ids=[4, 5, 0],
                             fps=10.0, height=H, width=W, num_frames=T_PIX, guidance=2.0, seed=3, steps=2,
                             cond_frames=first)
    assert torch.equal(video[0], ref)

    # the documented form: video [B, 3, V*T, H, W] view-major, ids per latent frame, n_views
    flat = dict(batch, video=batch["video"].permute(0, 3, 1, 2, 4, 5).flatten(2, 3), n_views=V,
                view_indices=sample.latent_view_indices([4, 5, 0], T_LAT))
    del flat["view_ids"]
    one = lambda b: sample.sample_batch_for_training(net, vae, b, 0.0, 3, steps=1, num_conditional_frames=2)  # noqa: E731
    assert torch.equal(one(flat), one(batch))
    with pytest.raises(ValueError, match="latent frames"):
        sample.sample_batch_for_training(net, vae, batch, 2.0, 3, steps=1, num_conditional_frames=5)


def _cp_inputs():
    g = torch.Generator().manual_seed(11)
    gt = torch.randn(1, 16, 2 * T_LAT, 4, 6, generator=g)
    mask = torch.zeros(1, 1, 2 * T_LAT, 4, 6)
    mask[:, :, ::T_LAT] = 1  # first latent frame of both views
    return dict(noise=sample.initial_noise((1, 16, 2 * T_LAT, 4, 6), 9), context=text_context(1, n_views=2),
                uncond_context=torch.zeros(1, 2 * 512, 64), guidance=4.0,
                view_indices=sample.latent_view_indices([1, 0], T_LAT), fps=torch.tensor([10.0]), gt=gt,
                cond_mask=mask, steps=3)


def _cp_worker(rank, world, path):
    net = demo_net()
    net.enable_context_parallel(dist.group.WORLD)
    torch.save(sample.sample_latents(net, **_cp_inputs()), f"{path}.{rank}")


def test_context_parallel_sampling_equals_one_process(tmp_path):
    """cp=2 (gloo): same noise, same conditioning, same result on every rank as the unsharded run."""
    ref = sample.sample_latents(demo_net(), **_cp_inputs())
    run_gloo(_cp_worker, 2, str(tmp_path / "lat"))
    for r in range(2):
        got = torch.load(tmp_path / f"lat.{r}", weights_only=True)
        assert got.shape == ref.shape and rel(got, ref) < 1e-5, r


def _decode_worker(rank, world, path):
    latent = torch.randn(1, 16, 3 * T_LAT, 4, 6, generator=torch.Generator().manual_seed(5))
    torch.save(sample.decode_views(tiny_vae(), latent, 3, dist.group.WORLD), f"{path}.{rank}")


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_decoding_spreads_the_views(world, tmp_path):
    """Under cp every rank decodes some of the views (none when cp > views) and gets the whole video."""
    latent = torch.randn(1, 16, 3 * T_LAT, 4, 6, generator=torch.Generator().manual_seed(5))
    ref = sample.decode_views(tiny_vae(), latent, 3)
    run_gloo(_decode_worker, world, str(tmp_path / "video"))
    for r in range(world):
        got = torch.load(tmp_path / f"video.{r}", weights_only=True)
        assert got.shape == ref.shape and torch.equal(got, ref), r


def test_benchmark_runs_and_projects_the_full_schedule():
    """The GPU benchmark's bookkeeping, on CPU with the demo model: 1 warm-up + 2 timed steps of 6."""
    r = sample.benchmark_sampling(n_views=2, height=16, width=32, num_frames=5, steps=6, timed_steps=2,
                                  preset="demo", vae_preset="tiny", device="cpu", dtype=torch.float32)
    assert not r["total_measured"] and r["per_step_s"] > 0 and r["decode_s"] > 0
    want = r["first_step_s"] + 5 * r["per_step_s"] + r["final_eval_s"]
    assert abs(r["sampling_s"] - want) < 1e-9 and abs(r["total_s"] - want - r["decode_s"]) < 1e-9
