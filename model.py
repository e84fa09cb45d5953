"""The Cosmos-Predict2 2B multiview DiT (and the Wan2.1 VAE), written to load the official weights.

One file, read top to bottom:
  1. configs       named presets (`2b` is the official network, small ones for tests and the demo)
  2. building blocks  RMSNorm, 3D RoPE for several views, timestep embedding, patch embed
  3. the DiT       attention layers, the AdaLN-LoRA block, final layer, MultiViewDiT
  4. loading       official `.pt`/`.safetensors` and our checkpoints, strict, with clear errors
  5. the VAE       Wan2.1 causal video VAE (appended below)

Module names follow the official checkpoint's keys exactly (`blocks.3.self_attn.q_proj.weight`, ...)
so `load_state_dict(strict=True)` works on the released file. Everything else is ours.

Layout conventions: a latent video is x_BCTHW with the views stacked along time, view-major,
T = V * T_per_view ("(V T)"). Tokens are flattened in (view, frame, row, column) order.
"""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

from attention import attention

# ---------------------------------------------------------------------------------------------------
# 1. Configs
# ---------------------------------------------------------------------------------------------------

DIT_DEFAULTS = dict(
    in_channels=16,  # latent channels of the Wan2.1 VAE
    out_channels=16,
    patch_spatial=2,
    patch_temporal=1,
    model_channels=2048,
    num_blocks=28,
    num_heads=16,
    mlp_ratio=4.0,
    crossattn_emb_channels=1024,  # T5-XXL width
    adaln_lora_dim=256,
    n_cameras_emb=7,  # rows of the view-embedding table (= its width, concatenated as channels)
    state_t=8,  # latent frames per view the model was trained with (29 pixel frames)
    max_img_h=240,  # RoPE table limits, in latent pixels
    max_img_w=240,
    max_frames=128,
    rope_h_extrapolation_ratio=3.0,
    rope_w_extrapolation_ratio=3.0,
    rope_t_extrapolation_ratio=8.0 / 24.0,
    rope_base_fps=24.0,  # temporal RoPE positions are t * base_fps / fps
    text_slot_tokens=512,  # each view owns a 512-token slot of the cross-attention context
)

DIT_PRESETS = {
    # The official Cosmos-Predict2-2B-Multiview network: 28 x 2048, 16 heads, 7 camera embeddings.
    "2b": dict(DIT_DEFAULTS),
    # The golden test network (tests/golden/dit_tiny.pt): head dim 128 like the real one.
    "tiny": dict(DIT_DEFAULTS, model_channels=256, num_blocks=2, num_heads=2, adaln_lora_dim=32,
                 crossattn_emb_channels=64, n_cameras_emb=4, state_t=2),
    # The CPU demo: small enough to train in minutes on two cores, same code paths as 2b.
    "demo": dict(DIT_DEFAULTS, model_channels=128, num_blocks=4, num_heads=2, adaln_lora_dim=32,
                 crossattn_emb_channels=64, state_t=2),
}

# Constructor arguments of the official MultiViewDiT that do not change the math we implement;
# accepted (and checked where it matters) so a stored official config builds our model directly.
_OFFICIAL_FIXED = dict(concat_padding_mask=True, use_adaln_lora=True, pos_emb_cls="rope3d",
                       extra_per_block_abs_pos_emb=False, concat_view_embedding=True)
_OFFICIAL_IGNORED = {"atten_backend", "pos_emb_learnable", "pos_emb_interpolation", "sac_config",
                     "layer_mask", "natten_parameters", "rope_enable_fps_modulation",
                     "crossattn_proj_in_channels", "view_condition_dim", "min_fps", "max_fps"}


def dit_config(preset="2b", **overrides):
    """Resolve a preset name (or an official constructor-kwargs dict) plus overrides into our config."""
    if isinstance(preset, dict):  # an official config, e.g. the one stored in a golden file
        official = dict(preset)
        for key, want in _OFFICIAL_FIXED.items():
            if key in official and official.pop(key) != want:
                raise ValueError(f"official config has {key}={preset[key]!r}; only {want!r} is supported")
        if official.get("crossattn_proj_in_channels", official.get("crossattn_emb_channels")) != \
                official.get("crossattn_emb_channels"):
            raise ValueError("a context projection (crossattn_proj_in_channels != crossattn_emb_channels) "
                             "is not supported")
        if official.get("view_condition_dim", official.get("n_cameras_emb")) != official.get("n_cameras_emb"):
            raise ValueError("view_condition_dim must equal n_cameras_emb")
        base = {k: v for k, v in official.items() if k not in _OFFICIAL_IGNORED}
        config = dict(DIT_DEFAULTS, **base)
    else:
        if preset not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
        config = dict(DIT_PRESETS[preset])
    unknown = set(overrides) - set(DIT_DEFAULTS)
    unknown |= set(config) - set(DIT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DiT config keys: {sorted(unknown)}")
    config.update(overrides)
    return config


# ---------------------------------------------------------------------------------------------------
# 2. Building blocks
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def layer_norm(x, eps=1e-6):
    """LayerNorm without affine parameters (the DiT's pre-modulation norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def rope_angles(head_dim, n_views, frames, height, width, fps=None, *, h_ratio=3.0, w_ratio=3.0,
                t_ratio=1.0 / 3.0, base_fps=24.0, frame_offset=0, device=None):
    """RoPE rotation angles [V*T*h*w, 1, 1, head_dim] (fp32) for the multiview token layout.

    The head dim splits into t/h/w parts (44/42/42 at 128). Each axis uses NTK-scaled frequencies
    theta^(-2i/dim) with theta = 10000 * ratio^(dim/(dim-2)). Positions restart at 0 in every view
    (views differ only by their view embedding). Temporal positions are frame * base_fps / fps, as
    the official multiview embedder always does. `frame_offset` shifts the frame positions of a
    context-parallel shard. The 64 angles per token are duplicated for the rotate-half pairing.
    """
    dim_h = head_dim // 6 * 2
    dim_w = dim_h
    dim_t = head_dim - dim_h - dim_w

    def freqs(dim, ratio):
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
        return 1.0 / (theta ** exponents)

    pos_t = torch.arange(frame_offset, frame_offset + frames, device=device, dtype=torch.float32)
    if fps is not None:
        fps = float(fps[0]) if torch.is_tensor(fps) else float(fps)  # one fps for the batch
        pos_t = pos_t / fps * base_fps
    ang_t = torch.outer(pos_t, freqs(dim_t, t_ratio))  # [T, dim_t/2]
    ang_h = torch.outer(torch.arange(height, device=device, dtype=torch.float32), freqs(dim_h, h_ratio))
    ang_w = torch.outer(torch.arange(width, device=device, dtype=torch.float32), freqs(dim_w, w_ratio))
    angles_THWD = torch.cat([
        ang_t[:, None, None, :].expand(frames, height, width, -1),
        ang_h[None, :, None, :].expand(frames, height, width, -1),
        ang_w[None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1)
    angles = torch.cat([angles_THWD, angles_THWD], dim=-1).reshape(-1, head_dim)  # [T*h*w, D]
    angles = angles.repeat(n_views, 1)  # identical table for every view, view-major
    return angles[:, None, None, :]


def apply_rope(x_BSHD, angles_S11D):
    """Rotate q or k ([B, S, H, D]) by the angles, rotate-half convention, in fp32."""
    x = x_BSHD.float()
    cos, sin = angles_S11D[:, 0].cos(), angles_S11D[:, 0].sin()  # [S, 1, D]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_BSHD.dtype)


def timestep_sinusoid(t, dim):
    """concat(cos, sin) embedding of per-frame timesteps: [B, T] -> [B, T, dim], fp32 math."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(t.dtype)


class Timesteps(nn.Module):
    """Parameter-free sinusoid (slot 0 of `t_embedder`, kept so the checkpoint keys line up)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t_BT):
        return timestep_sinusoid(t_BT, self.dim)


class TimestepEmbedding(nn.Module):
    """The AdaLN-LoRA MLP: sinusoid -> SiLU MLP -> the shared [B, T, 3D] modulation term."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid_BTD):
        return self.linear_2(F.silu(self.linear_1(sinusoid_BTD)))


class Patchify(nn.Module):
    """[B, C, T, H, W] -> [B, T, h, w, C*pt*p*p] with the channel as the OUTERMOST factor."""

    def __init__(self, patch_spatial, patch_temporal):
        super().__init__()
        self.p, self.pt = patch_spatial, patch_temporal

    def forward(self, x):
        return rearrange(x, "b c (t r) (h m) (w n) -> b t h w (c r m n)", r=self.pt, m=self.p, n=self.p)


class PatchEmbed(nn.Module):
    """Patchify then one bias-free linear; `proj.1` is the checkpoint's `x_embedder.proj.1.weight`."""

    def __init__(self, in_channels, dim, patch_spatial, patch_temporal):
        super().__init__()
        patch_dim = in_channels * patch_spatial * patch_spatial * patch_temporal
        self.proj = nn.Sequential(Patchify(patch_spatial, patch_temporal), nn.Linear(patch_dim, dim, bias=False))

    def forward(self, x_BCTHW):
        return self.proj(x_BCTHW)


# ---------------------------------------------------------------------------------------------------
# 3. The DiT
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with bias-free projections and per-head RMSNorm on q and k."""

    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.k_norm = RMSNorm(self.head_dim)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD, context_BMD=None, rope_angles=None, attn_fn=attention):
        context_BMD = x_BSD if context_BMD is None else context_BMD
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))  # noqa: E731  [B, S, H, hd]
        q = self.q_norm(heads(self.q_proj(x_BSD)))
        k = self.k_norm(heads(self.k_proj(context_BMD)))
        v = heads(self.v_proj(context_BMD))
        if rope_angles is not None:
            q, k = apply_rope(q, rope_angles), apply_rope(k, rope_angles)
        out_BSHD = attn_fn(q, k, v)
        return self.output_proj(out_BSHD.flatten(-2))


class MLP(nn.Module):
    """Bias-free GELU (exact erf) MLP; `layer1`/`layer2` as in the checkpoint."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


def adaln_modulation(dim, lora_dim, n_chunks):
    """SiLU -> down (dim->lora_dim) -> up (lora_dim->n_chunks*dim); indices 1, 2 hold the weights."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False),
                         nn.Linear(lora_dim, n_chunks * dim, bias=False))


def modulate(x_BTND, shift_BTD, scale_BTD):
    """LN(x) * (1 + scale) + shift, the AdaLN modulation broadcast over each frame's tokens."""
    return layer_norm(x_BTND) * (1 + scale_BTD[:, :, None]) + shift_BTD[:, :, None]


class Block(nn.Module):
    """Self-attention over all views jointly, per-view cross-attention to T5, GELU MLP; AdaLN-LoRA."""

    def __init__(self, dim, context_dim, num_heads, mlp_ratio, adaln_lora_dim):
        super().__init__()
        self.self_attn = Attention(dim, dim, num_heads)
        self.cross_attn = Attention(dim, context_dim, num_heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_modulation(dim, adaln_lora_dim, 3)

    def forward(self, x_BTND, t_emb_BTD, adaln_lora_BT3D, context_BVMD, rope, active_views, self_attn_fn):
        B, T, N, D = x_BTND.shape
        V = context_BVMD.shape[1]

        # Self-attention: one sequence of all V*T_v*h*w tokens.
        shift, scale, gate = (self.adaln_modulation_self_attn(t_emb_BTD) + adaln_lora_BT3D).chunk(3, dim=-1)
        h = modulate(x_BTND, shift, scale).reshape(B, T * N, D)
        h = self.self_attn(h, rope_angles=rope, attn_fn=self_attn_fn).reshape(B, T, N, D)
        x_BTND = x_BTND + gate[:, :, None] * h

        # Cross-attention: each view's tokens see only that view's 512-token T5 slot. A slot that is
        # all zeros gives k = v = 0, hence exactly zero output; such views are skipped (exact).
        shift, scale, gate = (self.adaln_modulation_cross_attn(t_emb_BTD) + adaln_lora_BT3D).chunk(3, dim=-1)
        h_BVLD = modulate(x_BTND, shift, scale).reshape(B, V, (T // V) * N, D)
        out_BVLD = torch.zeros_like(h_BVLD)
        for v in range(V):
            if active_views[v]:
                out_BVLD[:, v] = self.cross_attn(h_BVLD[:, v], context_BVMD[:, v])
        x_BTND = x_BTND + gate[:, :, None] * out_BVLD.reshape(B, T, N, D)

        shift, scale, gate = (self.adaln_modulation_mlp(t_emb_BTD) + adaln_lora_BT3D).chunk(3, dim=-1)
        x_BTND = x_BTND + gate[:, :, None] * self.mlp(modulate(x_BTND, shift, scale))
        return x_BTND


class FinalLayer(nn.Module):
    """AdaLN (shift, scale only) then a linear to the patch's output values."""

    def __init__(self, dim, adaln_lora_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=False)
        self.adaln_modulation = adaln_modulation(dim, adaln_lora_dim, 2)

    def forward(self, x_BTND, t_emb_BTD, adaln_lora_BT3D):
        D = x_BTND.shape[-1]
        shift, scale = (self.adaln_modulation(t_emb_BTD) + adaln_lora_BT3D[..., : 2 * D]).chunk(2, dim=-1)
        return self.linear(modulate(x_BTND, shift, scale))


class MultiViewDiT(nn.Module):
    """Cosmos-Predict2 multiview video DiT: predicts the rectified-flow velocity of a view-major latent."""

    def __init__(self, **config):
        super().__init__()
        self.config = c = dit_config(config) if config else dit_config("2b")
        dim = c["model_channels"]
        self.num_heads = c["num_heads"]
        self.patch_spatial, self.patch_temporal = c["patch_spatial"], c["patch_temporal"]
        self.out_channels = c["out_channels"]
        self.n_cameras_emb = c["n_cameras_emb"]
        self.text_slot_tokens = c["text_slot_tokens"]
        # Input channels: latent + condition mask + padding mask + view embedding.
        in_channels = c["in_channels"] + 1 + 1 + c["n_cameras_emb"]
        self.x_embedder = PatchEmbed(in_channels, dim, self.patch_spatial, self.patch_temporal)
        self.t_embedder = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim)
        self.blocks = nn.ModuleList([
            Block(dim, c["crossattn_emb_channels"], c["num_heads"], c["mlp_ratio"], c["adaln_lora_dim"])
            for _ in range(c["num_blocks"])
        ])
        out_dim = self.patch_spatial * self.patch_spatial * self.patch_temporal * self.out_channels
        self.final_layer = FinalLayer(dim, c["adaln_lora_dim"], out_dim)
        self.view_embeddings = nn.Embedding(c["n_cameras_emb"], c["n_cameras_emb"])
        self.checkpoint_blocks = False  # activation checkpointing per block (train.py switches it)
        self.skip_empty_text = True  # skip cross-attention for views whose T5 slot is all zeros (exact)
        self.self_attn_fn = attention  # ring attention replaces this under context parallelism
        self.frame_offset = 0  # first latent frame (per view) held by this rank under context parallelism

    @torch.no_grad()
    def init_weights(self):
        """The official from-scratch init: trunc-normal(1/sqrt(fan_in)), zero AdaLN up-projections."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = 1.0 / math.sqrt(m.in_features)
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for block in self.blocks:
            for mod in (block.adaln_modulation_self_attn, block.adaln_modulation_cross_attn,
                        block.adaln_modulation_mlp):
                mod[2].weight.zero_()
        self.final_layer.adaln_modulation[2].weight.zero_()
        nn.init.normal_(self.view_embeddings.weight)

    def rope(self, n_views, frames_per_view, h, w, fps, device):
        """RoPE angles for this layout (frames offset by `frame_offset` under context parallelism)."""
        c = self.config
        return rope_angles(c["model_channels"] // c["num_heads"], n_views, frames_per_view, h, w, fps,
                           h_ratio=c["rope_h_extrapolation_ratio"], w_ratio=c["rope_w_extrapolation_ratio"],
                           t_ratio=c["rope_t_extrapolation_ratio"], base_fps=c["rope_base_fps"],
                           frame_offset=self.frame_offset, device=device)

    def forward(self, x_B_C_T_H_W, timesteps_B_T, crossattn_emb, condition_video_input_mask_B_C_T_H_W,
                fps=None, padding_mask=None, view_indices_B_T=None):
        """Velocity prediction [B, 16, V*T, H, W] for the view-major latent x (float32 output).

        crossattn_emb is [B, V*512, D_text]: the number of views is its length / 512.
        timesteps_B_T is t = sigma / (1 + sigma) per latent frame.
        """
        dtype = self.x_embedder.proj[1].weight.dtype
        B, _, T, H, W = x_B_C_T_H_W.shape
        V = crossattn_emb.shape[1] // self.text_slot_tokens
        if V * self.text_slot_tokens != crossattn_emb.shape[1] or V == 0 or T % V:
            raise ValueError(f"context length {crossattn_emb.shape[1]} must be n_views * {self.text_slot_tokens} "
                             f"with n_views dividing the {T} latent frames")
        p, pt = self.patch_spatial, self.patch_temporal
        if H % p or W % p or (T // V) % pt:
            raise ValueError(f"latent size {H}x{W} must be divisible by the patch size {p}")

        # Input channels: [latent, condition mask, padding mask, view embedding].
        if padding_mask is None:
            padding_mask = torch.zeros(B, 1, H, W, device=x_B_C_T_H_W.device, dtype=dtype)
        padding_mask = F.interpolate(padding_mask.float(), size=(H, W), mode="nearest")
        if view_indices_B_T is None:
            view_indices_B_T = torch.arange(V, device=x_B_C_T_H_W.device).repeat_interleave(T // V)[None].expand(B, -1)
        view_emb_BTC = self.view_embeddings(view_indices_B_T.clamp(max=self.n_cameras_emb - 1))
        x = torch.cat([
            x_B_C_T_H_W.to(dtype),
            condition_video_input_mask_B_C_T_H_W.to(dtype),
            padding_mask.to(dtype)[:, :, None].expand(B, 1, T, H, W),
            view_emb_BTC.to(dtype).permute(0, 2, 1)[..., None, None].expand(B, -1, T, H, W),
        ], dim=1)
        x_BThwD = self.x_embedder(x)  # [B, T, h, w, D]
        _, Tt, h, w, D = x_BThwD.shape
        x_BTND = x_BThwD.reshape(B, Tt, h * w, D)

        # Time: the raw sinusoid, RMS-normed, drives every AdaLN; its MLP is the shared LoRA term.
        sinusoid_BTD = self.t_embedder[0](timesteps_B_T.to(dtype))
        adaln_lora_BT3D = self.t_embedder[1](sinusoid_BTD)
        t_emb_BTD = self.t_embedding_norm(sinusoid_BTD)

        rope = self.rope(V, Tt // V, h, w, fps, x.device)
        context_BVMD = crossattn_emb.to(dtype).reshape(B, V, self.text_slot_tokens, -1)
        active_views = context_BVMD.flatten(2).ne(0).any(-1).any(0).tolist()  # views with any text
        if not self.skip_empty_text:
            active_views = [True] * V

        for block in self.blocks:
            args = (x_BTND, t_emb_BTD, adaln_lora_BT3D, context_BVMD, rope, active_views, self.self_attn_fn)
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x_BTND = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x_BTND = block(*args)

        out = self.final_layer(x_BTND, t_emb_BTD, adaln_lora_BT3D).reshape(B, Tt, h, w, -1)
        # Unpatchify with the channel as the INNERMOST factor (unlike the patch embed).
        out = rearrange(out, "b t h w (m n r c) -> b c (t r) (h m) (w n)", m=p, n=p, r=pt, c=self.out_channels)
        return out.float()


def count_parameters(model):
    """Number of parameter values (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# 4. Loading checkpoints
# ---------------------------------------------------------------------------------------------------

# Entries of official files we recompute or do not need: TransformerEngine's serialised FP8 metadata,
# training counters, and the RoPE buffers (deterministic; we build the angles on the fly).
_DROPPED_SUFFIXES = ("._extra_state",)
_DROPPED_PREFIXES = ("accum_", "pos_embedder_options.", "pos_embedder.", "extra_pos_embedders_options.")


def read_state_dict(path):
    """Read a `.pt`/`.pth` (memory-mapped) or `.safetensors` file into a flat dict of tensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # official files may pickle TransformerEngine extra state objects
        warnings.warn(f"{path}: weights_only load failed ({type(e).__name__}); retrying with full "
                      f"unpickling, which runs code from the file: only do this for files you trust")
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    for key in ("model", "state_dict"):  # files that wrap the state dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def select_dit_weights(sd, ema=False, source="state dict"):
    """Pick `net.`/`net_ema.` weights (or unprefixed ones), drop what we recompute; keys as our model's."""
    has_prefix = any(k.startswith(("net.", "net_ema.")) for k in sd)
    if ema and not any(k.startswith("net_ema.") for k in sd):
        raise KeyError(f"{source}: EMA weights requested but there are no 'net_ema.' keys")
    prefix = ("net_ema." if ema else "net.") if has_prefix else ""
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):].replace("_checkpoint_wrapped_module.", "")
        if key.endswith(_DROPPED_SUFFIXES) or key.startswith(_DROPPED_PREFIXES):
            continue
        out[key] = value
    if any(".lora_A." in k or ".base_layer." in k for k in out):
        from lora import merge_lora_state_dict  # official PEFT-style LoRA checkpoint: fold the adapters in
        out = merge_lora_state_dict(out)
    return out


def check_state_dict(model, sd, source="state dict"):
    """Raise one clear error listing every missing, unexpected and wrongly-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise KeyError("\n".join(lines))


def load_dit_weights(model, sd_or_path, ema=False, dtype=None):
    """Load official or our weights into `model` strictly; a meta-device model is materialised by assign."""
    source = sd_or_path if isinstance(sd_or_path, str) else "state dict"
    sd = read_state_dict(sd_or_path) if isinstance(sd_or_path, str) else sd_or_path
    sd = select_dit_weights(sd, ema=ema, source=source)
    check_state_dict(model, sd, source)
    dtype = dtype or next(model.parameters()).dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}  # no copy when the file already has this dtype
    on_meta = next(model.parameters()).is_meta
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model


def build_dit(preset="2b", checkpoint=None, ema=False, device="cpu", dtype=torch.bfloat16, **overrides):
    """Build the DiT (on meta first, so the 2B model never exists twice in memory) and load weights."""
    config = dit_config(preset, **overrides)
    if checkpoint is None:
        with torch.device(device):  # on 'meta' this allocates nothing and init is a no-op
            model = MultiViewDiT(**config)
            model.init_weights()
        return model.to(dtype=dtype)
    with torch.device("meta"):
        model = MultiViewDiT(**config)
    load_dit_weights(model, checkpoint, ema=ema, dtype=dtype)
    return model.to(device)
