"""The multiview DiT against the official implementation's golden numbers, and checkpoint loading."""

import glob
import json
import os

import pytest
import torch

from model import (MultiViewDiT, build_dit, count_parameters, dit_config, load_dit_weights, rope_angles)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
DIT_GOLDENS = sorted(glob.glob(os.path.join(GOLDEN, "dit_*.pt")))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_golden(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def golden_model(g):
    model = MultiViewDiT(**dit_config(g["config"])).float()
    load_dit_weights(model, g["state_dict"])  # strict; buffers and TE extra state are dropped by design
    return model.eval()


def test_goldens_discovered():
    assert DIT_GOLDENS, f"no dit_*.pt golden files in {GOLDEN}"


@pytest.mark.parametrize("path", DIT_GOLDENS, ids=os.path.basename)
def test_dit_matches_golden_output(path):
    g = load_golden(path)
    model = golden_model(g)
    with torch.no_grad():
        out = model(**g["inputs"])
    assert out.shape == g["output"].shape
    assert rel_err(out, g["output"]) < 1e-5


@pytest.mark.parametrize("path", DIT_GOLDENS, ids=os.path.basename)
def test_dit_matches_golden_intermediates(path):
    """Each stage (patch embed, sinusoid, AdaLN-LoRA term, t_emb, every block, final layer) matches."""
    g = load_golden(path)
    model = golden_model(g)
    seen = {}
    hook = lambda name: (lambda m, i, o: seen.__setitem__(name, o))  # noqa: E731
    model.x_embedder.register_forward_hook(hook("x_embedded_B_T_H_W_D"))
    model.t_embedder[0].register_forward_hook(hook("t_sinusoid_B_T_D"))
    model.t_embedder[1].register_forward_hook(hook("adaln_lora_B_T_3D"))
    model.t_embedding_norm.register_forward_hook(hook("t_emb_B_T_D"))
    model.final_layer.register_forward_hook(hook("final_layer_B_T_H_W_O"))
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(hook(f"block{i}"))
    with torch.no_grad():
        model(**g["inputs"])
    ref = g["intermediates"]
    for name in ("x_embedded_B_T_H_W_D", "t_sinusoid_B_T_D", "adaln_lora_B_T_3D", "t_emb_B_T_D"):
        assert rel_err(seen[name], ref[name]) < 1e-5, name
    for i, ref_block in enumerate(ref["block_outputs_B_T_H_W_D"]):
        assert rel_err(seen[f"block{i}"].reshape(ref_block.shape), ref_block) < 1e-5, f"block {i}"
    final = ref["final_layer_B_T_H_W_O"]
    assert rel_err(seen["final_layer_B_T_H_W_O"].reshape(final.shape), final) < 1e-5


@pytest.mark.parametrize("path", DIT_GOLDENS, ids=os.path.basename)
def test_rope_table_matches_golden(path):
    g = load_golden(path)
    c = dit_config(g["config"])
    inputs = g["inputs"]
    B, _, T, H, W = inputs["x_B_C_T_H_W"].shape
    V = inputs["crossattn_emb"].shape[1] // 512
    angles = rope_angles(c["model_channels"] // c["num_heads"], V, T // V, H // 2, W // 2, inputs["fps"],
                         h_ratio=c["rope_h_extrapolation_ratio"], w_ratio=c["rope_w_extrapolation_ratio"],
                         t_ratio=c["rope_t_extrapolation_ratio"])
    assert angles.shape == g["rope_freqs"].shape
    torch.testing.assert_close(angles, g["rope_freqs"], rtol=1e-6, atol=1e-6)


def test_rope_thetas_and_split_of_2b():
    """Independent float64 check of the 44/42/42 split and the NTK thetas the spec derives."""
    angles = rope_angles(128, 1, 2, 2, 3, fps=torch.tensor([10.0]))[:, 0, 0].double()  # [12, 128]
    theta_t = 10000 * (1 / 3) ** (44 / 42)
    theta_h = 10000 * 3.0 ** (42 / 40)
    assert abs(theta_t - 3163.43) < 0.01 and abs(theta_h - 31694.02) < 0.01
    # token (t=1, h=1, w=2) is row 1*6 + 1*3 + 2 = 11
    row = angles[11]
    f_t = theta_t ** (-torch.arange(0, 44, 2, dtype=torch.float64) / 44)
    f_h = theta_h ** (-torch.arange(0, 42, 2, dtype=torch.float64) / 42)
    expect = torch.cat([1 * 24 / 10 * f_t, 1 * f_h, 2 * f_h])
    torch.testing.assert_close(row[:64], expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row[64:], row[:64], rtol=0, atol=0)
    # positions restart per view: two views give the same table twice
    two = rope_angles(128, 2, 2, 2, 3)
    torch.testing.assert_close(two[:12], two[12:], rtol=0, atol=0)


def test_2b_state_dict_matches_official_key_list():
    with open(os.path.join(GOLDEN, "dit_2b_keys.json")) as f:
        ref = json.load(f)
    with torch.device("meta"):
        model = MultiViewDiT(**dit_config("2b"))
    params = {e["key"]: e for e in ref["entries"] if e["kind"] == "parameter"}
    own = model.state_dict()
    assert set(own) == set(params)  # we keep no buffers: the official ones are recomputed on the fly
    for key, tensor in own.items():
        assert list(tensor.shape) == params[key]["shape"], key
        assert str(tensor.dtype).replace("torch.", "") == params[key]["dtype"], key
    assert len(own) == ref["num_parameter_tensors"] == 568
    assert count_parameters(model) == ref["num_parameters"] == 1_956_470_833


def test_2b_builds_on_meta_without_memory():
    model = build_dit("2b", checkpoint=None, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(b.numel() for b in model.buffers())


def _tiny_inputs(V=3, T=2, H=8, W=8, text_views=(1,), seed=0, ctx_dim=64):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(2, V * 512, ctx_dim)
    for v in text_views:
        ctx[:, v * 512: v * 512 + 7] = torch.randn(2, 7, ctx_dim, generator=gen)
    mask = torch.zeros(2, 1, V * T, H, W)
    mask[:, :, ::T] = 1
    return dict(x_B_C_T_H_W=torch.randn(2, 16, V * T, H, W, generator=gen),
                timesteps_B_T=torch.rand(2, V * T, generator=gen),
                crossattn_emb=ctx, condition_video_input_mask_B_C_T_H_W=mask,
                fps=torch.tensor([10.0, 10.0]),
                view_indices_B_T=torch.tensor([4, 5, 0]).repeat_interleave(T)[None].expand(2, -1))


def test_zero_slot_cross_attention_skip_is_bitwise_exact():
    torch.manual_seed(0)
    model = build_dit("tiny", dtype=torch.float32, n_cameras_emb=7)
    for p in model.parameters():  # make the zero-initialised AdaLN layers matter
        torch.nn.init.normal_(p, std=0.05)
    inputs = _tiny_inputs()
    with torch.no_grad():
        fast = model(**inputs)
        model.skip_empty_text = False
        full = model(**inputs)
    assert torch.equal(fast, full)
    # and the skip is not vacuous: text in a view does change the output
    inputs["crossattn_emb"][:, 0:5] = 1.0
    with torch.no_grad():
        assert not torch.equal(model(**inputs), full)


@pytest.mark.parametrize("text_views", [(1,), ()], ids=["one view with text", "text dropped"])
def test_training_skip_of_empty_text_views_is_exact(text_views):
    """Skipping views with an all-zero caption slot changes no output and no gradient (float64); with
    gradients on, every weight still gets a gradient tensor, zeros where no view has text."""
    torch.manual_seed(0)
    model = build_dit("tiny", dtype=torch.float64, n_cameras_emb=7)
    for p in model.parameters():  # make the zero-initialised AdaLN layers matter
        torch.nn.init.normal_(p, std=0.05)
    inputs = _tiny_inputs(text_views=text_views)
    weights = torch.randn(model(**inputs).shape, generator=torch.Generator().manual_seed(1))
    outs, grads = {}, {}
    for skip in (True, False):
        model.zero_grad(set_to_none=True)
        model.skip_empty_text = skip
        outs[skip] = model(**inputs)
        (outs[skip] * weights).sum().backward()
        grads[skip] = {n: p.grad for n, p in model.named_parameters()}
    assert torch.equal(outs[True], outs[False])
    assert all(g is not None for g in grads[True].values())
    for name, want in grads[False].items():
        assert torch.allclose(grads[True][name], want, rtol=1e-12, atol=1e-18), name
    cross = [g for n, g in grads[True].items() if ".cross_attn." in n]
    assert len(cross) > 0 and all(g.abs().max() == 0 for g in cross) == (not text_views)


def test_bf16_forward_and_backward_run():
    model = build_dit("tiny", dtype=torch.bfloat16, n_cameras_emb=7)
    out = model(**_tiny_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_strict_load_names_missing_extra_and_misshaped_keys():
    model = build_dit("tiny", dtype=torch.float32)
    sd = dict(model.state_dict())
    del sd["blocks.0.mlp.layer1.weight"]
    sd["blocks.0.mlp.bogus.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, 5)
    with pytest.raises(KeyError) as err:
        load_dit_weights(model, sd)
    msg = str(err.value)
    assert "blocks.0.mlp.layer1.weight" in msg and "blocks.0.mlp.bogus.weight" in msg
    assert "final_layer.linear.weight" in msg and "(5, 5)" in msg


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_official_file_formats_prefixes_and_ema(tmp_path, fmt):
    """net./net_ema. prefixes, TE extra state and RoPE buffers in the file; EMA chosen on request."""
    g = load_golden(DIT_GOLDENS[0])
    reg = {k: v.contiguous() for k, v in g["state_dict"].items()}
    ema = {k: (v * 0.5 if v.is_floating_point() and v.numel() else v.clone()) for k, v in reg.items()}
    ckpt = {**{f"net.{k}": v for k, v in reg.items()}, **{f"net_ema.{k}": v for k, v in ema.items()}}
    path = str(tmp_path / f"model{fmt}")
    if fmt == ".pt":
        torch.save(ckpt, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v for k, v in ckpt.items() if v.numel()}, path)
    config = dit_config(g["config"])
    m_reg = build_dit(config, checkpoint=path, dtype=torch.float32)
    m_ema = build_dit(config, checkpoint=path, ema=True, dtype=torch.float32)
    key = "blocks.1.self_attn.q_proj.weight"
    assert torch.equal(m_reg.state_dict()[key], reg[key])
    assert torch.equal(m_ema.state_dict()[key], ema[key])
    with torch.no_grad():
        assert rel_err(m_reg(**g["inputs"]), g["output"]) < 1e-5


class _RunsCode:
    """A pickle that would call print() when unpickled: what a hostile checkpoint could do."""

    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


def test_loading_allows_te_extra_state_and_refuses_code(tmp_path, monkeypatch, capsys):
    """TE's io.BytesIO extra state loads safely (also from a Path); anything needing code runs only on request."""
    import io
    import pathlib

    model = build_dit("tiny", dtype=torch.float32)
    sd = {f"net.{k}": v for k, v in model.state_dict().items()}
    sd["net.blocks.0.self_attn.q_proj._extra_state"] = io.BytesIO(b"fp8 meta")
    torch.save(sd, tmp_path / "te.pt")
    loaded = build_dit("tiny", checkpoint=pathlib.Path(tmp_path / "te.pt"), dtype=torch.float32)
    assert torch.equal(loaded.state_dict()["final_layer.linear.weight"], model.state_dict()["final_layer.linear.weight"])
    torch.save(dict(sd, evil=_RunsCode()), tmp_path / "evil.pt")
    monkeypatch.delenv("COSMOS_MV_TRUST_PICKLE", raising=False)
    with pytest.raises(ValueError, match="evil.pt.*COSMOS_MV_TRUST_PICKLE"):
        build_dit("tiny", checkpoint=str(tmp_path / "evil.pt"), dtype=torch.float32)
    assert "code from the checkpoint ran" not in capsys.readouterr().out
    monkeypatch.setenv("COSMOS_MV_TRUST_PICKLE", "1")
    from model import read_state_dict
    with pytest.warns(UserWarning, match="full unpickling"):
        read_state_dict(tmp_path / "evil.pt")
    assert "code from the checkpoint ran" in capsys.readouterr().out


def test_sizes_beyond_the_rope_range_are_refused():
    model = build_dit("tiny", dtype=torch.float32, n_cameras_emb=7, max_img_w=6)
    with pytest.raises(ValueError, match="8x8 with 2 frames per view exceeds the model's RoPE range"):
        model(**_tiny_inputs())
