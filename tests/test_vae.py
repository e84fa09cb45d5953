"""Wan2.1 VAE: golden parity with the reference, checkpoint keys, chunking, causality, input errors."""

import glob
import json
import os

import pytest
import torch

from model import VAE_PRESETS, WanVAE, load_vae

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN_VAES = sorted(glob.glob(os.path.join(GOLDEN, "vae_*.pt")))


def rel_err(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def our_config(ref_config):
    """Translate the reference constructor kwargs (note its spelling 'temperal') into WanVAE kwargs."""
    assert ref_config["attn_scales"] == [] and ref_config["dropout"] == 0.0  # the only values we build
    return dict(dim=ref_config["dim"], z_dim=ref_config["z_dim"], dim_mult=tuple(ref_config["dim_mult"]),
                num_res_blocks=ref_config["num_res_blocks"],
                temporal_downsample=tuple(ref_config["temperal_downsample"]),
                temporal_window=ref_config["temporal_window"])


@pytest.fixture(scope="module")
def tiny_vae():
    """A random tiny VAE in float32 with non-trivial norm gains (the default init has gamma = 1)."""
    torch.manual_seed(0)
    vae = WanVAE(**VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.1 * torch.randn_like(p))
    return vae


def random_video(T, H=16, W=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, T, H, W, generator=g) * 2 - 1


# ---- goldens from the reference implementation ----

def test_goldens_exist():
    assert GOLDEN_VAES, f"no vae_*.pt in {GOLDEN}"


@pytest.mark.parametrize("path", GOLDEN_VAES, ids=os.path.basename)
def test_golden_encode_decode(path):
    golden = torch.load(path, weights_only=True)
    config = our_config(golden["config"])
    vae = load_vae(path, dtype=torch.float32, config=config)  # strict load of the stored state dict
    torch.testing.assert_close(vae.latent_mean, golden["mean"], rtol=0, atol=0)
    torch.testing.assert_close(vae.latent_std, golden["std"], rtol=0, atol=0)
    latent = vae.encode(golden["video"])
    assert latent.dtype == torch.float32 and latent.shape == golden["latent"].shape
    assert rel_err(latent, golden["latent"]) < 1e-5
    torch.testing.assert_close(latent, golden["latent"], rtol=1e-4, atol=1e-4)
    decoded = vae.decode(golden["latent"])
    assert decoded.dtype == torch.float32 and decoded.shape == golden["decoded"].shape
    assert rel_err(decoded, golden["decoded"]) < 1e-5
    torch.testing.assert_close(decoded, golden["decoded"], rtol=1e-4, atol=1e-4)
    # the one-pass (cache-free) paths are a second implementation of the same maths
    assert rel_err(vae.encode(golden["video"], chunk=0), golden["latent"]) < 1e-5
    assert rel_err(vae.decode(golden["latent"], chunk=0), golden["decoded"]) < 1e-5


@pytest.mark.parametrize("path", GOLDEN_VAES[:1], ids=os.path.basename)
def test_compiled_encoder_matches_golden(path):
    """train.compile_vae (compile=True) traces the chunked encoder, cache and all, to the reference numbers."""
    import train  # here: the other tests need only model.py

    golden = torch.load(path, weights_only=True)
    vae = load_vae(path, dtype=torch.float32, config=our_config(golden["config"]))
    eager = vae.encode(golden["video"])
    train.compile_vae(vae)
    compiled = vae.encode(golden["video"])
    assert rel_err(compiled, golden["latent"]) < 1e-5
    assert rel_err(compiled, eager) < 1e-6
    assert vae.encode(golden["video"]).equal(compiled)  # the second call reuses the graphs


def test_tiny_preset_is_the_golden_config():
    golden = torch.load(os.path.join(GOLDEN, "vae_tiny.pt"), weights_only=True)
    assert our_config(golden["config"]) == VAE_PRESETS["tiny"]


def test_bf16_default_load(tmp_path):
    golden = torch.load(os.path.join(GOLDEN, "vae_tiny.pt"), weights_only=True)
    path = str(tmp_path / "wrapped.pt")
    torch.save({"state_dict": golden["state_dict"], "step": 3}, path)  # a file that wraps the state dict
    vae = load_vae(path, config=VAE_PRESETS["tiny"])
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in vae.parameters())
    latent = vae.encode(golden["video"])
    assert latent.dtype == torch.float32
    assert rel_err(latent, golden["latent"]) < 3e-2  # bf16 rounding through ~30 layers, nothing more


# ---- the full-size checkpoint layout ----

def test_full_size_keys_and_shapes():
    ref = json.load(open(os.path.join(GOLDEN, "vae_keys.json")))
    assert our_config(ref["config"]) == VAE_PRESETS["wan2.1"]
    with torch.device("meta"):
        vae = WanVAE(**VAE_PRESETS["wan2.1"])
    ours = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    assert ours == [(e["key"], e["shape"]) for e in ref["entries"]]
    assert sum(p.numel() for p in vae.parameters()) == ref["num_parameters"] == 126_892_531
    assert not vae.latent_mean.is_meta  # the constants stay real on a meta-built model


# ---- loading errors ----

def test_load_errors_name_file_and_keys(tmp_path):
    golden = torch.load(os.path.join(GOLDEN, "vae_tiny.pt"), weights_only=True)
    sd = dict(golden["state_dict"])
    del sd["decoder.head.2.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["conv1.weight"] = torch.zeros(32, 32, 3, 1, 1)
    path = str(tmp_path / "broken.pth")
    torch.save(sd, path)
    with pytest.raises(KeyError) as err:
        load_vae(path, dtype=torch.float32, config=VAE_PRESETS["tiny"])
    msg = str(err.value)
    for needle in (path, "decoder.head.2.bias", "encoder.extra.weight", "conv1.weight"):
        assert needle in msg
    with pytest.raises(KeyError):  # the tiny file is not the full-size model
        load_vae(os.path.join(GOLDEN, "vae_tiny.pt"), dtype=torch.float32)


# ---- chunking and causality ----

def test_encoder_chunks_agree_with_one_pass(tiny_vae):
    video = random_video(13)
    one_pass = tiny_vae.encode(video, chunk=0)
    assert one_pass.shape == (1, 16, 4, 2, 2)
    for chunk in (4, 8, 16):  # 8 leaves a remainder chunk of 4, 16 is one chunk after frame 0
        assert rel_err(tiny_vae.encode(video, chunk=chunk), one_pass) < 1e-5, chunk


def test_decoder_chunks_agree_with_one_pass(tiny_vae):
    latent = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    one_pass = tiny_vae.decode(latent, chunk=0)
    assert one_pass.shape == (1, 3, 13, 16, 16)
    for chunk in (1, 2):  # 2 leaves a remainder of 1
        assert rel_err(tiny_vae.decode(latent, chunk=chunk), one_pass) < 1e-5, chunk


@pytest.mark.parametrize("k", [4, 5, 12])  # last and first frame of a group of 4
def test_encoder_is_causal(tiny_vae, k):
    video = random_video(13)
    latent = tiny_vae.encode(video, chunk=4)
    changed = video.clone()
    changed[:, :, k] = -changed[:, :, k]
    latent_changed = tiny_vae.encode(changed, chunk=4)
    first = (k + 3) // 4  # latent frame holding pixel frame k (frame 0 alone, then groups of 4)
    torch.testing.assert_close(latent_changed[:, :, :first], latent[:, :, :first], rtol=0, atol=1e-6)
    assert rel_err(latent_changed[:, :, first], latent[:, :, first]) > 1e-4  # float noise is ~1e-7
    # and a prefix of the clip alone gives the same leading latents
    prefix = tiny_vae.encode(video[:, :, :5], chunk=0)
    torch.testing.assert_close(prefix, latent[:, :, :2], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(tiny_vae):
    latent = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    video = tiny_vae.decode(latent)
    changed = latent.clone()
    changed[:, :, 2] += 1.0
    video_changed = tiny_vae.decode(changed)
    torch.testing.assert_close(video_changed[:, :, :5], video[:, :, :5], rtol=0, atol=1e-6)  # frames 0..4
    assert rel_err(video_changed[:, :, 5:9], video[:, :, 5:9]) > 1e-3


# ---- input contract ----

def test_uint8_input_matches_float(tiny_vae):
    gen = torch.Generator().manual_seed(4)
    video_u8 = torch.randint(0, 256, (1, 3, 5, 16, 16), dtype=torch.uint8, generator=gen)
    as_float = (video_u8.double() / 127.5 - 1).float()  # exact in float64, then rounded once
    torch.testing.assert_close(tiny_vae.encode(video_u8), tiny_vae.encode(as_float), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 8, 16, 16), "T = 1 \\+ 4k"),
    ((1, 3, 2, 16, 16), "T = 1 \\+ 4k"),
    ((1, 3, 30, 16, 16), "T = 1 \\+ 4k"),
    ((1, 3, 5, 20, 16), "divisible by 8"),
    ((1, 3, 5, 16, 12), "divisible by 8"),
    ((1, 4, 5, 16, 16), "\\[B, 3, T, H, W\\]"),
    ((3, 5, 16, 16), "\\[B, 3, T, H, W\\]"),
])
def test_bad_video_shapes_are_clear_errors(tiny_vae, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae.encode(torch.zeros(shape))


def test_other_bad_inputs(tiny_vae):
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_vae.encode(torch.zeros(1, 3, 9, 16, 16), chunk=6)
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        tiny_vae.encode(torch.full((1, 3, 5, 16, 16), 200.0))  # 0..255 floats
    with pytest.raises(TypeError, match="uint8 or float"):
        tiny_vae.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="latent \\[B, 16"):
        tiny_vae.decode(torch.zeros(1, 8, 2, 2, 2))
