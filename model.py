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

import functools
import io
import math
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from attention import attention, register_ring_group, ring_attention
from conv import conv3d_3x3x3

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
    state_t=8,  # latent frames per view in training (29 pixel frames); the reference also infers V from it
    max_img_h=240,  # RoPE range of the reference's tables, in latent pixels (checked in forward)
    max_img_w=240,
    max_frames=128,  # latent frames per view
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

    def forward(self, x_BTND, t_emb_BTD, adaln_lora_BT3D, context_BVMD, rope, text_views, self_attn_fn):
        B, T, N, D = x_BTND.shape
        V = context_BVMD.shape[1]

        # Self-attention: one sequence of all V*T_v*h*w tokens.
        shift, scale, gate = (self.adaln_modulation_self_attn(t_emb_BTD) + adaln_lora_BT3D).chunk(3, dim=-1)
        h = modulate(x_BTND, shift, scale).reshape(B, T * N, D)
        h = self.self_attn(h, rope_angles=rope, attn_fn=self_attn_fn).reshape(B, T, N, D)
        x_BTND = x_BTND + gate[:, :, None] * h

        # Cross-attention: each view's tokens see only that view's 512-token T5 slot, for the views in
        # text_views (the others have all-zero slots, whose output and gradients are exactly zero).
        shift, scale, gate = (self.adaln_modulation_cross_attn(t_emb_BTD) + adaln_lora_BT3D).chunk(3, dim=-1)
        h_BVLD = modulate(x_BTND, shift, scale).reshape(B, V, (T // V) * N, D)
        out_BVLD = torch.zeros_like(h_BVLD)
        for v in text_views:
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
        self.skip_empty_text = True  # skip cross-attention for views whose T5 slot is all zeros (exact)
        self.idle_text_view = 0  # the view that still runs when no view has text and gradients are on
        self.cp_group = None  # context parallelism: this rank holds a latent-frame range of every view

    def enable_context_parallel(self, group):
        """Shard the sequence over `group` (None: off). Inputs must then be this rank's shard_views()."""
        self.cp_group = group if group is not None and dist.get_world_size(group) > 1 else None
        if self.cp_group is not None:  # here, eagerly: compiled blocks find the ring's group by name
            register_ring_group(self.cp_group)

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

    def rope(self, n_views, frames_per_view, h, w, fps, device, frame_offset=0):
        """RoPE angles for this layout; a context-parallel shard starts at `frame_offset`."""
        c = self.config
        return rope_angles(c["model_channels"] // c["num_heads"], n_views, frames_per_view, h, w, fps,
                           h_ratio=c["rope_h_extrapolation_ratio"], w_ratio=c["rope_w_extrapolation_ratio"],
                           t_ratio=c["rope_t_extrapolation_ratio"], base_fps=c["rope_base_fps"],
                           frame_offset=frame_offset, device=device)

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
            raise ValueError(f"latent size {H}x{W} with {T // V} frames per view must be divisible by the "
                             f"patch size {p}x{p} (spatial) and {pt} (time)")
        c = self.config
        if H > c["max_img_h"] or W > c["max_img_w"] or T // V > c["max_frames"]:  # the reference asserts these
            raise ValueError(f"latent size {H}x{W} with {T // V} frames per view exceeds the model's RoPE range "
                             f"({c['max_img_h']}x{c['max_img_w']} latent pixels, {c['max_frames']} frames)")

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

        # Under context parallelism x holds frames [r*T_local, (r+1)*T_local) of every view: RoPE gets the
        # global frame positions and self-attention runs as a ring over the group's shards.
        self_attn_fn, frame_offset = attention, 0
        if self.cp_group is not None:
            cp, cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
            frame_offset = cp_rank * (Tt // V)
            self_attn_fn = functools.partial(ring_attention, group=self.cp_group, kv_sizes=[Tt * h * w] * cp)
        rope = self.rope(V, Tt // V, h, w, fps, x.device, frame_offset)
        context_BVMD = crossattn_emb.to(dtype).reshape(B, V, self.text_slot_tokens, -1)
        # A slot of zeros gives k = v = 0: exactly zero output and gradients, so such views are skipped.
        # With gradients on, one view always runs, so every weight gets a gradient tensor (zeros if no view
        # has text) on every rank, as FSDP and AdamW expect; training picks the caption's view for it, so
        # that a compiled block sees one view list whether the caption was dropped or not.
        has_text = context_BVMD.flatten(2).ne(0).any(-1).any(0).tolist()
        text_views = tuple(v for v in range(V) if has_text[v] or not self.skip_empty_text)
        if not text_views and torch.is_grad_enabled():
            text_views = (min(self.idle_text_view, V - 1),)

        for block in self.blocks:
            # (train.py wraps each block's forward for activation checkpointing)
            x_BTND = block(x_BTND, t_emb_BTD, adaln_lora_BT3D, context_BVMD, rope, text_views, self_attn_fn)

        out = self.final_layer(x_BTND, t_emb_BTD, adaln_lora_BT3D).reshape(B, Tt, h, w, -1)
        # Unpatchify with the channel as the INNERMOST factor (unlike the patch embed).
        out = rearrange(out, "b t h w (m n r c) -> b c (t r) (h m) (w n)", m=p, n=p, r=pt, c=self.out_channels)
        return out.float()


def count_parameters(model):
    """Number of parameter values (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


# The denoiser shared by training and sampling: rectified flow written in EDM-sigma form.
# xt = x0 + sigma * eps; with t = sigma / (1 + sigma) the net sees (1 - t) x0 + t eps and predicts the
# velocity eps - x0. Conditional latent frames enter clean, at timestep t(1e-4), and their x0
# prediction is overwritten with the ground truth ("frame replace").

SIGMA_CONDITIONAL = 1e-4


def rf_scaling(sigma):
    """Preconditioning (c_skip, c_out, c_in, c_noise) = (1 - t, -t, 1 - t, t), t = sigma / (1 + sigma)."""
    t = sigma / (1 + sigma)
    return 1 - t, -t, 1 - t, t


def denoise(net, xt_BCTHW, sigma_B, context, view_indices_B_T, fps, gt_BCTHW=None, cond_mask_B1THW=None):
    """One network evaluation: returns (x0 prediction, raw velocity prediction), both float32."""
    B, C, T, H, W = xt_BCTHW.shape
    xt = xt_BCTHW.float()
    if cond_mask_B1THW is None:
        cond_mask_B1THW = torch.zeros(B, 1, T, H, W, device=xt.device)
    mask = cond_mask_B1THW.float()
    gt = torch.zeros_like(xt) if gt_BCTHW is None else gt_BCTHW.float()
    sigma = sigma_B.float().reshape(B, 1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = rf_scaling(sigma)
    net_in = gt * mask + xt * c_in * (1 - mask)
    # Per-latent-frame timesteps: t(sigma) on noisy frames, t(1e-4) on conditional frames.
    frame_mask_BT = mask.mean(dim=(1, 3, 4))
    t_cond = SIGMA_CONDITIONAL / (1 + SIGMA_CONDITIONAL)
    timesteps_B_T = t_cond * frame_mask_BT + c_noise.reshape(B, 1) * (1 - frame_mask_BT)
    velocity = net(net_in, timesteps_B_T, context, mask, fps=fps, view_indices_B_T=view_indices_B_T)
    x0 = c_skip * xt + c_out * velocity
    x0 = gt * mask + x0 * (1 - mask)
    return x0, velocity


# ---------------------------------------------------------------------------------------------------
# 4. Loading checkpoints
# ---------------------------------------------------------------------------------------------------

# Entries of official files we recompute or do not need: TransformerEngine's serialised FP8 metadata,
# training counters, and the RoPE buffers (deterministic; we build the angles on the fly).
_DROPPED_SUFFIXES = ("._extra_state",)
_DROPPED_PREFIXES = ("accum_", "pos_embedder_options.", "pos_embedder.", "extra_pos_embedders_options.")


def read_state_dict(path):
    """Read a `.pt`/`.pth` (memory-mapped) or `.safetensors` file into a flat dict of tensors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:  # TransformerEngine pickles its (dropped) extra state as io.BytesIO: allowed, it runs no code
        with torch.serialization.safe_globals([io.BytesIO]):
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        if os.environ.get("COSMOS_MV_TRUST_PICKLE") != "1":
            why = str(e).split("WeightsUnpickler error: ")[-1]  # torch's reason, without its advice
            why = why.split("\n")[0].split(". Please")[0][:200]
            raise ValueError(f"{path}: not loadable as plain weights ({type(e).__name__}: {why}); full "
                             f"unpickling would run code from the file: set COSMOS_MV_TRUST_PICKLE=1 only if "
                             f"you trust it") from e
        warnings.warn(f"{path}: loading with full unpickling (COSMOS_MV_TRUST_PICKLE=1)")
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    for key in ("model", "state_dict"):  # files that wrap the state dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def select_dit_weights(sd, ema=False, source="state dict", lora_alpha=None, merge_lora=True):
    """Pick `net.`/`net_ema.` weights (or unprefixed ones), drop what we recompute; keys as our model's.

    PEFT-layout LoRA entries are folded in with scale lora_alpha / rank; None means alpha = rank, as in
    the official LoRA experiment (train.py runs record their lora_alpha in the run config). With
    merge_lora=False they are kept, for a model that has the adapters injected (lora.inject_lora).
    """
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
    if merge_lora and any(".lora_A." in k or ".base_layer." in k for k in out):
        from lora import merge_lora_state_dict  # PEFT-style LoRA checkpoint: fold the adapters in
        out = merge_lora_state_dict(out, alpha=lora_alpha)
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


def load_dit_weights(model, sd_or_path, ema=False, dtype=None, lora_alpha=None):
    """Load official or our weights into `model` strictly; a meta-device model is materialised by assign.

    LoRA checkpoints are merged (scale lora_alpha / rank, None: 1) unless `model` has adapters injected.
    """
    is_path = isinstance(sd_or_path, (str, os.PathLike))
    source = os.fspath(sd_or_path) if is_path else "state dict"
    sd = read_state_dict(source) if is_path else sd_or_path
    injected = any(".lora_A." in k for k in model.state_dict())
    sd = select_dit_weights(sd, ema=ema, source=source, lora_alpha=lora_alpha, merge_lora=not injected)
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


# ---------------------------------------------------------------------------------------------------
# 5. Wan2.1 video VAE (the tokenizer of Cosmos-Predict2): causal 3D convs, encode/decode, loading
# ---------------------------------------------------------------------------------------------------
# 8x spatial and 4x temporal compression into 16 channels. Pixel frame 0 becomes latent frame 0 on its
# own; latent frame k >= 1 covers pixel frames 4k-3..4k (and, causally, everything before them).
# Because every temporal operation is causal, a clip can be streamed through in chunks: each temporal
# conv keeps the last frames of its input in `cache` (a dict keyed by the module) and front-pads the
# next chunk with them, so chunked and one-pass results agree to float rounding. Chunking is what bounds
# memory at 720p (one chunk of 16 frames at 96 channels x 704 x 1280 is 2.8 GB in bf16).

VAE_DEFAULTS = dict(
    dim=96,  # base width; stage widths are dim * dim_mult
    z_dim=16,  # latent channels (the encoder head emits 2 * z_dim: mean and log-variance)
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,  # per encoder stage; the decoder uses one more
    temporal_downsample=(False, True, True),  # which spatial downsamplings also halve time
    temporal_window=16,  # encoder chunk in pixel frames after frame 0 (the multiview setting)
)

VAE_PRESETS = {
    # The official tokenizer (Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth), 126.9M parameters.
    "wan2.1": dict(VAE_DEFAULTS),
    # The golden test network (tests/golden/vae_tiny.pt): same structure, base width 8.
    "tiny": dict(VAE_DEFAULTS, dim=8),
}

# Per-channel mean and std of the posterior mean over video data (Wan2.1's latents_mean/latents_std).
# The DiT sees (mu - mean) / std.
VAE_LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
VAE_LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class CausalConv3d(nn.Conv3d):
    """Conv3d that zero-pads time only in front (2 frames for k=3): output frame t sees input frames <= t."""

    def __init__(self, in_dim, out_dim, kernel, stride=1, padding=0):
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, pad_h, pad_w))
        self.time_pad = 2 * pad_t
        self.use_triton = False  # conv.py's kernel instead of cuDNN (train.compile_vae sets it where faster)

    def forward(self, x_BCTHW, cache=None):
        front = self.time_pad
        if front == 0:
            return super().forward(x_BCTHW)
        prev = cache.get(self) if cache is not None else None  # last input frames of earlier chunks
        if prev is None:
            B, C, _, H, W = x_BCTHW.shape
            prev = x_BCTHW.new_zeros(B, C, front, H, W)
            if x_BCTHW.is_contiguous(memory_format=torch.channels_last_3d):  # keep the layout through the cat
                prev = prev.contiguous(memory_format=torch.channels_last_3d)  # (else a channels-last copy)
        x_BCTHW = torch.cat([prev, x_BCTHW], dim=2)  # [B, C, front + T, H, W]
        if cache is not None:
            # clone, so that the cache does not keep the whole chunk alive
            cache[self] = x_BCTHW[:, :, -front:].clone()
        if self.use_triton:  # the kernel pads H and W itself (3x3x3 layers only, see conv.py)
            return conv3d_3x3x3(x_BCTHW, self.weight, self.bias)
        return super().forward(x_BCTHW)


class VAERMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (the Wan RMS norm; no bias)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        # [C, 1, 1, 1] broadcasts over (T, H, W) of a 5-D video, [C, 1, 1] over (H, W) of a frame batch
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * (self.gamma * self.scale)


class VAEResBlock(nn.Module):
    """(norm, SiLU, causal 3x3x3 conv) twice, plus a 1x1x1 conv shortcut when the width changes."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        # Indices as in the checkpoint: residual.0/3 are the norms, residual.2/6 the convs; 5 held dropout.
        self.residual = nn.Sequential(
            VAERMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            VAERMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x_BCTHW, cache=None):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        # Rebinding h as we go (and SiLU in place) keeps at most ~4 full-size tensors alive at 720p.
        h = F.silu(norm1(x_BCTHW), inplace=True)
        h = conv1(h, cache)
        h = F.silu(norm2(h), inplace=True)
        h = conv2(h, cache)
        return h.add_(self.shortcut(x_BCTHW))


class VAEAttention(nn.Module):
    """Single-head self-attention within each frame (no mixing across time), head dim = C."""

    def __init__(self, dim):
        super().__init__()
        self.norm = VAERMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x_BCTHW, cache=None):
        B, C, T, H, W = x_BCTHW.shape
        h = rearrange(x_BCTHW, "b c t h w -> (b t) c h w")  # frames become the batch
        qkv = self.to_qkv(self.norm(h))  # [BT, 3C, H, W], channels q | k | v
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # each [BT, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(rearrange(h, "n 1 (h w) c -> n c h w", h=H))
        return x_BCTHW + rearrange(h, "(b t) c h w -> b c t h w", b=B)


class VAEResample(nn.Module):
    """2x spatial down- or up-sampling of every frame, optionally with a causal 2x step in time.

    Time is never resampled at frame 0, which stands alone:
      downsample3d: out = [x_0] ++ conv over frame windows (0,1,2), (2,3,4), ...  (1 + 2n -> 1 + n frames)
      upsample3d:   out = [x_0] ++ each later frame split into two (the conv emits 2C channels); its causal
                    context starts at frame 1, frame 0 is never seen by it    (1 + n -> 1 + 2n frames)
    The downsampler changes time after its spatial step, the upsampler before it (as in the checkpoint).
    """

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode in ("downsample2d", "downsample3d"):
            # pad right and bottom by one, then a stride-2 conv: H, W -> H/2, W/2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        elif mode in ("upsample2d", "upsample3d"):
            # the upsampler also halves the channels
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))  # unpadded: windows above
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x_BCTHW, cache=None):
        if self.mode == "upsample3d":
            x_BCTHW = self.time_upsample(x_BCTHW, cache)
        T = x_BCTHW.shape[2]
        x = self.resample(rearrange(x_BCTHW, "b c t h w -> (b t) c h w"))
        x_BCTHW = rearrange(x, "(b t) c h w -> b c t h w", t=T)
        if self.mode == "downsample3d":
            x_BCTHW = self.time_downsample(x_BCTHW, cache)
        return x_BCTHW

    def time_downsample(self, x_BCTHW, cache):
        """[B, C, T, H, W] -> [B, C, T', H, W]; a chunk stream keeps its windows aligned via the cache."""
        first = cache is None or self not in cache  # this chunk starts with frame 0
        if first:
            head, x = x_BCTHW[:, :, :1], x_BCTHW
        else:
            x = torch.cat([cache[self], x_BCTHW], dim=2)  # the previous chunk's last frame opens a window
        if cache is not None:
            cache[self] = x_BCTHW[:, :, -1:].clone()
        x = self.time_conv(x) if x.shape[2] >= 3 else x[:, :, :0]
        return torch.cat([head, x], dim=2) if first else x

    def time_upsample(self, x_BCTHW, cache):
        """[B, C, T, H, W] -> [B, C, T', H, W] with every frame after frame 0 doubled."""
        first = cache is None or self not in cache
        if cache is not None:
            cache[self] = True  # frame 0 has gone by
        head, x = (x_BCTHW[:, :, :1], x_BCTHW[:, :, 1:]) if first else (None, x_BCTHW)
        if x.shape[2] > 0:
            x = self.time_conv(x, cache)  # [B, 2C, T, H, W]
            x = rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)  # frame t -> frames 2t, 2t+1
        return torch.cat([head, x], dim=2) if first else x


class VAEEncoder(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2 z_dim, 1 + (T-1)/4, H/8, W/8] (posterior mean and log-variance)."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample):
        super().__init__()
        dims = [dim * m for m in (1,) + tuple(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(VAEResBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(dim_mult) - 1:
                mode = "downsample3d" if temporal_downsample[i] else "downsample2d"
                layers.append(VAEResample(out_dim, mode))
        self.downsamples = nn.ModuleList(layers)
        self.middle = nn.ModuleList([VAEResBlock(dims[-1], dims[-1]), VAEAttention(dims[-1]),
                                     VAEResBlock(dims[-1], dims[-1])])
        self.head = nn.Sequential(VAERMSNorm(dims[-1]), nn.SiLU(),
                                  CausalConv3d(dims[-1], 2 * z_dim, 3, padding=1))

    def forward(self, x_BCTHW, cache=None):
        x = self.conv1(x_BCTHW, cache)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class VAEDecoder(nn.Module):
    """Latent [B, z_dim, t, h, w] -> video [B, 3, 1 + 4(t-1), 8h, 8w]."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample):
        super().__init__()
        dims = [dim * dim_mult[-1]] + [dim * m for m in reversed(dim_mult)]
        temporal_upsample = tuple(reversed(temporal_downsample))
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([VAEResBlock(dims[0], dims[0]), VAEAttention(dims[0]),
                                     VAEResBlock(dims[0], dims[0])])
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(VAEResBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                layers.append(VAEResample(out_dim, mode))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.Sequential(VAERMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z_BCTHW, cache=None):
        x = self.conv1(z_BCTHW, cache)
        for layer in [*self.middle, *self.upsamples]:
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


def _time_chunks(n_frames, chunk):
    """[(start, end)] covering n_frames: frame 0 alone, then `chunk` frames at a time (0 = all at once)."""
    if chunk == 0:
        return [(0, n_frames)]
    return [(0, 1)] + [(s, min(s + chunk, n_frames)) for s in range(1, n_frames, chunk)]


class WanVAE(nn.Module):
    """The Wan2.1 VAE: encode video to the normalised 16-channel latent the DiT works in, decode back."""

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                 temporal_downsample=(False, True, True), temporal_window=16):
        super().__init__()
        self.z_dim = z_dim
        self.temporal_window = temporal_window
        self.space_factor = 2 ** (len(dim_mult) - 1)  # 8
        self.time_factor = 2 ** sum(temporal_downsample)  # 4
        self.encoder = VAEEncoder(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)  # encoder output -> (mean, log-variance)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # latent -> decoder input
        self.decoder = VAEDecoder(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample)
        # Not in the checkpoint (persistent=False) and always real, even when the model is built on meta.
        self.register_buffer("latent_mean", torch.tensor(VAE_LATENT_MEAN, device="cpu"), persistent=False)
        self.register_buffer("latent_std", torch.tensor(VAE_LATENT_STD, device="cpu"), persistent=False)

    def _stats(self, device):
        """Mean and std as float32 [1, C, 1, 1, 1] (bf16-rounded, like the reference, once cast to bf16)."""
        return (self.latent_mean.to(device, torch.float32).view(1, -1, 1, 1, 1),
                self.latent_std.to(device, torch.float32).view(1, -1, 1, 1, 1))

    @torch.no_grad()
    def encode(self, video_BCTHW, chunk=None):
        """Video [B, 3, 1 + 4k, H, W] (uint8 or float in [-1, 1]) -> latent [B, 16, 1 + k, H/8, W/8].

        Returns the normalised posterior mean in float32; computes in the module's dtype. The encoder
        sees frame 0 alone, then `chunk` frames at a time (default `temporal_window`; a multiple of 4;
        0 = the whole clip in one pass). The result does not depend on `chunk` beyond float rounding;
        smaller chunks use less memory.
        """
        x = video_BCTHW
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"VAE encode expects video [B, 3, T, H, W], got shape {tuple(x.shape)}")
        B, _, T, H, W = x.shape
        f = self.time_factor
        if T < 1 or (T - 1) % f != 0:
            raise ValueError(f"VAE encode needs T = 1 + {f}k frames (frame 0, then groups of {f}), "
                             f"got T={T}; e.g. keep the first {1 + max(T - 1, 0) // f * f}")
        if H % self.space_factor or W % self.space_factor:
            raise ValueError(f"VAE encode needs H and W divisible by {self.space_factor}, got {H}x{W}")
        chunk = self.temporal_window if chunk is None else chunk
        if chunk < 0 or chunk % f:
            raise ValueError(f"encoder chunk must be a multiple of {f} frames (or 0 = one pass), got {chunk}")
        weight = self.conv1.weight
        if x.dtype == torch.uint8:
            x = x.to(weight.device).float() / 127.5 - 1
        elif not x.is_floating_point():
            raise TypeError(f"VAE encode expects uint8 or float video, got {x.dtype}")
        elif x.abs().max() > 2:  # e.g. floats in 0..255: a silent garbage latent otherwise
            raise ValueError(f"float video must be in [-1, 1], got values up to {x.abs().max().item():.3g}")
        x = x.to(weight.device, weight.dtype)
        cache = {} if chunk else None
        h = torch.cat([self.encoder(x[:, :, s:e], cache) for s, e in _time_chunks(T, chunk)], dim=2)
        mu = self.conv1(h)[:, :self.z_dim]  # [B, z, t, h, w]; the log-variance half is not used
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    @torch.no_grad()
    def decode(self, latent_BCTHW, chunk=1):
        """Latent [B, 16, t, h, w] -> video [B, 3, 1 + 4(t-1), 8h, 8w] in about [-1, 1], float32, not clamped.

        The decoder runs on latent frame 0, then `chunk` latent frames at a time (1 as in the reference,
        0 = all at once); results agree to float rounding.
        """
        z = latent_BCTHW
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"VAE decode expects latent [B, {self.z_dim}, t, h, w], got {tuple(z.shape)}")
        if chunk < 0:
            raise ValueError(f"decoder chunk must be >= 0, got {chunk}")
        weight = self.conv2.weight
        mean, std = self._stats(weight.device)
        z = (z.to(weight.device, torch.float32) * std + mean).to(weight.dtype)
        x = self.conv2(z)
        cache = {} if chunk else None
        frames = [self.decoder(x[:, :, s:e], cache).float() for s, e in _time_chunks(z.shape[2], chunk)]
        return torch.cat(frames, dim=2)


def load_vae(path, dtype=torch.bfloat16, device="cpu", config=None):
    """Load a Wan2.1 VAE file (`tokenizer.pth`, a plain or wrapped state dict) strictly; frozen, eval mode."""
    config = VAE_PRESETS["wan2.1"] if config is None else config
    sd = read_state_dict(path)
    with torch.device("meta"):  # no random init of 127M parameters that are overwritten anyway
        vae = WanVAE(**config)
    check_state_dict(vae, sd, path)
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_vae(preset="wan2.1", path=None, seed=None, dtype=torch.bfloat16, device="cpu"):
    """The Wan2.1 VAE from its file, or (seed given, no file) a random one for demos and benchmarks.

    The random VAE is PyTorch's default init of WanVAE(**VAE_PRESETS[preset]) on CPU in float32 after
    torch.manual_seed(seed) (the caller's RNG state is left alone): train.py and sample.py both build
    the demo VAE here, so they see the same latent space.
    """
    if isinstance(preset, str) and preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; known: {', '.join(VAE_PRESETS)}")
    config = VAE_PRESETS[preset] if isinstance(preset, str) else preset
    if path is not None and seed is None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"VAE file not found: {path} (the Wan2.1 tokenizer.pth of "
                                    f"Cosmos-Predict2-2B-Video2World; sample.py: --vae, or --vae_seed for a random VAE)")
        return load_vae(str(path), dtype=dtype, device=device, config=config)
    if seed is None:
        raise ValueError("build_vae needs a VAE file or a seed for a random VAE")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = WanVAE(**config)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
