"""Work in progress: the Wan2.1 video VAE, to be appended to model.py as its own section."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model import check_state_dict, read_state_dict

# ---- Wan2.1 video VAE ----
# ---------------------------------------------------------------------------------------------------
# 5. The VAE: Wan2.1 causal video autoencoder (the tokenizer of Cosmos-Predict2)
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

    def forward(self, x_BCTHW, cache=None):
        front = self.time_pad
        if front == 0:
            return super().forward(x_BCTHW)
        prev = cache.get(self) if cache is not None else None  # last input frames of earlier chunks
        if prev is None:
            B, C, _, H, W = x_BCTHW.shape
            prev = x_BCTHW.new_zeros(B, C, front, H, W)
        x_BCTHW = torch.cat([prev, x_BCTHW], dim=2)  # [B, C, front + T, H, W]
        if cache is not None:
            # clone, so that the cache does not keep the whole chunk alive
            cache[self] = x_BCTHW[:, :, -front:].clone()
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
