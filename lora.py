"""LoRA for the multiview DiT: low-rank adapters on frozen linears, merging, adapter files.

LoRA learns W' = W + (alpha / r) B A with A [r, in] and B [out, r] while W stays frozen. The defaults
are those of the official LoRA experiment (PEFT, r = alpha = 16) on q/k/v/output projections of self-
and cross-attention and on both MLP linears: 10 linears per block, 280 and 22,937,600 parameters on
the 2B net. The wrapper uses PEFT's attribute names, so an injected model's state dict has the
official layout and official LoRA checkpoints load into it strictly (and ours into theirs):
    blocks.0.self_attn.q_proj.base_layer.weight      [out, in]  frozen
    blocks.0.self_attn.q_proj.lora_A.default.weight  [r, in]    Kaiming-uniform (a = sqrt 5)
    blocks.0.self_attn.q_proj.lora_B.default.weight  [out, r]   zeros, so injection changes nothing

Sections: 1. the wrapper  2. injection  3. merging  4. adapter files  5. CLI (merge into a plain file):
    python lora.py --lora run/ckpt.pt --out merged.safetensors             # full LoRA checkpoint
    python lora.py --base official.pt --lora adapters.safetensors --out merged.safetensors
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2")
ADAPTER = "default"  # PEFT's adapter name; it is part of every official key

# ---------------------------------------------------------------------------------------------------
# 1. The wrapper
# ---------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) B(A(x)) around a frozen nn.Linear; `merged` folds B A into base."""

    def __init__(self, base, rank=16, alpha=16, dtype=torch.float32):
        super().__init__()
        self.base_layer = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged = False
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(base.in_features, rank, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, base.out_features, **kw)})
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        # Compute in the activations' dtype: casting the small adapter weights (not x) keeps the saved
        # activations those of the base linear. float32 adapters cast to bf16 here are the official
        # scheme (bf16 weights, float32 master copies in the optimiser) without a second copy. With
        # B = 0 the added term is exact zeros, so y is unchanged bit for bit. In place: the linear's
        # backward does not need its output, and an MLP-sized temporary is worth avoiding at 720p.
        a = self.lora_A[ADAPTER].weight.to(x.dtype)
        b = self.lora_B[ADAPTER].weight.to(x.dtype)
        return y.add_(F.linear(F.linear(x, a), b), alpha=self.scale)

    def delta(self):
        """(alpha / r) B A in float32, the change this adapter makes to the base weight."""
        return self.scale * (self.lora_B[ADAPTER].weight.float() @ self.lora_A[ADAPTER].weight.float())


# ---------------------------------------------------------------------------------------------------
# 2. Injection
# ---------------------------------------------------------------------------------------------------


def lora_modules(model):
    """[(name, LoRALinear)] in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def inject_lora(model, rank=16, alpha=16, targets=DEFAULT_TARGETS, dtype=torch.float32):
    """Wrap every linear whose name ends with a target (PEFT's suffix rule); freeze everything else.

    Returns the wrapped names. Do it after the base weights are loaded (MultiViewDiT.init_weights
    would re-initialise the adapters too) and before FSDP sharding. A draws from the global RNG: seed
    identically on every rank. Adapters are float32 (see LoRALinear.forward) unless `dtype` is given.
    """
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters")
    matches = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731
    names = [n for n, _ in model.named_modules() if any(matches(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(matches(n, t) for n in names)]
    if not names or unmatched:
        raise ValueError(f"no module name ends with the LoRA target(s) {unmatched or list(targets)}")
    not_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if not_linear:
        raise TypeError(f"LoRA targets must be nn.Linear; these are not: {not_linear[:5]}")
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        parent = model.get_submodule(parent)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dtype))
    model.lora_config = dict(rank=rank, alpha=alpha, targets=list(targets))  # for save_lora
    return names


# ---------------------------------------------------------------------------------------------------
# 3. Merging
# ---------------------------------------------------------------------------------------------------
# Folding is computed in float32 and rounded once to the weight's dtype. Into a bf16 weight that rounding
# is coarse (about 2^-9 relative), so train unmerged and merge only to sample or export.


@torch.no_grad()
def merge_lora(model):
    """W <- W + (alpha / r) B A for every adapter, in place; the forward then skips the adapters."""
    for _, m in lora_modules(model):
        if not m.merged:
            w = m.base_layer.weight
            w.copy_((w.float() + m.delta()).to(w.dtype))
            m.merged = True


@torch.no_grad()
def unmerge_lora(model):
    """W <- W - (alpha / r) B A: the base weights back, up to one rounding of W + delta (not bit-exact)."""
    for _, m in lora_modules(model):
        if m.merged:
            w = m.base_layer.weight
            w.copy_((w.float() - m.delta()).to(w.dtype))
            m.merged = False


def merged_state_dict(model):
    """The model's weights with every adapter folded in, under the plain (official, non-LoRA) keys."""
    sd = model.state_dict()
    for name, m in lora_modules(model):
        sd.pop(f"{name}.lora_A.{ADAPTER}.weight")
        sd.pop(f"{name}.lora_B.{ADAPTER}.weight")
        key = f"{name}.base_layer.weight"
        if not m.merged:
            sd[key] = (sd[key].float() + m.delta()).to(sd[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()}


def merge_lora_state_dict(sd, alpha=None, rank=None):
    """Fold PEFT-style entries of a state dict into plain keys: X.weight = W + (alpha / r) B A.

    W is `X.base_layer.weight` (a full LoRA checkpoint) or `X.weight` (a base state dict updated with
    an adapter file). alpha=None means alpha = r, i.e. scale 1: the official experiment and our default
    (16/16). A checkpoint trained with another alpha must pass it; our adapter files carry it in their
    metadata. `rank`, if given, is checked against the A matrices.
    """
    suffix = f".lora_A.{ADAPTER}.weight"
    merged, used = {}, set()
    for key_a in [k for k in sd if k.endswith(suffix)]:
        name = key_a[: -len(suffix)]
        key_b = f"{name}.lora_B.{ADAPTER}.weight"
        key_w = f"{name}.base_layer.weight" if f"{name}.base_layer.weight" in sd else f"{name}.weight"
        missing = [k for k in (key_b, key_w) if k not in sd]
        if missing:
            raise KeyError(f"LoRA entries of {name} are incomplete: missing {missing}")
        a, b, w = sd[key_a], sd[key_b], sd[key_w]
        r = a.shape[0]
        if rank is not None and r != rank:
            raise ValueError(f"{key_a}: rank {r}, expected {rank}")
        if a.shape[1] != w.shape[1] or tuple(b.shape) != (w.shape[0], r):
            raise ValueError(f"LoRA shapes of {name} do not fit: W {tuple(w.shape)}, "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)} (want A [r, in], B [out, r])")
        scale = (r if alpha is None else alpha) / r
        merged[key_w] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        used |= {key_a, key_b}
    stray = [k for k in sd if ".lora_" in k and k not in used]
    if stray:
        raise KeyError(f"unsupported LoRA entries (only lora_A/lora_B.{ADAPTER}): {stray[:5]}")
    return {k.replace(".base_layer.", "."): merged.get(k, v) for k, v in sd.items() if k not in used}


# ---------------------------------------------------------------------------------------------------
# 4. Adapter files: safetensors with only A and B, {rank, alpha, targets} in the metadata
# ---------------------------------------------------------------------------------------------------


def lora_state_dict(model):
    """The adapter tensors alone (official keys). Gathers FSDP2 shards: then call it on every rank."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def save_lora(path, model):
    """Write the adapters to a safetensors file atomically (call on every rank; rank 0 writes)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if not sd:
        raise ValueError("the model has no LoRA adapters; call inject_lora first")
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    cfg = model.lora_config
    metadata = {"rank": json.dumps(cfg["rank"]), "alpha": json.dumps(cfg["alpha"]),
                "targets": json.dumps(cfg["targets"])}
    _save_atomically(sd, path, metadata)


def _save_atomically(sd, path, metadata=None):
    """safetensors file written under a temporary name, then renamed: never half a file at `path`."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(sd, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_lora(path):
    """(adapter tensors, {rank, alpha, targets}) from an adapter file, with clear errors."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # e.g. a .pt checkpoint given as an adapter file
        raise ValueError(f"{path}: not a safetensors adapter file ({e})") from e
    try:
        config = {k: json.loads(metadata[k]) for k in ("rank", "alpha", "targets")}
    except (KeyError, ValueError):
        raise ValueError(f"{path}: not a LoRA adapter file (metadata needs rank, alpha, targets; "
                         f"found {sorted(metadata)})") from None
    return load_file(path), config


@torch.no_grad()
def load_lora(path, model):
    """Load an adapter file strictly into `model`, injecting adapters first if it has none.

    Load before FSDP sharding (sampling never shards; training resumes from its own checkpoints).
    Returns the file's {rank, alpha, targets}.
    """
    sd, config = read_lora(path)
    if not lora_modules(model):
        inject_lora(model, config["rank"], config["alpha"], config["targets"])
    modules = lora_modules(model)
    if any(m.merged for _, m in modules):
        raise ValueError(f"{path}: the model's adapters are merged; unmerge_lora first")
    have = {(m.rank, m.alpha) for _, m in modules}
    if have != {(config["rank"], config["alpha"])}:
        raise ValueError(f"{path}: adapters have rank {config['rank']}, alpha {config['alpha']}; "
                         f"the model's have (rank, alpha) {sorted(have)}")
    own = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    misshaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise KeyError(f"{path} does not match the model's adapters: missing {missing[:5]} "
                       f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                       f"wrong shape {misshaped[:5]}")
    for k, v in own.items():
        v.copy_(sd[k])
    return config


# ---------------------------------------------------------------------------------------------------
# 5. CLI: write a plain merged checkpoint (loadable anywhere, including the official multiview script)
# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    """Merge a LoRA checkpoint (full, PEFT layout) or base + adapter file into plain DiT weights."""
    from model import read_state_dict, select_dit_weights
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--lora", required=True, help="full LoRA checkpoint (.pt/.safetensors) or adapter file")
    p.add_argument("--base", help="base DiT checkpoint, needed when --lora is an adapter file")
    p.add_argument("--ema", action="store_true", help="take the net_ema. weights of a full checkpoint")
    p.add_argument("--alpha", type=float, help="LoRA alpha of a full checkpoint (default: the training run's "
                   "lora_alpha for our checkpoints, else alpha = rank as in the official experiment)")
    p.add_argument("--out", required=True, help="output .safetensors with the official plain keys")
    args = p.parse_args(argv)
    if args.base and (args.ema or args.alpha is not None):
        p.error("--ema and --alpha apply to a full checkpoint; with --base the adapter file sets alpha "
                "(pick EMA weights for the base when exporting it)")
    if args.base:
        sd = select_dit_weights(read_state_dict(args.base), source=args.base)
        adapters, config = read_lora(args.lora)
        sd = merge_lora_state_dict({**sd, **adapters}, alpha=config["alpha"], rank=config["rank"])
    else:  # folding is by key suffix, so it works before the net./net_ema. prefix is picked
        alpha = args.alpha
        if alpha is None:  # our checkpoints keep their training config (with lora_alpha) next to them
            from sample import find_run_config
            run = find_run_config(args.lora) or {}
            alpha = run.get("lora_alpha") if run.get("lora_rank") else None
        lora_sd = read_state_dict(args.lora)
        if not any(".base_layer." in k for k in lora_sd) and any(".lora_A." in k for k in lora_sd):  # adapters alone
            p.error(f"--lora {args.lora} holds no base weights (an adapter file?): give the base with --base")
        sd = merge_lora_state_dict(lora_sd, alpha=alpha)
        sd = select_dit_weights(sd, ema=args.ema, source=args.lora)
    _save_atomically({k: v.contiguous() for k, v in sd.items()}, args.out)
    print(f"wrote {len(sd)} tensors to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: the message names the file
        print(f"lora.py: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        sys.exit(1)
