"""LoRA adapters: official parameter count and key layout, exactness of injection, merge/unmerge,
folding of official PEFT-style checkpoints, adapter files and the merge CLI."""

import copy
import json
import os
import sys

import pytest
import torch

import lora
from lora import (DEFAULT_TARGETS, LoRALinear, inject_lora, load_lora, lora_modules, lora_state_dict,
                  merge_lora, merge_lora_state_dict, merged_state_dict, save_lora, unmerge_lora)
from model import build_dit, load_dit_weights

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
U = 2.0 ** -24  # float32 unit roundoff


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_dit("tiny", dtype=torch.float32).eval()


def inputs(seed=1, B=1, V=2, T=2, H=8, W=8):
    """Random inputs for the tiny DiT (both views captioned, so cross-attention adapters matter)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_B_C_T_H_W=torch.randn(B, 16, V * T, H, W, generator=g),
        timesteps_B_T=torch.rand(B, V * T, generator=g),
        crossattn_emb=torch.randn(B, V * 512, 64, generator=g),
        condition_video_input_mask_B_C_T_H_W=(torch.rand(B, 1, V * T, 1, 1, generator=g) > 0.5)
        .float().expand(B, 1, V * T, H, W),
        fps=torch.tensor([10.0]))


def trained_lora_model(seed=0, rank=16, alpha=16):
    """A tiny DiT with adapters after one AdamW step towards a random target, and its frozen base."""
    model = tiny(seed)
    base = copy.deepcopy(model)
    inject_lora(model, rank=rank, alpha=alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = inputs()
    target = torch.randn_like(x["x_B_C_T_H_W"])
    loss = (model(**x) - target).pow(2).mean()
    loss.backward()
    opt.step()
    return model.eval(), base, params


def test_2b_count_and_official_layout_on_meta():
    model = build_dit("2b", device="meta", dtype=torch.bfloat16)
    names = inject_lora(model)
    assert len(names) == 280 == len(lora_modules(model))
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 22_937_600
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in trainable)
    # Independent count: r * (in + out) over the official key list's linears that PEFT's suffix rule hits.
    with open(os.path.join(GOLDEN, "dit_2b_keys.json")) as f:
        entries = json.load(f)["entries"]
    hit = [e for e in entries if e["key"].endswith(".weight")
           and any(e["key"][: -len(".weight")].endswith("." + t) for t in DEFAULT_TARGETS)]
    assert len(hit) == 280
    assert sum(16 * (e["shape"][0] + e["shape"][1]) for e in hit) == 22_937_600
    # Every targeted official key now lives under the PEFT layout the official LoRA checkpoints use.
    sd = model.state_dict()
    for e in hit:
        name = e["key"][: -len(".weight")]
        out_f, in_f = e["shape"]
        assert list(sd[f"{name}.base_layer.weight"].shape) == [out_f, in_f]
        assert list(sd[f"{name}.lora_A.default.weight"].shape) == [16, in_f]
        assert list(sd[f"{name}.lora_B.default.weight"].shape) == [out_f, 16]
        assert sd[f"{name}.lora_A.default.weight"].dtype == torch.float32  # master-precision adapters
    assert len(sd) == 568 + 2 * 280


def test_fresh_injection_is_bitwise_identity():
    model = tiny()
    x = inputs()
    with torch.no_grad():
        ref = model(**x)
    inject_lora(model)
    a = model.blocks[0].mlp.layer1.lora_A["default"].weight
    bound = 1 / 256 ** 0.5  # Kaiming-uniform with a = sqrt(5) is U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / 3 ** 0.5
    assert all(m.lora_B["default"].weight.eq(0).all() for _, m in lora_modules(model))
    with torch.no_grad():
        assert torch.equal(model(**x), ref)
        merge_lora(model)  # B = 0: merging adds exact zeros
        assert torch.equal(model(**x), ref)
        unmerge_lora(model)
        assert torch.equal(model(**x), ref)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model)

    # bf16 base with float32 adapters (the training setup): still the identity, bit for bit.
    model = build_dit("tiny", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = model(**x)
        inject_lora(model)
        assert torch.equal(model(**x), ref)


def test_training_step_touches_only_adapters_and_merge_matches():
    model, base, params = trained_lora_model()
    names = {id(p): k for k, p in model.named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # No base weight moved: the model minus its adapters is the original, bit for bit.
    plain = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base_sd = base.state_dict()
    assert plain.keys() == base_sd.keys() and all(torch.equal(plain[k], base_sd[k]) for k in plain)
    assert any(m.lora_B["default"].weight.abs().max() > 0 for _, m in lora_modules(model))

    x = inputs(seed=2)
    with torch.no_grad():
        out_base = base(**x)
        out_lora = model(**x)
        merge_lora(model)
        out_merged = model(**x)
    change = (out_lora - out_base).norm() / out_base.norm()
    assert change > 1e-3  # the adapters do something, so the next check can fail
    assert ((out_merged - out_lora).norm() / out_base.norm()) < 1e-5 * max(1.0, change.item())

    # The merged weights against float64 math: one rounding of W + B A (scale 1) plus the rank-16 dot.
    for name, m in lora_modules(model):
        w0 = base.get_submodule(name).weight.double()
        a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
        ref = w0 + b @ a
        err = (m.base_layer.weight.double() - ref).abs()
        assert (err <= U * ref.abs() + 18 * U * (b.abs() @ a.abs()) + 1e-30).all(), name

    # Unmerge subtracts the same float32 delta again: W comes back up to the rounding of (W + d) and of
    # the subtraction, i.e. |W' - W| <= u (|W| + |W + d|). Not bit-exact in general (by design: no copy).
    delta = {name: m.delta().double() for name, m in lora_modules(model)}
    unmerge_lora(model)
    worst = 0.0
    for name, m in lora_modules(model):
        w0 = base.get_submodule(name).weight.double()
        err = (m.base_layer.weight.double() - w0).abs()
        assert (err <= U * (w0.abs() + (w0 + delta[name]).abs()) * (1 + 1e-6)).all(), name
        worst = max(worst, (err.max() / w0.abs().max()).item())
    assert worst < 1e-6  # relative to the weight's scale
    with torch.no_grad():
        assert ((model(**x) - out_lora).norm() / out_base.norm()) < 1e-5


def test_merge_lora_state_dict_of_official_layout():
    model, base, _ = trained_lora_model()
    official = {f"net.{k}": v for k, v in model.state_dict().items()}  # how a PEFT-trained file looks
    folded = merge_lora_state_dict(model.state_dict())
    ref = merged_state_dict(model)
    assert folded.keys() == ref.keys() == base.state_dict().keys()
    assert all(torch.equal(folded[k], ref[k]) for k in ref)

    # Loading the official-layout file into a plain model folds it (select_dit_weights -> lora).
    plain = tiny(seed=5)
    load_dit_weights(plain, official)
    merge_lora(model)  # merged in place: the same float32 fold, so the same weights bit for bit
    x = inputs(seed=3)
    with torch.no_grad():
        assert torch.equal(plain(**x), model(**x))
    unmerge_lora(model)

    # An injected model takes the official layout strictly.
    other = tiny(seed=7)
    inject_lora(other)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(**x), model(**x))


def test_alpha_scale_and_bad_entries():
    model, base, _ = trained_lora_model(rank=4, alpha=8)  # scale 2
    sd = model.state_dict()
    folded = merge_lora_state_dict(sd, alpha=8, rank=4)
    ref = merged_state_dict(model)
    assert all(torch.equal(folded[k], ref[k]) for k in ref)
    name = "blocks.1.cross_attn.k_proj"
    a = sd[f"{name}.lora_A.default.weight"].double()
    b = sd[f"{name}.lora_B.default.weight"].double()
    expect = base.state_dict()[f"{name}.weight"].double() + 2.0 * b @ a
    assert torch.allclose(folded[f"{name}.weight"].double(), expect, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(merge_lora_state_dict(sd)[f"{name}.weight"].double(), expect,
                              rtol=1e-6, atol=1e-7)  # default alpha = r is scale 1, not 2

    with pytest.raises(ValueError, match="rank 4, expected 16"):
        merge_lora_state_dict(sd, rank=16)
    broken = dict(sd)
    del broken[f"{name}.lora_B.default.weight"]
    with pytest.raises(KeyError, match=f"{name}.*incomplete"):
        merge_lora_state_dict(broken)
    stray = dict(sd, **{f"{name}.lora_A.other.weight": sd[f"{name}.lora_A.default.weight"]})
    with pytest.raises(KeyError, match="unsupported LoRA entries"):
        merge_lora_state_dict(stray)


def test_save_load_round_trip(tmp_path):
    model, _, _ = trained_lora_model()
    path = str(tmp_path / "adapters.safetensors")
    save_lora(path, model)
    assert os.listdir(tmp_path) == ["adapters.safetensors"]  # atomic: no temp file left behind
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["rank"]) == 16 and json.loads(meta["alpha"]) == 16
    assert json.loads(meta["targets"]) == list(DEFAULT_TARGETS)
    assert keys == set(lora_state_dict(model)) and len(keys) == 2 * 2 * 10

    fresh = tiny(seed=0)  # same base, adapters injected from the file's metadata
    assert load_lora(path, fresh)["rank"] == 16
    assert all(isinstance(fresh.get_submodule(n), LoRALinear) for n, _ in lora_modules(model))
    x = inputs(seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(**x), model(**x))

    wrong_rank = tiny()
    inject_lora(wrong_rank, rank=8, alpha=8)
    with pytest.raises(ValueError, match="adapters.safetensors.*rank 16"):
        load_lora(path, wrong_rank)
    fewer = tiny()
    inject_lora(fewer, targets=("q_proj",))
    with pytest.raises(KeyError, match="adapters.safetensors does not match.*unexpected"):
        load_lora(path, fewer)
    merged = tiny()
    load_lora(path, merged)
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged"):
        load_lora(path, merged)
    plain_file = str(tmp_path / "plain.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, plain_file)
    with pytest.raises(ValueError, match="plain.safetensors: not a LoRA adapter file"):
        load_lora(plain_file, tiny())
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(str(tmp_path / "missing.safetensors"), tiny())


def test_inject_errors():
    with pytest.raises(ValueError, match="no module name ends with"):
        inject_lora(tiny(), targets=("nope",))
    with pytest.raises(ValueError, match=r"target\(s\) \[' k_proj'\]"):  # one target matching nothing is named
        inject_lora(tiny(), targets=("q_proj", " k_proj"))
    with pytest.raises(TypeError, match="must be nn.Linear"):
        inject_lora(tiny(), targets=("self_attn",))


def test_cli_writes_plain_merged_weights(tmp_path, monkeypatch, capsys):
    model, base, _ = trained_lora_model()
    ref = merged_state_dict(model)
    from safetensors.torch import load_file, save_file
    base_file, adapters, out = (str(tmp_path / n)
                                for n in ("base.safetensors", "a.safetensors", "m.safetensors"))
    save_file(base.state_dict(), base_file)
    save_lora(adapters, model)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--base", base_file, "--lora", adapters, "--out", out])
    lora.main()
    got = load_file(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    # A full training checkpoint (net. and net_ema. in the PEFT layout): --ema picks the EMA weights.
    full = str(tmp_path / "ckpt.pt")
    ema_sd = {k: v + 1 if ".lora_B." in k else v for k, v in model.state_dict().items()}
    torch.save({**{f"net.{k}": v for k, v in model.state_dict().items()},
                **{f"net_ema.{k}": v for k, v in ema_sd.items()}}, full)
    monkeypatch.setattr(sys, "argv", ["lora.py", "--lora", full, "--ema", "--out", out])
    lora.main()
    got = load_file(out)
    want = merge_lora_state_dict(ema_sd)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # Misuse is refused with the reason, and nothing is written.
    os.remove(out)
    for argv, message in ((["--base", base_file, "--lora", adapters, "--alpha", "1"], "apply to a full checkpoint"),
                          (["--lora", adapters], "holds no base weights"),
                          (["--base", base_file, "--lora", full], "ckpt.pt: not a safetensors adapter file")):
        monkeypatch.setattr(sys, "argv", ["lora.py", *argv, "--out", out])
        if "safetensors adapter" in message:
            with pytest.raises(ValueError, match=message):
                lora.main()
        else:
            with pytest.raises(SystemExit):
                lora.main()
            assert message in capsys.readouterr().err
        assert not os.path.exists(out) and not any(p.name.startswith("m.safetensors.tmp") for p in tmp_path.iterdir())
