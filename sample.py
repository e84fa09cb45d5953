"""Sample multi-camera videos from a multiview DiT checkpoint: official, ours (EMA or not) or LoRA.

    python sample.py --ckpt checkpoints/nvidia/Cosmos-Predict2-2B-Multiview/model-720p-10fps-7views-29frames.pt \
        --prompt "A car drives down a wet street at dusk." --input_path input.mp4 --num_conditional_frames 1
    python sample.py --ckpt <run>/checkpoints/model/iter_000002000.pt --load_ema --prompt prompt.txt  # train.py run
    torchrun --nproc_per_node 8 sample.py ...          # context parallel: same video as one GPU, faster

Writes an mp4 with the views stacked vertically in view order (the official layout) at the data fps,
optionally a labelled side-by-side grid (--grid), the prompt next to it (.txt) and the settings (.json).

Sections, in reading order:
  1. sampler      Karras sigmas, the official initial noise, 2nd-order Adams-Bashforth in float64
  2. guidance     classifier-free guidance as one batch of 2 through model.denoise (frame replacement)
  3. inputs       prompts -> per-view T5 context; conditioning frames from mp4 (resize + centre crop)
  4. loading      DiT (official / ours / EMA / LoRA), VAE, the run config saved by train.py
  5. output       decode view by view, uint8, mp4 writing (stacked or grid)
  6. generation   latents for a batch (optionally context parallel), sample_batch_for_training
  7. CLI          single prompt, batch JSON, torchrun, --benchmark

The batch dict that train.py hands to sample_batch_for_training() (either form of each entry):
  video               uint8 [B, 3, V*T, H, W] views view-major along time, or [B, V, T, 3, H, W] (loader)
  t5_text_embeddings  float [B, V*512, D]     per-view 512-token slots (front caption in its camera's slot)
  view_indices        int64 [B, V*T_latent]   camera id of every latent frame, or view_ids [B, V]
  fps                 float [B]               data fps (RoPE time scale)
  n_views             int                     V (optional: the 6-D video or the context length tells it)
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from attention import all_gather_spread_views, all_gather_views, shard_views
from model import (MultiViewDiT, build_dit, build_vae, check_state_dict, denoise, dit_config,
                   read_state_dict, select_dit_weights)

# ---------------------------------------------------------------------------------------------------
# 1. The sampler
# ---------------------------------------------------------------------------------------------------
# The official multiview sampler (a 2nd-order Adams-Bashforth / RES "2ab" multistep method on the
# Karras schedule) in the EDM-sigma form xt = x0 + sigma * eps. It only sees the denoiser through
# x0_fn(x, sigma) -> x0 prediction. Step 0 is Euler written in x0 form; step i >= 1 integrates the ODE
# exactly in lambda = -ln(sigma) with x0 extrapolated linearly from the last two predictions. The
# step coefficients and the update are float64; the state goes back to the caller's dtype (float32)
# after each step, as the reference does. A last clean evaluation at sigma_min gives the output.

SIGMA_MIN, SIGMA_MAX, RHO, STEPS = 0.01, 200.0, 7.0, 35


def karras_sigmas(steps=STEPS, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """float64 [steps+1]: (max^(1/rho) + i/steps (min^(1/rho) - max^(1/rho)))^rho, from sigma_max to sigma_min."""
    if steps < 1:
        raise ValueError(f"need at least 1 sampling step, got {steps}")
    ramp = torch.arange(steps + 1, dtype=torch.float64) / steps
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def initial_noise(shape, seed, sigma_max=SIGMA_MAX):
    """float32 noise * sigma_max from numpy's RandomState(seed), as the official arch_invariant_rand.

    It is the same on every machine and device (unlike torch's generators), and it is always drawn for
    the full latent: under context parallelism every rank draws it and keeps its own shard, so a cp=8
    run starts from exactly the noise of a 1-GPU run with the same seed (the official code splits it
    differently). 720p, 7 views: 12.6M values, about 0.3 s.
    """
    noise = np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32)
    return torch.from_numpy(noise) * np.float32(sigma_max)


def ab2_coefficients(sigma_prev, sigma, sigma_next):
    """(decay, h, b1, b2) of the AB2 step x' = decay x + h (b1 x0 + b2 x0_prev), float64.

    With lambda = -ln sigma, h = lambda_next - lambda and c2 = (lambda_prev - lambda) / h (< 0): exact
    integration of x' = x0 - x over the step with x0 linear in lambda through the two predictions gives
    phi-functions of -h: phi1(z) = (e^z - 1)/z, phi2(z) = (phi1(z) - 1)/z.
    """
    lam, lam_next, lam_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    h = lam_next - lam
    c2 = (lam_prev - lam) / h
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1) / -h
    b2 = phi2 / c2
    return math.exp(-h), h, phi1 - b2, b2


@torch.no_grad()
def sample_ab2(x0_fn, x_init, sigmas, progress=False, callback=None):
    """Run the sampler from x_init (already at sigmas[0]); returns x0_fn(x_final, sigmas[-1]).

    x0_fn(x, sigma) gets sigma as a Python float (float64). callback(i, x0_i, x_next) sees every step:
    the prediction at sigmas[i] and the state at sigmas[i+1] (the golden test records the trajectory).
    """
    sig = [float(s) for s in sigmas]
    x, x0_prev = x_init, None
    for i in tqdm(range(len(sig) - 1), desc="sampling", unit="step", disable=not progress):
        x0 = x0_fn(x, sig[i])
        if i == 0:  # Euler in x0 form: x' = x0 + (sigma'/sigma)(x - x0)
            x_next = ((sig[0] - sig[1]) / sig[0]) * x0.double() + (sig[1] / sig[0]) * x.double()
        else:
            decay, h, b1, b2 = ab2_coefficients(sig[i - 1], sig[i], sig[i + 1])
            x_next = decay * x.double() + h * (b1 * x0.double() + b2 * x0_prev.double())
        x, x0_prev = x_next.to(x_init.dtype), x0
        if callback is not None:
            callback(i, x0, x)
    return x0_fn(x, sig[-1])


# ---------------------------------------------------------------------------------------------------
# 2. Guidance
# ---------------------------------------------------------------------------------------------------
# x0 = cond + g (cond - uncond). Both branches go through the net as one batch of 2 (one launch per
# layer instead of two). Conditional latent frames are replaced by the clean ground truth inside
# model.denoise at every evaluation, in both branches, so they stay exactly the ground truth.
# When the two contexts are identical (guidance 0, or the official empty-negative-prompt case) the
# uncond branch equals the cond one and CFG is the identity: one branch is run, bit for bit the same.


def guided_x0_fn(net, context, uncond_context, guidance, view_indices, fps, gt=None, cond_mask=None):
    """x0_fn(x, sigma) for sample_ab2: CFG over model.denoise with frame replacement; float32 out."""
    two = guidance != 0 and uncond_context is not None and not torch.equal(context, uncond_context)
    if two:
        double = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        context = torch.cat([context, uncond_context])
        view_indices, fps, gt, cond_mask = double(view_indices), double(fps), double(gt), double(cond_mask)

    def x0_fn(x, sigma):
        xb = torch.cat([x, x]) if two else x
        sigma_B = torch.full((xb.shape[0],), sigma, dtype=torch.float32, device=x.device)
        x0, _ = denoise(net, xb, sigma_B, context, view_indices, fps, gt, cond_mask)
        if not two:
            return x0
        cond, uncond = x0.chunk(2)
        return cond + guidance * (cond - uncond)

    return x0_fn


# ---------------------------------------------------------------------------------------------------
# 3. Inputs: text context, view ids, conditioning frames
# ---------------------------------------------------------------------------------------------------
# Text: each view owns a 512-token slot of the context; the caption goes into ONE slot and the others
# stay zero (their cross-attention is then exactly zero and skipped). The official script always uses
# slot 0; training puts the front camera's caption in the front camera's slot, so our default is the
# slot whose view id is 0 (front) -- slot 0 for the official 0..V-1 ids, slot 2 for Waymo's 4,5,0,1,2.
#
# Negative prompt (official semantics): a non-empty negative prompt fills the same slot of the uncond
# context. An EMPTY negative prompt makes the official pipeline reuse the cond text for uncond, so CFG
# does nothing (x0 = cond). `--uncond zero` instead uses an all-zero uncond context, as training-time
# sampling does (text dropout trains the zero-text branch).

TEXT_SLOT_TOKENS = 512
DEFAULT_NEGATIVE_PROMPT = (
    "Blurry, low-resolution, noisy video with compression artifacts, flickering and jittery frames, "
    "washed-out or oversaturated colors, warped road geometry, deformed cars and people, objects "
    "that appear or vanish, unnatural motion, frozen frames, text, watermarks.")


def parse_prompt(value):
    """('text', str) | ('embedding', [L, D]) | ('context', [V*512, D]) from text or a .txt/.pickle/.pkl/.pt file."""
    if value is None:
        return None
    if value.endswith(".txt"):  # official: one line per view, only the first is used
        try:
            lines = [ln.strip() for ln in Path(value).read_text(encoding="utf-8").splitlines()]
        except OSError as e:
            raise FileNotFoundError(f"prompt file {value}: {e}") from e
        if not lines or not lines[0]:
            raise ValueError(f"{value}: the first line (the caption) is empty")
        return "text", lines[0]
    if value.endswith((".pickle", ".pkl")):  # an embed.py file, (L, D)
        from embed import load_embedding
        return "embedding", torch.from_numpy(load_embedding(value))
    if value.endswith(".pt"):  # official: the full context [1, V*512, D]
        if not os.path.exists(value):
            raise FileNotFoundError(f"prompt embedding file not found: {value}")
        ctx = torch.load(value, map_location="cpu", weights_only=True)
        if not torch.is_tensor(ctx) or ctx.ndim not in (2, 3) or (ctx.ndim == 3 and ctx.shape[0] != 1):
            raise ValueError(f"{value}: expected a tensor [1, V*512, D], got "
                             f"{tuple(ctx.shape) if torch.is_tensor(ctx) else type(ctx).__name__}")
        return "context", ctx.reshape(ctx.shape[-2], ctx.shape[-1]).float()
    return "text", value


def encode_texts(texts, t5_path, device):
    """{text: [512, D] float32} for every distinct text, with the T5 loaded once and freed after."""
    texts = sorted(set(texts))
    if not texts:
        return {}
    from embed import encode_prompts, load_t5
    tokenizer, encoder = load_t5(t5_path, device=device, dtype=torch.float32)  # official: fp32 T5
    out = {t: e.cpu() for t, e in zip(texts, encode_prompts(texts, tokenizer, encoder))}
    del tokenizer, encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def build_context(prompt, n_views, slot, dim, encoded, source="prompt"):
    """The [1, V*512, D] context of a parsed prompt: an embedding goes into `slot`, others stay zero."""
    kind, value = prompt
    if kind == "context":
        if tuple(value.shape) != (n_views * TEXT_SLOT_TOKENS, dim):
            raise ValueError(f"{source}: context of shape {tuple(value.shape)}, expected "
                             f"[{n_views} views * {TEXT_SLOT_TOKENS}, {dim}]")
        return value[None].clone()
    emb_LD = encoded[value] if kind == "text" else value
    L, D = emb_LD.shape
    if D != dim or L > TEXT_SLOT_TOKENS:
        raise ValueError(f"{source}: embedding of shape ({L}, {D}), the model needs width {dim} and at most "
                         f"{TEXT_SLOT_TOKENS} tokens (is the T5 / embedding the one the model was trained with?)")
    if not 0 <= slot < n_views:
        raise ValueError(f"caption slot {slot} outside 0..{n_views - 1}")
    context = torch.zeros(1, n_views * TEXT_SLOT_TOKENS, dim)
    context[0, slot * TEXT_SLOT_TOKENS: slot * TEXT_SLOT_TOKENS + L] = emb_LD
    return context


def latent_view_indices(view_ids, latent_frames, batch=1):
    """int64 [B, V*T_latent]: each view's camera id repeated over its latent frames (view-major)."""
    return torch.tensor(view_ids, dtype=torch.int64).repeat_interleave(latent_frames)[None].expand(batch, -1)


def read_video(path):
    """(uint8 [T, H, W, 3], fps) of an mp4, with a clear error for unreadable files."""
    import imageio.v2 as imageio
    if not os.path.exists(path):
        raise FileNotFoundError(f"input video not found: {path}")
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        fps = reader.get_meta_data().get("fps")
        frames = np.stack([f[..., :3] for f in reader])
        reader.close()
    except Exception as e:
        raise ValueError(f"{path}: could not read the video ({type(e).__name__}: {e})") from e
    return frames, fps


def resize_center_crop(frames_NHWC, height, width):
    """uint8 [N, H, W, 3] -> uint8 [N, 3, height, width]: scale to cover, then centre-crop (official).

    The scale is max(width/W, height/H) with the size rounded up, bilinear with antialiasing (what
    torchvision's resize does on tensors), then the centre crop with torchvision's rounding. One
    deliberate difference: we round to uint8 where the official code truncates (x*255 -> uint8),
    which can lower pixel values by one level even when no resize happens.
    """
    x = torch.from_numpy(np.array(frames_NHWC, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    H, W = x.shape[-2:]
    if (H, W) != (height, width):
        scale = max(width / W, height / H)
        size = (int(math.ceil(scale * H)), int(math.ceil(scale * W)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top = int(round((size[0] - height) / 2.0))
        left = int(round((size[1] - width) / 2.0))
        x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8)


def load_conditioning_frames(paths, n_views, n_frames, height, width):
    """uint8 [3, V, n, H, W]: the LAST n frames of every view (official) from one or V mp4 files.

    One file holds the views concatenated in time (the official input format: T = V * frames per view);
    V files hold one view each, in view order.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if len(paths) == 1:
        frames, _ = read_video(paths[0])
        if len(frames) % n_views:
            raise ValueError(f"{paths[0]}: {len(frames)} frames do not split into {n_views} views "
                             f"concatenated in time (pass one file per view, or the right --n_views)")
        per_view = list(frames.reshape(n_views, len(frames) // n_views, *frames.shape[1:]))
        names = [f"{paths[0]} (view {v})" for v in range(n_views)]
    elif len(paths) == n_views:
        per_view, names = [read_video(p)[0] for p in paths], paths
    else:
        raise ValueError(f"--input_path: got {len(paths)} files for {n_views} views "
                         f"(one file with the views concatenated in time, or one file per view)")
    out = []
    for frames, name in zip(per_view, names):
        if len(frames) < n_frames:
            raise ValueError(f"{name}: has {len(frames)} frames, {n_frames} conditioning frames requested")
        out.append(resize_center_crop(frames[len(frames) - n_frames:], height, width))  # [n, 3, H, W]
    return torch.stack(out).permute(2, 0, 1, 3, 4)  # [3, V, n, H, W]


def encode_conditioning(vae, frames_B3VNHW, latent_frames):
    """(gt latent [B, 16, V*T, h, w], mask [B, 1, V*T, h, w]) from the first pixel frames of every view.

    The causal VAE makes the first latent frames depend on the first 1 + 4k pixel frames only, so only
    those are encoded (the official pipeline pads the clip with black frames; the result is the same
    up to float rounding). gt is zero on the free frames, where the mask is 0.
    """
    B, _, V, N, H, W = frames_B3VNHW.shape
    n_latent = (N - 1) // vae.time_factor + 1
    if N != 1 + vae.time_factor * (n_latent - 1) or n_latent > latent_frames:
        raise ValueError(f"{N} conditioning frames per view: need 1 + {vae.time_factor}k and at most "
                         f"{latent_frames} latent frames")
    h, w = H // vae.space_factor, W // vae.space_factor
    gt = torch.zeros(B, vae.z_dim, V, latent_frames, h, w)
    for v in range(V):  # view by view bounds the encoder's memory at 720p
        gt[:, :, v, :n_latent] = vae.encode(frames_B3VNHW[:, :, v]).cpu()
    mask = torch.zeros(B, 1, V, latent_frames, h, w)
    mask[:, :, :, :n_latent] = 1
    return gt.flatten(2, 3), mask.flatten(2, 3)


# ---------------------------------------------------------------------------------------------------
# 4. Loading: the DiT, the VAE and the run config of our checkpoints
# ---------------------------------------------------------------------------------------------------
# Our train.py writes <run>/checkpoints/model/iter_*.pt (keys net.* and net_ema.*; a LoRA run's net.*
# holds the PEFT-layout base_layer/lora_A/lora_B keys) and its resolved flat config as
# <run>/checkpoints/config.json and under key `config` of trainer/iter_*.pt. run_settings() turns that
# config into sampling settings; CLI flags override them, and official weights (no run config) use the
# official defaults (OFFICIAL).

OFFICIAL = dict(dit_preset="2b", n_views=7, height=704, width=1280, num_frames=29, fps=10.0,
                vae_path="checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth",
                vae_preset="wan2.1", t5="checkpoints/google-t5/t5-11b")


def find_run_config(ckpt, path=None):
    """The training config of one of our checkpoints (dict; `path` names it explicitly), else None.

    Only our layout is searched (<run>/checkpoints/model/iter_*.pt): official folders may hold an
    unrelated config.json next to the weights.
    """
    ckpt = Path(ckpt)
    if path is None and ckpt.parent.name == "model" and (ckpt.parent.parent / "config.json").is_file():
        path = ckpt.parent.parent / "config.json"
    if path is not None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"run config {path}: {e}") from e
    trainer = ckpt.parent.parent / "trainer" / ckpt.name
    if ckpt.parent.name == "model" and trainer.is_file():
        try:
            state = torch.load(trainer, map_location="cpu", weights_only=True)
        except Exception as e:  # not readable without unpickling code: do without it
            print(f"warning: could not read the run config from {trainer}: {e}", file=sys.stderr)
            return None
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return state["config"]
    return None


def run_settings(config):
    """Sampling settings from train.py's config (the keys it has): model, views, size, VAE, T5, LoRA."""
    c, s = config or {}, {}
    if c.get("model"):
        s["dit_preset"] = c["model"]
    for key in ("height", "width", "num_frames"):
        if c.get(key):
            s[key] = c[key]
    cams = c.get("camera_keys")
    if cams:
        s["labels"] = list(cams)
        if c.get("camera_to_view_id"):
            s["view_ids"] = [int(c["camera_to_view_id"][cam]) for cam in cams]
        if c.get("front_camera_key") in cams:  # training puts the caption in the front camera's slot
            s["caption_view"] = cams.index(c["front_camera_key"])
    if c.get("vae"):
        s["vae_preset"] = c["vae"]
    if config is not None:  # without a run config the official VAE applies (resolve_settings)
        s["vae_path"] = c.get("vae_path") or None
        if c.get("vae") == "tiny" or not s["vae_path"]:  # train.py's rule: a random VAE from vae_seed
            s["vae_seed"] = int(c.get("vae_seed", 0))
    if c.get("t5_dir"):
        s["t5"] = c["t5_dir"]
    if c.get("init"):
        s["base_ckpt"] = c["init"]  # the weights training started from (base of adapter-only files)
    if c.get("lora_rank") and c.get("lora_alpha"):
        s["lora_alpha"] = float(c["lora_alpha"])
    return s


def _unwrap(net):
    """The MultiViewDiT inside DDP / torch.compile wrappers."""
    while hasattr(net, "module") or hasattr(net, "_orig_mod"):
        net = getattr(net, "module", None) or net._orig_mod
    return net


def _cp_group(net):
    """The net's context-parallel group (model.enable_context_parallel), or None."""
    return getattr(_unwrap(net), "cp_group", None)


def load_dit_for_sampling(ckpt, config_or_preset="2b", load_ema=False, dtype=torch.bfloat16, device="cpu",
                          base_ckpt=None, lora_alpha=None, merge_lora=True):
    """The DiT in eval mode, no grad: official .pt/.safetensors, our iter_*.pt (net. or net_ema.), LoRA.

    config_or_preset: a model.DIT_PRESETS name, a DiT config dict, or a run config (its `model` preset).
    LoRA: a full checkpoint (PEFT keys, base weights inside) is merged at load; an adapter-only file
    (only lora_A/lora_B) is merged into `base_ckpt`. merge_lora=False keeps the adapters as low-rank
    branches of wrapped linears instead (slower; the merge check). Strict: any missing, unexpected or
    misshaped key is an error naming the file.
    """
    cfg = config_or_preset
    if isinstance(cfg, dict) and "model_channels" not in cfg:  # a run config
        cfg = dit_config(run_settings(cfg).get("dit_preset", OFFICIAL["dit_preset"]))
    elif isinstance(cfg, str):
        cfg = dit_config(cfg)
    sd = read_state_dict(str(ckpt))
    adapter_only = bool(sd) and all(".lora_A." in k or ".lora_B." in k for k in sd)
    if adapter_only:
        if base_ckpt is None:
            raise ValueError(f"{ckpt} holds only LoRA adapters; pass the base weights with --base_ckpt")
        if str(ckpt).endswith(".safetensors"):
            from lora import read_lora  # our adapter files carry rank and alpha
            sd, meta = read_lora(str(ckpt))
            lora_alpha = meta["alpha"] if lora_alpha is None else lora_alpha
        prefix = next((p for p in ("net_ema.", "net.") if any(k.startswith(p) for k in sd)), "")
        if load_ema and prefix != "net_ema.":
            raise KeyError(f"{ckpt}: EMA weights requested but there are no 'net_ema.' keys")
        adapters = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        base = select_dit_weights(read_state_dict(str(base_ckpt)), source=str(base_ckpt))
        sd = {**base, **adapters}  # X.weight next to X.lora_A/B: lora.merge_lora_state_dict's second form
    # folds PEFT entries with scale lora_alpha / rank (or keeps them: merge_lora=False)
    sd = select_dit_weights(sd, ema=load_ema and not adapter_only, source=str(ckpt), lora_alpha=lora_alpha,
                            merge_lora=merge_lora)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        net = MultiViewDiT(**cfg)
    if not merge_lora and any(".lora_A." in k for k in sd):
        sd = _inject_adapters(net, sd, lora_alpha)
    try:
        check_state_dict(net, sd, str(ckpt))
    except KeyError as e:
        raise KeyError(f"{e.args[0]}\n(the model was built from config {cfg}; for official weights pass --preset, "
                       f"ours carry it in the run config)") from None
    net.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


def _inject_adapters(net, sd, alpha=None):
    """Wrap the linears that `sd` has adapters for (lora.inject_lora); returns sd in the wrapped layout."""
    from lora import inject_lora
    suffix = ".lora_A.default.weight"
    names = [k[:-len(suffix)] for k in sd if k.endswith(suffix)]
    rank = sd[names[0] + suffix].shape[0]
    inject_lora(net, rank, rank if alpha is None else alpha, targets=names)  # exact module names
    # an adapter-only file over a plain base: the base's X.weight is the wrapper's X.base_layer.weight
    plain = {f"{n}.{leaf}": f"{n}.base_layer.{leaf}" for n in names for leaf in ("weight", "bias")}
    return {plain.get(k, k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# 5. Output: decode, uint8, mp4
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_views(vae, latent_BCTHW, n_views, group=None):
    """Latent [B, 16, V*t, h, w] -> float video [B, 3, V*T, H, W] (CPU) in about [-1, 1], one view at a time.

    With a context-parallel group (every rank holding the same full latent) the views are spread over
    its ranks, rank r decoding views r, r + cp, ..., and all-gathered: every rank returns the full video
    after 1/cp of the decoding (at 720p a view takes ~1.3 s on an H100).
    """
    views = latent_BCTHW.chunk(n_views, dim=2)
    if group is None or dist.get_world_size(group) == 1:
        return torch.cat([vae.decode(z).cpu() for z in views], dim=2)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    B, _, t, h, w = views[0].shape
    shape = (B, 3, 1 + vae.time_factor * (t - 1), h * vae.space_factor, w * vae.space_factor)
    mine = torch.zeros(-(-n_views // cp), *shape, device=latent_BCTHW.device)  # slots; a rank may have none
    for i, z in enumerate(views[rank::cp]):
        mine[i] = vae.decode(z)
    video = all_gather_spread_views(mine, n_views, group)  # [V, B, 3, T, H, W]
    return video.permute(1, 2, 0, 3, 4, 5).flatten(2, 3).cpu()  # views stacked along time


def to_uint8(video):
    """[-1, 1] float -> uint8 (clamped, rounded). The decoder's output is always in [-1, 1] scale."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def arrange_views(video_3VTHW, layout="stacked", labels=None, label_height=32):
    """uint8 [3, V, T, H, W] -> frames [T, H', W', 3] numpy: views stacked vertically, or side by side.

    The grid puts every view's label in a black strip above it, so the pixels of the views are untouched.
    """
    _, V, T, H, W = video_3VTHW.shape
    if layout == "stacked":  # the official layout: "c (v t) h w -> t (v h) w c"
        return video_3VTHW.permute(2, 1, 3, 4, 0).reshape(T, V * H, W, 3).numpy()
    if layout != "grid":
        raise ValueError(f"unknown layout {layout!r}; choose 'stacked' or 'grid'")
    frames = video_3VTHW.permute(2, 3, 1, 4, 0).reshape(T, H, V * W, 3).numpy()  # "t h (v w) c"
    if not labels:
        return frames
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=label_height * 5 // 8)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    strip = Image.new("RGB", (V * W, label_height))
    draw = ImageDraw.Draw(strip)
    for v, label in enumerate(labels):
        draw.text((v * W + 8, label_height // 6), str(label), fill=(255, 255, 255), font=font)
    strip = np.broadcast_to(np.asarray(strip), (T, label_height, V * W, 3))
    return np.concatenate([strip, frames], axis=1)


def _as_3VTHW(video, n_views):
    """Accept uint8 [3, V*T, H, W], [1, 3, V*T, H, W] or [3, V, T, H, W]; return [3, V, T, H, W]."""
    if video.ndim == 5 and video.shape[0] == 1 and video.shape[1] == 3:
        video = video[0]
    if video.ndim == 5 and video.shape[0] == 3 and video.shape[1] == n_views:
        return video
    if video.ndim != 4 or video.shape[0] != 3 or video.shape[1] % n_views:
        raise ValueError(f"expected a video [3, V*T, H, W] with V={n_views}, got {tuple(video.shape)}")
    return video.unflatten(1, (n_views, video.shape[1] // n_views))


def save_multiview_video(path, video, n_views, fps, layout="stacked", labels=None, crf=18):
    """Write a uint8 multiview video to an mp4 atomically (temp file + rename), libx264 yuv420p."""
    import imageio.v2 as imageio
    if video.dtype != torch.uint8:
        raise TypeError(f"save_multiview_video expects uint8, got {video.dtype}")
    frames = arrange_views(_as_3VTHW(video.cpu(), n_views), layout, labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        writer = imageio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=float(fps), codec="libx264",
                                    pixelformat="yuv420p", quality=None, macro_block_size=1,
                                    ffmpeg_log_level="error", output_params=["-crf", str(crf)])
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_text(path, text):
    """Atomic small text file."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# 6. Generation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latents(net, noise, context, uncond_context, guidance, view_indices, fps, gt=None, cond_mask=None,
                   steps=STEPS, progress=False, sigmas=None, device=None):
    """Full latents [B, 16, V*T, h, w] from full-size inputs; sharded over the net's cp group if it has one.

    Every rank passes the same full inputs (same seed, same noise) and gets the same full result.
    `device` defaults to the net's; pass it when the weights live elsewhere (FSDP2 CPU offload).
    """
    n_views = context.shape[1] // TEXT_SLOT_TOKENS
    group = _cp_group(net)
    device = device if device is not None else next(net.parameters()).device
    if group is not None:  # keep this rank's frames of every view (attention.shard_views)
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        shard = lambda t, dim: None if t is None else shard_views(t, n_views, rank, cp, dim).contiguous()  # noqa: E731
        noise, gt, cond_mask, view_indices = shard(noise, 2), shard(gt, 2), shard(cond_mask, 2), shard(view_indices, 1)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    x0_fn = guided_x0_fn(net, to(context), to(uncond_context), guidance, to(view_indices), to(fps), to(gt),
                         to(cond_mask))
    sigmas = karras_sigmas(steps) if sigmas is None else sigmas
    latent = sample_ab2(x0_fn, to(noise).float(), sigmas, progress=progress)
    if group is not None:
        latent = all_gather_views(latent, n_views, group)
    return latent


@torch.no_grad()
def sample_batch_for_training(net, vae, batch, guidance, seed, steps=STEPS, num_conditional_frames=0):
    """uint8 video [B, 3, V*T, H, W] sampled for a training batch (train.py's periodic samples).

    Keys of `batch`: see the module docstring. num_conditional_frames counts LATENT frames per view
    (0, 1 or 2, as in training's condition mask), taken from the start of every view of batch["video"].
    The uncond branch uses zero text, as the official training-time sampler does. Works with the net
    in context-parallel mode (every rank gets the full video).
    """
    video, context = batch["video"], batch["t5_text_embeddings"].float()
    if video.ndim == 6:  # the data loader's [B, V, T, 3, H, W]
        video = video.permute(0, 3, 1, 2, 4, 5).flatten(2, 3)
        V = batch["video"].shape[1]
    else:
        V = int(batch.get("n_views", context.shape[1] // TEXT_SLOT_TOKENS))
    if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[1] != 3 or video.shape[2] % V:
        raise ValueError(f"batch['video'] must be uint8 [B, 3, V*T, H, W] or [B, V, T, 3, H, W] with V={V}, "
                         f"got {batch['video'].dtype} {tuple(batch['video'].shape)}")
    B, _, VT, H, W = video.shape
    T = VT // V
    t = (T - 1) // vae.time_factor + 1
    if num_conditional_frames not in (0, 1, 2) or num_conditional_frames > t:
        raise ValueError(f"num_conditional_frames counts latent frames per view (0, 1 or 2), got "
                         f"{num_conditional_frames} (5 pixel frames = 2 latent frames)")
    views = batch["view_indices"] if "view_indices" in batch else batch["view_ids"].repeat_interleave(t, dim=1)
    fps = torch.as_tensor(batch["fps"], dtype=torch.float32).reshape(-1).expand(B)
    gt = mask = None
    if num_conditional_frames:
        n_pixel = 1 + vae.time_factor * (num_conditional_frames - 1)
        frames = video.unflatten(2, (V, T))[:, :, :, :n_pixel]  # [B, 3, V, n, H, W]
        gt, mask = encode_conditioning(vae, frames, t)
    noise = initial_noise((B, vae.z_dim, V * t, H // vae.space_factor, W // vae.space_factor), seed)
    # The batch's device, not the weights': with offload=all the sharded weights live in CPU memory.
    latent = sample_latents(net, noise, context, torch.zeros_like(context), guidance, views, fps, gt, mask,
                            steps=steps, device=context.device)
    return to_uint8(decode_views(vae, latent, V, _cp_group(net)))


@torch.no_grad()
def generate(net, vae, context, uncond_context, *, view_ids, fps, height, width, num_frames, guidance=7.0,
             seed=0, steps=STEPS, cond_frames=None, progress=False):
    """One sample: (uint8 video [3, V*T, H, W], latent [1, 16, V*t, h, w]).

    cond_frames: uint8 [3, V, n, H, W] (n = 1 or 5 pixel frames at the start of every view) or None.
    fps is the RoPE fps. Under context parallelism every rank returns the same video.
    """
    V = len(view_ids)
    f, s = vae.time_factor, vae.space_factor
    if (num_frames - 1) % f or height % (2 * s) or width % (2 * s):
        raise ValueError(f"need num_frames = 1 + {f}k and height/width divisible by {2 * s}, got "
                         f"{num_frames} frames of {height}x{width}")
    t = (num_frames - 1) // f + 1
    gt = mask = None
    if cond_frames is not None and cond_frames.shape[2] > 0:
        gt, mask = encode_conditioning(vae, cond_frames[None], t)
    noise = initial_noise((1, vae.z_dim, V * t, height // s, width // s), seed)
    latent = sample_latents(net, noise, context, uncond_context, guidance, latent_view_indices(view_ids, t),
                            torch.tensor([float(fps)]), gt, mask, steps=steps, progress=progress)
    return to_uint8(decode_views(vae, latent, V, _cp_group(net)))[0], latent


# ---------------------------------------------------------------------------------------------------
# 7. CLI
# ---------------------------------------------------------------------------------------------------


def _parse_ids(text):
    return [int(x) for x in text.replace(",", " ").split()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample multi-camera videos from a multiview DiT checkpoint.")
    a = p.add_argument
    a("--ckpt", help="official .pt/.safetensors, our checkpoints/model/iter_*.pt, or a LoRA checkpoint")
    a("--load_ema", action="store_true", help="use the net_ema. weights of a training checkpoint")
    a("--run_config", help="training config JSON (default: <run>/checkpoints/config.json of our checkpoints)")
    a("--base_ckpt", help="base DiT weights for an adapter-only LoRA file (default: from the run config)")
    a("--lora_alpha", type=float, help="LoRA alpha (default: the file's metadata or run config, else alpha = rank)")
    a("--lora_unmerged", action="store_true",
      help="keep LoRA adapters as separate low-rank branches instead of folding them into the weights (slower)")
    a("--preset", help="DiT preset when there is no run config (official weights: 2b)")
    a("--vae", help=f"Wan2.1 tokenizer.pth (default: run config, else {OFFICIAL['vae_path']})")
    a("--vae_preset", help="VAE preset (default: run config, else wan2.1)")
    a("--vae_seed", type=int, help="use a random VAE built from this seed (demo runs; default: run config)")
    a("--t5", help=f"local T5 directory (default: run config, else {OFFICIAL['t5']})")
    a("--prompt", help="text, or a .txt (first line), .pickle/.pkl embedding or official .pt [1, V*512, D]")
    a("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT,
      help="same forms as --prompt; '' = official no-op (uncond = cond, CFG does nothing)")
    a("--uncond", choices=["negative", "zero"], default="negative",
      help="uncond text: the negative prompt (official) or zero text (training-time sampling)")
    a("--caption_view", type=int, help="context slot of the caption (default: the view with id 0, else 0)")
    a("--input_path", nargs="+", help="conditioning mp4: views concatenated in time (official), or one per view")
    a("--num_conditional_frames", type=int, choices=[0, 1, 5], help="pixel frames per view (default 1 with input)")
    a("--n_views", type=int, help="number of views (default: run config, else 7)")
    a("--view_ids", type=_parse_ids, help="camera ids in view order, e.g. 4,5,0,1,2 (default: run config, else 0..V-1)")
    a("--height", type=int)
    a("--width", type=int)
    a("--num_frames", type=int, help="pixel frames per view (default: run config, else 29)")
    a("--fps", type=float, help="data fps: mp4 frame rate and RoPE time scale (default 10, Waymo's)")
    a("--official_fps30", action="store_true", help="feed fps 30 to RoPE like the official script")
    a("--seed", type=int, default=0)
    a("--guidance", type=float, default=7.0)
    a("--steps", type=int, default=STEPS)
    a("--save_path", default="outputs/sample.mp4")
    a("--grid", action="store_true", help="also write <save_path>_grid.mp4: views side by side, labelled")
    a("--batch_input_json", help="JSON list of {prompt, input_video, output_video[, seed, negative_prompt]}")
    a("--overwrite", action="store_true", help="re-generate outputs that already exist")
    a("--dtype", choices=["bf16", "fp32"], help="DiT and VAE dtype (default: bf16 on GPU, fp32 on CPU)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--benchmark", action="store_true",
      help="time sampling with random weights (default 2b, 720p, 7 views, 29 frames; --preset/--n_views/... change it)")
    a("--bench_steps", type=int, default=3, help="--benchmark: steps to time (0 = all --steps)")
    args = p.parse_args(argv)
    if not args.benchmark and not args.ckpt:
        p.error("--ckpt is required")
    return args


def resolve_settings(args, run_config):
    """Every sampling setting: CLI flag, else the run config, else the official default."""
    rc = run_settings(run_config)
    pick = lambda flag, name: flag if flag is not None else rc.get(name, OFFICIAL.get(name))  # noqa: E731
    s = {name: pick(getattr(args, flag), name) for flag, name in (
        ("preset", "dit_preset"), ("height", "height"), ("width", "width"), ("num_frames", "num_frames"),
        ("vae_preset", "vae_preset"), ("t5", "t5"), ("base_ckpt", "base_ckpt"), ("lora_alpha", "lora_alpha"))}
    view_ids = args.view_ids or rc.get("view_ids")
    n_views = args.n_views or (len(view_ids) if view_ids else OFFICIAL["n_views"])
    view_ids = list(view_ids) if view_ids else list(range(n_views))  # the official script: 0..V-1
    if len(view_ids) != n_views:
        raise ValueError(f"--n_views {n_views} but {len(view_ids)} view ids {view_ids}")
    s["view_ids"] = view_ids
    labels = rc.get("labels")
    s["labels"] = labels if labels and len(labels) == n_views and not args.view_ids else [f"view {i}" for i in view_ids]
    front_slot = view_ids.index(0) if 0 in view_ids else 0  # the front camera (id 0)
    if args.caption_view is not None:
        s["caption_view"] = args.caption_view
    else:  # the run's slot only belongs to the run's view order
        s["caption_view"] = front_slot if args.view_ids else rc.get("caption_view", front_slot)
    s["fps"] = float(pick(args.fps, "fps"))
    s["rope_fps"] = 30.0 if args.official_fps30 else s["fps"]
    if args.vae or args.vae_seed is not None:  # an explicit VAE choice replaces the run's
        s["vae_path"], s["vae_seed"] = args.vae, args.vae_seed
    else:
        s["vae_path"] = rc.get("vae_path", OFFICIAL["vae_path"] if run_config is None else None)
        s["vae_seed"] = rc.get("vae_seed")
    return s


def _jobs(args):
    """[(prompt, negative_prompt, input_paths, save_path, seed)] from the CLI or the batch JSON."""
    if not args.batch_input_json:
        if args.prompt is None:
            raise ValueError("--prompt is required (or --batch_input_json)")
        return [dict(prompt=args.prompt, negative_prompt=args.negative_prompt, input=args.input_path,
                     save_path=args.save_path, seed=args.seed)]
    try:
        entries = json.loads(Path(args.batch_input_json).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--batch_input_json {args.batch_input_json}: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"{args.batch_input_json}: expected a JSON list of objects")
    jobs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "prompt" not in e or "output_video" not in e:
            raise ValueError(f"{args.batch_input_json}: entry {i} needs 'prompt' and 'output_video'")
        inp = e.get("input_video")
        jobs.append(dict(prompt=e["prompt"], negative_prompt=e.get("negative_prompt", args.negative_prompt),
                         input=[inp] if isinstance(inp, str) else inp, save_path=e["output_video"],
                         seed=int(e.get("seed", args.seed))))
    return jobs


def _init_distributed(device):
    """torchrun: one process group over all ranks = the context-parallel group. Returns (group, rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.group.WORLD, dist.get_rank()


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
        return benchmark_sampling(n_views=args.n_views or 7, height=args.height or 704, width=args.width or 1280,
                                  num_frames=args.num_frames or 29, steps=args.steps, timed_steps=args.bench_steps,
                                  guidance=args.guidance, preset=args.preset or "2b", device=args.device, dtype=dtype)
    group, rank = _init_distributed(args.device)
    device = f"cuda:{torch.cuda.current_device()}" if args.device.startswith("cuda") and group else args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if "cuda" in device else "fp32")]
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        run_config = find_run_config(args.ckpt, args.run_config)
        s = resolve_settings(args, run_config)
        jobs = [j for j in _jobs(args) if args.overwrite or not os.path.exists(j["save_path"])]
        if not jobs:
            log("all outputs exist; nothing to do (--overwrite to redo)")
            return
        V = len(s["view_ids"])

        # Text first (the T5 is freed before the DiT loads).
        prompts = {}
        for j in jobs:
            prompts[j["prompt"]] = parse_prompt(j["prompt"])
            if args.uncond == "negative" and j["negative_prompt"]:
                prompts[j["negative_prompt"]] = parse_prompt(j["negative_prompt"])
        texts = [v for kind, v in prompts.values() if kind == "text"]
        if texts:
            log(f"encoding {len(set(texts))} prompt(s) with the T5 at {s['t5']}")
        encoded = encode_texts(texts, s["t5"], device)

        log(f"loading {args.ckpt}" + (" (EMA)" if args.load_ema else "") +
            (f" with run config: preset {s['dit_preset']}" if run_config else ""))
        net = load_dit_for_sampling(args.ckpt, s["dit_preset"],
                                    load_ema=args.load_ema, dtype=dtype, device=device,
                                    base_ckpt=s["base_ckpt"], lora_alpha=s["lora_alpha"],
                                    merge_lora=not args.lora_unmerged)
        net.enable_context_parallel(group)
        n_cams = net.config["n_cameras_emb"]
        if max(s["view_ids"]) >= n_cams or min(s["view_ids"]) < 0:
            raise ValueError(f"view ids {s['view_ids']} outside the model's 0..{n_cams - 1}")
        vae = build_vae(s["vae_preset"], s["vae_path"], s["vae_seed"], dtype=dtype, device=device)
        dim = net.config["crossattn_emb_channels"]
        log(f"{V} views (ids {s['view_ids']}), {s['num_frames']} frames of {s['height']}x{s['width']}, "
            f"RoPE fps {s['rope_fps']}, {args.steps} steps, guidance {args.guidance}, caption slot {s['caption_view']}")

        for j in jobs:
            context = build_context(prompts[j["prompt"]], V, s["caption_view"], dim, encoded, "--prompt")
            if args.uncond == "zero":
                uncond = torch.zeros_like(context)
            elif j["negative_prompt"]:
                uncond = build_context(prompts[j["negative_prompt"]], V, s["caption_view"], dim, encoded,
                                       "--negative_prompt")
            else:
                uncond = context  # official: empty negative prompt -> uncond = cond, CFG is a no-op
                if args.guidance:
                    log("note: empty negative prompt: uncond = cond as in the official pipeline, so guidance has "
                        "no effect (--uncond zero guides against zero text, as training-time samples do)")
            n_cond = args.num_conditional_frames
            n_cond = (1 if j["input"] else 0) if n_cond is None else n_cond
            if n_cond and not j["input"]:
                raise ValueError(f"{n_cond} conditional frames requested but no --input_path / input_video")
            cond = load_conditioning_frames(j["input"], V, n_cond, s["height"], s["width"]) if n_cond else None
            t0 = time.perf_counter()
            video, _ = generate(net, vae, context, uncond, view_ids=s["view_ids"], fps=s["rope_fps"],
                                height=s["height"], width=s["width"], num_frames=s["num_frames"],
                                guidance=args.guidance, seed=j["seed"], steps=args.steps, cond_frames=cond,
                                progress=rank == 0)
            if rank != 0:
                continue
            # sidecars first: the main mp4 appears last and marks the job done (re-runs skip it)
            out = Path(j["save_path"])
            out.parent.mkdir(parents=True, exist_ok=True)
            kind, value = prompts[j["prompt"]]
            _write_text(out.with_suffix(".txt"), (value if kind == "text" else j["prompt"]) + "\n")
            settings = dict(ckpt=str(args.ckpt), load_ema=args.load_ema, prompt=j["prompt"],
                            negative_prompt=j["negative_prompt"] if args.uncond == "negative" else None,
                            uncond=args.uncond, input=j["input"], num_conditional_frames=n_cond, seed=j["seed"],
                            guidance=args.guidance, steps=args.steps, **s, seconds=time.perf_counter() - t0)
            _write_text(out.with_suffix(".json"), json.dumps(settings, indent=1, default=str) + "\n")
            if args.grid:
                save_multiview_video(out.with_name(out.stem + "_grid.mp4"), video, V, s["fps"], "grid", s["labels"])
            save_multiview_video(out, video, V, s["fps"])
            log(f"wrote {out} ({video.shape[1] // V} frames x {V} views, {time.perf_counter() - t0:.1f} s)")
    finally:
        if group is not None:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Benchmark: 720p, 7 views, 29 frames, 2b with random weights, bf16, CFG (batch of 2)
# ---------------------------------------------------------------------------------------------------


def benchmark_sampling(n_views=7, height=704, width=1280, num_frames=29, steps=STEPS, timed_steps=3,
                       guidance=7.0, preset="2b", vae_preset="wan2.1", device="cuda", dtype=torch.bfloat16,
                       decode=True):
    """Per-step and total sampling time of the official setting on one GPU; prints a BENCH.md row.

    Random weights (speed does not depend on them). Every step costs the same (one CFG evaluation of
    batch 2 plus a tiny update), so after one warm-up step (kernel tuning) `timed_steps` steps of the
    real schedule are timed and the full run (steps + final clean evaluation + decoding) is projected;
    timed_steps=0 runs and times all of them (about 20 min for 720p x 7 views on one H100).
    """
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    net = build_dit(preset, device=device, dtype=dtype).eval().requires_grad_(False)
    vae = build_vae(vae_preset, seed=0, dtype=dtype, device=device) if decode else None
    t = (num_frames - 1) // 4 + 1
    D = net.config["crossattn_emb_channels"]
    context = torch.zeros(1, n_views * TEXT_SLOT_TOKENS, D)
    context[0, :60] = torch.randn(60, D)  # a 60-token caption in slot 0, the other slots empty
    uncond = torch.zeros_like(context)
    uncond[0, :40] = torch.randn(40, D)  # a negative prompt in slot 0: two CFG branches
    noise = initial_noise((1, 16, n_views * t, height // 8, width // 8), 0)
    x0_fn = guided_x0_fn(net, context.to(device), uncond.to(device), guidance,
                         latent_view_indices(list(range(n_views)), t).to(device), torch.tensor([10.0], device=device))
    n = steps if timed_steps <= 0 else min(timed_steps + 1, steps)  # +1: the warm-up step
    times = []

    def tick(i, x0, x):
        sync()
        times.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    latent = sample_ab2(x0_fn, noise.to(device), karras_sigmas(steps)[: n + 1], callback=tick)
    sync()
    end = time.perf_counter()
    per_step = np.diff([start] + times)
    steady = float(np.mean(per_step[1:])) if n > 1 else float(per_step[0])
    final_eval = end - times[-1]
    decode_s = 0.0
    if decode:
        t0 = time.perf_counter()
        decode_views(vae, latent, n_views)
        sync()
        decode_s = time.perf_counter() - t0
    measured = n == steps
    sampling = end - start if measured else float(per_step[0]) + (steps - 1) * steady + final_eval
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", preset=preset, n_views=n_views,
                  height=height, width=width, num_frames=num_frames, steps=steps, dtype=str(dtype),
                  first_step_s=float(per_step[0]), per_step_s=steady, final_eval_s=final_eval,
                  sampling_s=sampling, decode_s=decode_s, total_s=sampling + decode_s, total_measured=measured,
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
    print(json.dumps(result, indent=1))
    print(f"| sample.py {preset}, {n_views} views x {num_frames} frames {height}x{width}, {steps} steps + final, "
          f"CFG batch 2 | {result['device']} | {steady:.2f} s/step | {result['total_s']:.0f} s total"
          f"{'' if measured else ' (projected)'}, decode {decode_s:.1f} s |")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)  # no repr quotes
        sys.exit(1)
