"""Post-train the Cosmos-Predict2 2B multiview DiT on multi-camera driving video (full fine-tune or LoRA).

    torchrun --nproc_per_node=8 train.py --config waymo5views [key=value ...]
    torchrun --nproc_per_node=8 train.py --config waymo5views cp=8   # the official split: one sample, 8 GPUs
    python train.py --config demo                 # tiny model, synthetic data, CPU, a few minutes

One file, read top to bottom:
  1. config       flat dict of defaults + named presets, `key=value` overrides (type-checked)
  2. data         the official multiview loader semantics: every window at stride 1, all cameras, front caption
  3. objective    sigma draws, frame conditioning, text dropout, velocity MSE; LR schedule; power EMA
  4. model        process groups (data x context parallel), FSDP2, mixed precision, activation checkpointing,
                 torch.compile of the blocks, VAE
  5. checkpoints  the official folder layout, atomic writes, exact resume
  6. training     the loop: step, clip, update, EMA, logs, periodic samples
  7. demo + CLI   prepare the synthetic set and a tiny T5 on the spot, then train

The objective and recipe are those of the official Waymo post-training experiments
(shared/reference/model.md sections 3 and 5; data.md section 3). Resume is exact: the random draws of
step `it` come from a generator seeded by (seed, it, global sample index), the data order is a pure
function of the iteration, and model, EMA, optimizer and schedule are restored bit for bit.
"""

import argparse
import ast
import bisect
import contextlib
import datetime
import difflib
import functools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import attention
import conv
from embed import NUM_TOKENS, find_embedding, load_embedding
import model
from model import VAE_PRESETS, build_dit, denoise, dit_config

# ---------------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------------
# The defaults ARE the official 720p full fine-tune (`waymo5views`); presets override a few keys.

WAYMO_CAMERAS = ["pinhole_side_left", "pinhole_front_left", "pinhole_front", "pinhole_front_right",
                 "pinhole_side_right"]  # left to right: the view order of every sample
WAYMO_VIEW_IDS = {"pinhole_front": 0, "pinhole_front_right": 1, "pinhole_side_right": 2,
                  "pinhole_side_left": 4, "pinhole_front_left": 5}  # rows of the 7-view embedding

DEFAULTS = dict(
    # run: everything goes to <output_root>/<project>/<group>/<name>/
    output_root="checkpoints",
    project="posttraining",
    group="multiview",
    name="2b_720p_10fps_7views_29frames_waymo5views",
    seed=0,
    max_iter=100_000,
    # model
    model="2b",  # a model.py DiT preset
    init="checkpoints/nvidia/Cosmos-Predict2-2B-Multiview/model-720p-10fps-7views-29frames.pt",  # '' = scratch
    precision="bf16",  # bf16: bf16 compute over fp32 master weights; fp32: everything fp32 (tests, demo)
    # none | full | save_attention (recompute all but attention). The official 480p and LoRA runs use
    # none, but they split each sample over 8 GPUs (cp=8); with cp=1 a rank holds a whole sample.
    activation_checkpointing="save_attention",
    # save_attention only: the first N blocks keep their self-attention outputs, the others recompute
    # everything (as full); -1 = all blocks. A kept block costs ~4.2 KB per token (~0.55 GiB at 720p-5v).
    saved_attention_blocks=-1,
    # save_attention only: the first N blocks also keep the outputs of their token-wise linear layers that
    # do not widen (q, k, v, output projections, the MLP's second layer), so backward does not run those
    # GEMMs again: ~1.3 GiB per block at 480p-5v for ~5.5 ms of recompute. For memory left over.
    saved_linear_blocks=0,
    # the last N blocks are not checkpointed at all (they keep every activation: no recompute), where
    # memory is left over, e.g. 480p on one 80 GB GPU; 0 = checkpoint every block as the mode says.
    uncheckpointed_blocks=0,
    # attention.py backend. auto: our kernels both ways for self-attention on Hopper (SDPA for cross-
    # attention's 512 keys), our forward + cuDNN's backward on newer GPUs, SDPA elsewhere (attention.py).
    attention_backend="auto",
    # torch.compile every DiT block (inside its checkpoint) and the VAE encoder: fuses the elementwise
    # chains (RMSNorm, RoPE, LayerNorm + modulation, gates, residuals; the VAE's norm -> SiLU -> pad).
    # The first iteration pays the compilation.
    compile=False,
    offload="none",  # none | ema: EMA in CPU memory, updated in a background thread | all: also the fp32
    # master weights, gradients and AdamW (FSDP2 CPU offload; the CPU step runs in the background behind
    # the next VAE encode) -- what lets one 80 GB GPU train 720p-7v (68-70 s/it on an H100, BENCH.md)
    lora_rank=0,  # > 0: train LoRA adapters only (lora.py)
    lora_alpha=0,
    lora_targets="q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2",
    cp=1,  # context-parallel group size: ranks that split one sample's latent frames (world = dp x cp)
    # VAE (frozen; encodes the videos online)
    vae="wan2.1",  # wan2.1: the official tokenizer from vae_path; tiny: random weights from vae_seed
    vae_path="checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth",
    vae_seed=0,
    vae_views_per_call=1,  # views encoded per VAE call (1 bounds memory at 720p)
    # data (data.md section 3)
    dataset_dir="datasets/waymo",
    camera_keys=list(WAYMO_CAMERAS),
    camera_to_view_id=dict(WAYMO_VIEW_IDS),
    front_camera_key="pinhole_front",  # the only camera whose caption is used
    num_frames=29,  # pixel frames per view (1 + 4k; 29 -> 8 latent frames)
    height=704,
    width=1280,
    batch_size=1,  # samples per data-parallel rank
    num_workers=6,
    # objective (model.md section 3)
    loss_scale=10.0,
    adjust_video_noise=True,  # sigma = sqrt(latent frames per view) * exp(N(0, 1))
    high_sigma_ratio=0.05,  # share of samples with sigma log-uniform in [high_sigma_min, high_sigma_max]
    high_sigma_min=200.0,
    high_sigma_max=1e5,
    min_conditional_frames=0,  # clean latent frames per view, drawn uniformly in [min, max]
    max_conditional_frames=1,
    text_dropout=0.2,  # probability that a sample's whole caption is zeroed
    # optimisation (model.md section 5.1)
    lr=2 ** -14.5,
    weight_decay=0.1,
    adam_betas=(0.9, 0.99),
    adam_eps=1e-8,
    grad_clip=1.0,
    warmup_iters=2000,  # lr multiplier: lr_f_start -> lr_f_max linearly over warmup_iters,
    decay_iters=40_000,  # then linearly to lr_f_min at decay_iters, held there afterwards
    lr_f_start=1e-6,
    lr_f_max=0.25,
    lr_f_min=0.1,
    ema_rate=0.1,  # sigma_rel of the power-function EMA
    # logs, checkpoints, samples
    log_every=100,
    save_every=500,  # also at max_iter; 0: never (benchmarks)
    keep_checkpoints=0,  # 0 keeps all; N keeps the newest N
    sample_every=500,  # 0: never; otherwise also at max_iter
    sample_guidance=[0.0, 2.0, 7.0],
    sample_steps=35,
    sample_conditional_frames=1,
    # the demo: build what is missing before training
    synthetic_clips=0,  # > 0: write this many synthetic clips into dataset_dir if it has none
    synthetic_frames=33,
    t5_dir="",  # T5 used to embed captions that have no embedding yet ('' = never embed here)
    tiny_t5_dim=0,  # > 0: create a random T5 of this width at t5_dir if missing
    # tests: 'step:N' SIGKILLs the process after iteration N; 'save:N' in the middle of checkpoint N
    debug_kill="",
)

PRESETS = {
    "waymo5views": dict(),
    "waymo5views_480p": dict(name="2b_480p_10fps_7views_29frames_waymo5views", height=480, width=848),
    "waymo5views_lora": dict(name="lora_2b_720p_10fps_7views_29frames_waymo5views", lora_rank=16, lora_alpha=16),
    # Tiny DiT from scratch, random tiny VAE, synthetic clips, tiny random T5: the whole path on a CPU.
    "demo": dict(group="demo", name="demo_cpu", model="demo", init="", precision="fp32",
                 activation_checkpointing="none", vae="tiny", vae_path="", vae_views_per_call=5,
                 dataset_dir="datasets/synthetic", num_frames=9, height=64, width=96, batch_size=1, num_workers=1,
                 lr=1e-3, warmup_iters=25, decay_iters=300, lr_f_start=0.01, lr_f_max=1.0, lr_f_min=0.1,
                 max_iter=300, log_every=25, save_every=100, sample_every=300, sample_guidance=[0.0, 3.0],
                 sample_steps=20, synthetic_clips=8, t5_dir="checkpoints/tiny_t5", tiny_t5_dim=64),
}

_CHOICES = dict(precision=("bf16", "fp32"), activation_checkpointing=("none", "full", "save_attention"),
                attention_backend=attention.BACKENDS, vae=tuple(VAE_PRESETS), offload=("none", "ema", "all"))


def parse_value(key, text, default):
    """Parse one override against the default's type: literal for numbers/lists/dicts, raw text for strings."""
    if isinstance(default, str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        return value if isinstance(value, str) else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{key}={text!r}: not a valid {type(default).__name__} literal")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok and default:  # elements like the default's (ints pass for floats)
            want = type(default[0])
            ok = all(isinstance(v, want) and not (isinstance(v, bool) and want is not bool)
                     or (want is float and type(v) is int) for v in value)
            value = [float(v) for v in value] if ok and want is float else value
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{key}={text!r}: expected {type(default).__name__} like {default!r}, "
                         f"got {type(value).__name__}")
    return value


def resolve_config(preset, overrides=()):
    """Defaults + preset + `key=value` overrides -> a checked, flat config dict."""
    if preset not in PRESETS:
        raise ValueError(f"unknown config {preset!r}; choose one of {sorted(PRESETS)}")
    config = dict(DEFAULTS, **PRESETS[preset])
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=3)
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        config[key] = parse_value(key, text, DEFAULTS[key])
    check_config(config)
    return config


def check_config(c):
    """Reject settings the code cannot run, with the reason."""
    for key, allowed in _CHOICES.items():
        if c[key] not in allowed:
            raise ValueError(f"{key}={c[key]!r}: choose one of {list(allowed)}")
    if c["num_frames"] < 1 or (c["num_frames"] - 1) % 4:
        raise ValueError(f"num_frames={c['num_frames']}: the VAE needs 1 + 4k frames (e.g. 29)")
    if c["height"] % 16 or c["width"] % 16:
        raise ValueError(f"height x width = {c['height']}x{c['width']}: both must be multiples of 16 "
                         f"(8x VAE downsampling, then 2x2 patches)")
    missing = [k for k in c["camera_keys"] if k not in c["camera_to_view_id"]]
    if missing:
        raise ValueError(f"camera_to_view_id has no id for camera(s) {missing}")
    if c["front_camera_key"] not in c["camera_keys"]:
        raise ValueError(f"front_camera_key {c['front_camera_key']!r} is not in camera_keys {c['camera_keys']}")
    latent_frames = 1 + (c["num_frames"] - 1) // 4
    if c["cp"] < 1 or latent_frames % c["cp"]:
        divisors = [d for d in range(1, latent_frames + 1) if latent_frames % d == 0]
        raise ValueError(f"cp={c['cp']}: context parallelism splits the {latent_frames} latent frames per view "
                         f"(num_frames={c['num_frames']}) evenly over the cp ranks; choose cp in {divisors}")
    if not 0 <= c["min_conditional_frames"] <= c["max_conditional_frames"] <= 1 + (c["num_frames"] - 1) // 4:
        raise ValueError("need 0 <= min_conditional_frames <= max_conditional_frames <= latent frames per view")
    for key in ("batch_size", "max_iter", "log_every"):
        if c[key] < 1:
            raise ValueError(f"{key}={c[key]} must be >= 1")
    if c["lora_rank"] < 0 or c["lora_alpha"] < 0 or (c["lora_rank"] > 0) != (c["lora_alpha"] > 0):
        raise ValueError("set both lora_rank and lora_alpha (> 0) for LoRA, or neither (0)")
    if not 0 <= c["warmup_iters"] < c["decay_iters"]:
        raise ValueError(f"warmup_iters={c['warmup_iters']}, decay_iters={c['decay_iters']}: the schedule needs "
                         f"0 <= warmup_iters < decay_iters")
    if len(c["adam_betas"]) != 2 or not all(0 <= b < 1 for b in c["adam_betas"]):
        raise ValueError(f"adam_betas={c['adam_betas']}: two values in [0, 1)")
    if c["sample_conditional_frames"] not in (0, 1, 2) or c["sample_conditional_frames"] > latent_frames:
        raise ValueError(f"sample_conditional_frames={c['sample_conditional_frames']}: latent frames per view "
                         f"given to the periodic samples, 0, 1 or 2 (at most the {latent_frames} latent frames)")
    n_cameras = dit_config(c["model"])["n_cameras_emb"]
    bad_ids = {k: v for k, v in c["camera_to_view_id"].items() if k in c["camera_keys"] and not 0 <= v < n_cameras}
    if bad_ids:
        raise ValueError(f"camera_to_view_id {bad_ids}: view ids must be 0..{n_cameras - 1} "
                         f"(model {c['model']!r} has {n_cameras} camera embeddings)")
    blocks = dit_config(c["model"])["num_blocks"]
    if not -1 <= c["saved_attention_blocks"] <= blocks:
        raise ValueError(f"saved_attention_blocks={c['saved_attention_blocks']}: -1 (all) or 0..{blocks} "
                         f"(model {c['model']!r} has {blocks} blocks)")
    if not 0 <= c["uncheckpointed_blocks"] <= blocks:
        raise ValueError(f"uncheckpointed_blocks={c['uncheckpointed_blocks']}: 0..{blocks} "
                         f"(model {c['model']!r} has {blocks} blocks)")
    kept = blocks if c["saved_attention_blocks"] == -1 else c["saved_attention_blocks"]
    if c["saved_linear_blocks"] and c["activation_checkpointing"] != "save_attention":
        raise ValueError(f"saved_linear_blocks={c['saved_linear_blocks']} needs activation_checkpointing="
                         f"save_attention (it is {c['activation_checkpointing']!r})")
    if not 0 <= c["saved_linear_blocks"] <= kept:
        raise ValueError(f"saved_linear_blocks={c['saved_linear_blocks']}: 0 up to the {kept} blocks that keep "
                         f"their attention output")
    if c["saved_attention_blocks"] != -1 and c["activation_checkpointing"] != "save_attention":
        raise ValueError(f"saved_attention_blocks={c['saved_attention_blocks']} needs "
                         f"activation_checkpointing=save_attention (it is {c['activation_checkpointing']!r})")


def run_dir(config):
    """<output_root>/<project>/<group>/<name>: logs and samples; checkpoints/ below it."""
    return Path(config["output_root"]) / config["project"] / config["group"] / config["name"]


# ---------------------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------------------
# Official MultiviewDataset semantics (data.md section 3): clips = sorted file names of the first camera's
# folder; the last int(0.1 N) + 1 are validation; one sample per start frame (stride 1) whose window fits
# in every camera; frames stretch-resized (bilinear, antialiased) to exactly (height, width) and truncated
# to uint8; views in camera_keys order; the front camera's caption in its view's 512-token slot, zeros in
# the others. A clip that cannot be used is reported once by name and skipped (no infinite retry loop).
# fps is the container's (10 for Waymo), as the reference takes decord's average fps; the DiT only uses
# it to scale RoPE time positions.


def ffmpeg_exe():
    """Path of the ffmpeg binary that imageio-ffmpeg bundles."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path):
    """(frame count, fps) of a video's first stream, by remuxing it to nowhere (no decoding)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    frames = re.findall(r"frame=\s*(\d+)", out.stderr)
    fps = re.search(r"Video:.*?, ([\d.]+) fps", out.stderr)
    if out.returncode != 0 or not frames:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"ffmpeg exit code {out.returncode}"
        raise ValueError(f"{path}: unreadable video ({last})")
    return int(frames[-1]), float(fps.group(1)) if fps else 24.0  # the official loader also falls back to 24


def read_frames(path, start, count):
    """Decode frames [start, start + count) as uint8 [count, H, W, 3]; selection by frame number (exact)."""
    import imageio_ffmpeg

    out = ["-vf", f"select=gte(n\\,{start})", "-fps_mode", "passthrough", "-frames:v", str(count)]
    reader = imageio_ffmpeg.read_frames(str(path), output_params=out)
    try:
        width, height = next(reader)["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    except (OSError, RuntimeError) as e:  # ffmpeg failed: keep the gist of its long report
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("===", "ffmpeg version"))]
        raise ValueError(f"{path}: unreadable video ({lines[-1] if lines else type(e).__name__})") from None
    finally:
        reader.close()
    if len(frames) != count:
        raise ValueError(f"{path}: has no frames {start}..{start + count - 1} (got {len(frames)} of {count})")
    return np.stack(frames)


def resize_frames(frames_THW3, height, width, chunk=8):
    """uint8 [T, H, W, 3] -> uint8 [T, 3, height, width]: /255, bilinear antialiased stretch, x255, truncate."""
    x = torch.from_numpy(frames_THW3).permute(0, 3, 1, 2)  # [T, 3, H, W]
    if x.shape[-2:] == (height, width):
        return x.contiguous()  # resizing to the same size is the identity, and so is the uint8 round trip
    out = []
    for part in x.split(chunk):  # bounded memory for full-resolution frames
        y = F.interpolate(part.float() / 255, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append((y * 255).clamp(0, 255).to(torch.uint8))  # truncation, as the reference loader does
    return torch.cat(out)


def clip_names(dataset_dir, camera_keys, split):
    """Sorted clip stems of the first camera, cut into train / val (the last int(0.1 N) + 1)."""
    folder = Path(dataset_dir) / "videos" / camera_keys[0]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: expected <dataset>/videos/<camera>/<clip>.mp4 "
                                f"(write it with prepare.py)")
    names = sorted(f.name for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    cutoff = int(0.1 * len(names)) + 1
    return names[:-cutoff] if split == "train" else names[-cutoff:]


def index_clip(dataset_dir, name, camera_keys, front_camera_key, num_frames):
    """One clip's index entry, or a string saying why the clip is unusable."""
    root, stem = Path(dataset_dir), os.path.splitext(name)[0]
    try:
        files = {cam: root / "videos" / cam / name for cam in camera_keys}
        for cam, path in files.items():
            if not path.is_file():
                raise ValueError(f"missing {path}")
        probes = [probe_video(path) for path in files.values()]
        frames = min(n for n, _ in probes)  # every camera must hold the whole window
        if frames < num_frames:
            raise ValueError(f"{frames} frames, fewer than num_frames={num_frames}")
        embedding = find_embedding(root / "t5_xxl" / front_camera_key, stem)
        width = load_embedding(embedding).shape[1]
    except (OSError, ValueError) as e:
        return f"{name}: {e}"
    return dict(clip=stem, files={c: str(p) for c, p in files.items()}, embedding=str(embedding),
                frames=frames, fps=probes[0][1], text_dim=width)


def index_dataset(dataset_dir, camera_keys, front_camera_key, num_frames, split="train", threads=16):
    """Usable clips of a split (probed in parallel); unusable ones are reported once and left out."""
    names = clip_names(dataset_dir, camera_keys, split)
    job = functools.partial(index_clip, dataset_dir, camera_keys=camera_keys, front_camera_key=front_camera_key,
                            num_frames=num_frames)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(job, names))
    for r in results:
        if isinstance(r, str):
            print(f"warning: skipping clip {r}", file=sys.stderr, flush=True)
    return [r for r in results if isinstance(r, dict)]


class MultiviewDataset(torch.utils.data.Dataset):
    """Every num_frames window (stride 1) of every indexed clip, as one multi-camera sample."""

    def __init__(self, clips, camera_keys, camera_to_view_id, front_camera_key, num_frames, height, width):
        self.clips, self.camera_keys = clips, list(camera_keys)
        self.view_ids = torch.tensor([camera_to_view_id[c] for c in camera_keys])
        self.front = self.camera_keys.index(front_camera_key)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.starts = np.cumsum([0] + [c["frames"] - num_frames + 1 for c in clips])  # first sample of each clip
        self.bad = set()  # clips that failed to load in this process

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        """A sample; one whose clip fails is replaced by the first window of the next loadable clip."""
        for _ in range(len(self.clips)):
            c = bisect.bisect_right(self.starts, index) - 1
            if c not in self.bad:
                try:
                    return self.load(self.clips[c], index - int(self.starts[c]))
                except (OSError, ValueError) as e:
                    self.bad.add(c)
                    print(f"warning: skipping clip {self.clips[c]['clip']} from now on: {e}", file=sys.stderr,
                          flush=True)
            index = int(self.starts[(c + 1) % len(self.clips)])
        raise RuntimeError("no clip of the data set could be loaded (see the warnings above)")

    def load(self, clip, start):
        """video uint8 [V, T, 3, H, W], caption context [V*512, D], view ids [V], fps."""
        videos = [resize_frames(read_frames(clip["files"][cam], start, self.num_frames), self.height, self.width)
                  for cam in self.camera_keys]
        caption = torch.from_numpy(load_embedding(clip["embedding"]))[:NUM_TOKENS]  # [L, D]
        context = torch.zeros(len(self.camera_keys), NUM_TOKENS, caption.shape[1])
        context[self.front, :caption.shape[0]] = caption  # other views: all-zero slots
        return dict(video=torch.stack(videos), t5_text_embeddings=context.flatten(0, 1), view_ids=self.view_ids,
                    fps=clip["fps"], clip=clip["clip"], start_frame=start)


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler order (shuffle, seed + epoch, padded, rank::world), endless, from any iteration."""

    def __init__(self, n, rank, world, batch_size, seed, start_iter=0):
        self.n, self.rank, self.world, self.batch_size, self.seed = n, rank, world, batch_size, seed
        self.per_rank = math.ceil(n / world)
        self.batches_per_epoch = self.per_rank // batch_size  # drop_last
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training samples cannot fill one batch of {batch_size} on each of {world} ranks")
        self.start_iter = start_iter

    def epoch_indices(self, epoch):
        """This rank's sample indices of one epoch (exactly torch's DistributedSampler with shuffle=True)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += (order * math.ceil(self.per_rank * self.world / self.n))[:self.per_rank * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self):
        epoch, batch = divmod(self.start_iter, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            yield from indices[batch * self.batch_size:self.batches_per_epoch * self.batch_size]
            epoch, batch = epoch + 1, 0


def worker_init(_):
    """Loader workers decode and resize; one thread each keeps them from fighting the trainer for cores."""
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# 3. Objective, schedule, EMA
# ---------------------------------------------------------------------------------------------------
# Rectified flow in EDM-sigma form: xt = x0 + sigma eps, the net predicts the velocity eps - x0, and
#   loss = loss_scale * mean((F - (eps - x0))^2 * (1 - mask))
# over all elements. This equals the official w(sigma) (x0 - x0_pred)^2 with w = (1 + sigma)^2 / sigma^2
# (tests/test_objective.py checks it in float64); conditional frames contribute zeros but stay in the mean.


def sample_seed(seed, iteration, index):
    """Seed of the random draws for global sample `index` at `iteration`: independent of world size."""
    return int(np.random.SeedSequence([seed, iteration, index]).generate_state(1, np.uint64)[0])


def draw_training_noise(config, shape_CTHW, n_views, iteration, sample_ids, device):
    """Random draws of one step: sigma [B], eps [B, C, T, H, W], conditional frames [B], text kept [B]."""
    C, T, H, W = shape_CTHW
    multiplier = math.sqrt(T // n_views) if config["adjust_video_noise"] else 1.0  # sqrt(state_t) = sqrt(8)
    lo, hi = math.log(config["high_sigma_min"]), math.log(config["high_sigma_max"])
    sigma, eps, n_cond, keep = [], [], [], []
    for index in sample_ids:
        g = torch.Generator(device=device).manual_seed(sample_seed(config["seed"], iteration, index))
        z, u_high, u_log, u_text = torch.randn(1, generator=g, device=device), *torch.rand(3, generator=g, device=device)
        s = multiplier * torch.exp(z[0])
        s = torch.where(u_high < config["high_sigma_ratio"], torch.exp(lo + u_log * (hi - lo)), s)
        sigma.append(s)
        n_cond.append(torch.randint(config["min_conditional_frames"], config["max_conditional_frames"] + 1, (),
                                    generator=g, device=device))
        keep.append(u_text >= config["text_dropout"])
        eps.append(torch.randn(C, T, H, W, generator=g, device=device))
    return dict(sigma=torch.stack(sigma), eps=torch.stack(eps), n_cond=torch.stack(n_cond), keep=torch.stack(keep))


def conditional_mask(n_cond_B, n_views, shape_BCTHW):
    """[B, 1, V*T, H, W]: 1 on the first n_cond latent frames of every view (clean, given frames)."""
    B, _, T, H, W = shape_BCTHW
    frame_B1T = torch.arange(T // n_views, device=n_cond_B.device).repeat(n_views)[None] < n_cond_B[:, None]
    return frame_B1T.float()[:, None, :, None, None].expand(B, 1, T, H, W)


def diffusion_loss(net, x0_BCTHW, context_BMD, view_ids_BT, fps_B, noise, n_views, loss_scale):
    """The official training loss for one batch (a scalar, fp32) through model.denoise.

    Inputs are full size. If the net is in context-parallel mode (model.enable_context_parallel) the
    loss is the mean over this rank's latent frames of every view (attention.shard_views); the shards
    are equal in size, so the mean of the group's losses is the loss of the whole batch.
    """
    B = x0_BCTHW.shape[0]
    mask = conditional_mask(noise["n_cond"], n_views, x0_BCTHW.shape)
    context = context_BMD * noise["keep"].to(context_BMD.dtype)[:, None, None]  # whole caption dropped
    xt = x0_BCTHW + noise["sigma"].view(B, 1, 1, 1, 1) * noise["eps"]
    target = noise["eps"] - x0_BCTHW
    group = getattr(net, "cp_group", None)
    if group is not None:  # the full draws are made on every rank, so a shard is exactly the cp=1 slice
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        shard = functools.partial(attention.shard_views, n_views=n_views, rank=rank, cp=cp)
        x0_BCTHW, xt, target, mask = shard(x0_BCTHW), shard(xt), shard(target), shard(mask)  # [B, C, V*T/cp, H, W]
        view_ids_BT = shard(view_ids_BT, dim=1)
    _, velocity = denoise(net, xt, noise["sigma"], context, view_ids_BT, fps_B, gt_BCTHW=x0_BCTHW,
                          cond_mask_B1THW=mask)
    err = (velocity - target) * (1 - mask)
    return loss_scale * err.square().mean()


def lr_multiplier(n, warmup_iters, decay_iters, f_start, f_max, f_min):
    """Official LambdaLinear: warm-up f_start -> f_max, linear decay to f_min at decay_iters, then held."""
    if n < warmup_iters:
        return f_start + (f_max - f_start) * n / warmup_iters
    if n <= decay_iters:
        return f_min + (f_max - f_min) * (decay_iters - n) / (decay_iters - warmup_iters)
    return f_min  # the reference raises here (its schedule ends at 40k); we hold the final value


@functools.lru_cache
def ema_gamma(rate):
    """Exponent of the power EMA with relative std `rate`: largest real root of the Karras et al. cubic."""
    s = rate ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(iteration, rate):
    """Decay after optimizer step `iteration` (0-based): (1 - 1/(it + 1))^(gamma + 1), 0 at it = 0."""
    if iteration < 1:
        return 0.0
    return (1.0 - 1.0 / (iteration + 1)) ** (ema_gamma(rate) + 1)


def _local(t):
    """The local shard of a DTensor (FSDP2 parameters, gradients, EMA), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """fp32 shadow copies of the trainable parameters' local shards, on their device or (offload) in CPU memory.

    Offloaded, update() copies the parameters into a pinned CPU buffer (asynchronously) and a background
    thread does the same foreach lerp there while the GPU goes on; reads wait for it. Same math.
    """

    def __init__(self, named_params, offload=False):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.offload, self._pending = offload, None
        if not offload:
            self.shadow = [p.detach().clone().float() for p in self.params]  # DTensors with the params' sharding
            return
        local = [_local(p.detach()) for p in self.params]
        cpu = lambda t: torch.empty(t.shape, dtype=torch.float32, pin_memory=t.is_cuda)  # noqa: E731
        self.shadow = [torch.empty(t.shape, dtype=torch.float32) for t in local]  # plain CPU tensors
        self._staging = [cpu(t) for t in local]  # this step's parameters, read by the thread
        for s, t in zip(self.shadow, local):
            s.copy_(t)
        self._thread = ThreadPoolExecutor(1)

    @torch.no_grad()
    def update(self, beta):
        """shadow = beta * shadow + (1 - beta) * param, on the local shards."""
        if not self.offload:
            # lerp: shadow + (1 - beta) (param - shadow), one pass over memory instead of two
            torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p.detach()).float() for p in self.params],
                                 1.0 - beta)
            return
        self.wait()
        params = [_local(p.detach()) for p in self.params]
        for buf, t in zip(self._staging, params):
            buf.copy_(t, non_blocking=True)  # queued after the optimizer step, before the next one
        done = torch.cuda.Event() if any(t.is_cuda for t in params) else None
        if done is not None:
            done.record()

        def job():
            if done is not None:
                done.synchronize()
            torch._foreach_lerp_(self.shadow, self._staging, 1.0 - beta)

        self._pending = self._thread.submit(job)

    def wait(self):
        """Finish an offloaded update still in flight (re-raises its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _full(self, p, s):
        """The full fp32 tensor of one shadow (a collective for sharded parameters)."""
        if not self.offload:
            return s.full_tensor() if isinstance(s, DTensor) else s
        if isinstance(p, DTensor):
            dev = p.device_mesh.device_type
            return DTensor.from_local(s.to(dev), p.device_mesh, p.placements, run_check=False).full_tensor()
        return s

    def full_state_dict(self, keep=True):
        """{name: full fp32 tensor on CPU}; a collective: every rank calls it, ranks with keep=False get {}."""
        self.wait()
        out = {}
        for n, p, s in zip(self.names, self.params, self.shadow):
            full = self._full(p, s)
            if keep:  # only the writing rank pays the host memory of a full copy
                out[n] = full.cpu()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, sd):
        """Take this rank's shards of full tensors (every rank holds the full dict)."""
        self.wait()
        for n, p, s in zip(self.names, self.params, self.shadow):
            full = sd[n].to(torch.float32)
            if isinstance(p, DTensor):  # slice locally (src_data_rank=None: no communication)
                full = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                         src_data_rank=None)
            _local(s).copy_(_local(full))

    @contextlib.contextmanager
    def swapped_in(self, net):
        """Temporarily put the EMA weights into the model `net` (periodic samples)."""
        self.wait()
        reshard(net)  # FSDP keeps some modules gathered after a no-grad forward: they would miss the swap
        with torch.no_grad():
            backup = [_local(p.detach()).clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                _local(p.detach()).copy_(_local(s))
        try:
            yield
        finally:
            reshard(net)  # and the next forward must gather the restored weights, not the EMA ones
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p.detach()).copy_(b)


def reshard(net):
    """Drop FSDP2's gathered copies of the weights, so the next forward gathers the shards afresh."""
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---------------------------------------------------------------------------------------------------
# 4. Model, parallelism, optimizer
# ---------------------------------------------------------------------------------------------------


def setup_distributed():
    """Join torchrun's group (NCCL on GPUs, gloo on CPU) or make a 1-process one; (rank, world, device, created)."""
    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device, False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # A run's shapes never change: let cuDNN time its algorithms once per shape (the VAE's conv3d).
        torch.backends.cudnn.benchmark = True
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:  # torchrun (or a test harness) set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        # A long timeout: the other ranks wait at a barrier while rank 0 writes a ~31 GB checkpoint.
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=datetime.timedelta(hours=1))
    else:  # plain `python train.py`: a group of one, no network needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device, True


def setup_parallelism(device, world, cp):
    """Meshes for world = dp x cp: (FSDP mesh over all ranks, this rank's cp group or None, dp rank, dp size).

    cp is the inner axis, so a context-parallel group is cp consecutive ranks (one node's GPUs when cp
    divides them). The ranks of a group share one sample stream (the sampler runs over dp); FSDP2 shards
    the parameters over every rank, as the official runs shard over the same ranks that form the cp group.
    """
    if world % cp:
        raise ValueError(f"cp={cp} does not divide the {world} ranks: the world must be data-parallel x cp")
    fsdp_mesh = init_device_mesh(device.type, (world,))
    if cp == 1:
        return fsdp_mesh, None, dist.get_rank(), world
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return fsdp_mesh, mesh["cp"].get_group(), mesh.get_local_rank("dp"), world // cp


def setup_trainable(net, config):
    """Choose what trains (everything, or only LoRA adapters); returns the trainable parameter names."""
    if config["lora_rank"] == 0:
        net.requires_grad_(True)
    else:
        try:
            import lora
        except ModuleNotFoundError as e:
            raise SystemExit(f"LoRA needs lora.py (lora_rank={config['lora_rank']}), which is not present") from e
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])  # identical adapters on every rank
            # wraps the target linears (fp32 adapters: the official master-weight scheme), freezes the rest
            lora.inject_lora(net, rank=config["lora_rank"], alpha=config["lora_alpha"],
                             targets=tuple(t.strip() for t in config["lora_targets"].split(",") if t.strip()))
    return [name for name, p in net.named_parameters() if p.requires_grad]


_ATTENTION_OPS = {torch.ops.aten._scaled_dot_product_flash_attention.default,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                  torch.ops.aten._scaled_dot_product_efficient_attention.default,
                  torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _save_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep self-attention outputs (the expensive op), recompute the rest.

    Cross-attention (queries against the 512 caption tokens) is recomputed: it costs ~0.4 % of the
    self-attention FLOPs at 720p, but its output is as large as self-attention's (4 KB per token and
    block), so keeping it would double the memory of this mode. Self-attention is told apart by its
    q and k having the same size (both layouts: [B, H, S, D] for SDPA, [B, S, H, D] for ours).
    """
    is_attention = op in _ATTENTION_OPS or ("attention" in str(op) and "backward" not in str(op))
    if is_attention and args[0].numel() == args[1].numel():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention_context():
    """context_fn of save_attention (a plain function: torch.compile traces it, unlike a partial or a noop)."""
    return create_selective_checkpoint_contexts(_save_attention)


def _save_attention_and_linears(ctx, op, *args, **kwargs):
    """save_attention's policy, and also keep the outputs of the token-wise linears that do not widen.

    A linear is an mm of x [rows, in] by the weight [in, out]; token-wise ones have more rows (tokens) than
    input features, unlike the AdaLN layers (one row per frame). Keeping q, k, v, the output projections
    and the MLP's second layer (out <= in) skips their GEMMs in backward at 4 KB per token each; the MLP's
    first layer (4x wider output) stays recomputed.
    """
    if op == torch.ops.aten.mm.default and args[1].shape[1] <= args[1].shape[0] < args[0].shape[0]:
        return CheckpointPolicy.MUST_SAVE
    return _save_attention(ctx, op, *args, **kwargs)


def _save_linears_context():
    """context_fn of the blocks that keep their linear outputs too (saved_linear_blocks)."""
    return create_selective_checkpoint_contexts(_save_attention_and_linears)


def _checkpointed_forward(forward, context_fn, *args):
    """A block's forward under non-reentrant activation checkpointing (plain forward without grad)."""
    if not torch.is_grad_enabled():
        return forward(*args)
    if context_fn is None:  # full: no context_fn at all (torch.compile rejects an explicit noop_context_fn)
        return checkpoint(forward, *args, use_reentrant=False)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn)


def apply_activation_checkpointing(net, mode, saved_attention_blocks=-1, uncheckpointed_blocks=0,
                                   saved_linear_blocks=0):
    """Checkpoint every block: 'full' recomputes it all in backward, 'save_attention' all but attention.

    saved_attention_blocks=N (save_attention): only blocks 0..N-1 keep their attention outputs, the rest
    are checkpointed as 'full'; -1 = every block. saved_linear_blocks=K: blocks 0..K-1 also keep their
    non-widening linear outputs. uncheckpointed_blocks=U: the last U blocks are left alone (no
    recompute). Which blocks does not change the peak (every saved activation is alive when backward
    starts), so the first N and K and the last U.
    """
    if mode == "none":
        return
    for i, block in enumerate(net.blocks[:len(net.blocks) - uncheckpointed_blocks]):
        keep = mode == "save_attention" and (saved_attention_blocks < 0 or i < saved_attention_blocks)
        context_fn = (_save_linears_context if keep and i < saved_linear_blocks else
                      _save_attention_context if keep else None)
        # An instance attribute: the block keeps its class, its parameter names and FSDP's hooks around it.
        block.forward = functools.partial(_checkpointed_forward, block.forward, context_fn)


def compile_blocks(net):
    """torch.compile each block's forward, checkpoint included (after apply_activation_checkpointing).

    The compiled region is the block's forward only: FSDP2's hooks, which gather and free the weights
    around it, stay eager. Selective checkpointing is honoured inside (the compiled graph keeps the
    attention outputs, tested). All blocks share one compiled graph per checkpointing kind, since the
    weights are graph inputs. dynamic=False: the shapes are fixed for a run, and a new resolution
    recompiles rather than switching every block to symbolic shapes.
    """
    for block in net.blocks:
        block.forward = torch.compile(block.forward, dynamic=False)


def shard_model(net, mesh, precision, offload=False):
    """FSDP2: each block its own unit, the rest in the root; bf16 compute over fp32 master shards if asked.

    offload: the fp32 shards, their gradients and the optimizer live in CPU memory (FSDP2 copies each
    unit's weights in for its forward/backward); the optimizer step then runs on the CPU.
    """
    # cast_forward_inputs=False: the model casts what it needs; RoPE angles and masks must stay fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload
              else OffloadPolicy())
    for i, block in enumerate(net.blocks):
        # the last block's parameters are needed again right away by the backward pass: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(net.blocks) - 1, **kw)
    fully_shard(net.final_layer, **kw)
    fully_shard(net, **kw)


def build_model(config, device, mesh, resuming):
    """The DiT, initialised (official file / seeded scratch / empty when a checkpoint follows) and sharded."""
    if resuming:  # weights come from our checkpoint: build on meta, allocate only the local shards
        net = build_dit(config["model"], device="meta", dtype=torch.float32)
    elif config["init"]:
        if not os.path.isfile(config["init"]):
            raise FileNotFoundError(f"init={config['init']}: no such file (download the official "
                                    f"Cosmos-Predict2-2B-Multiview checkpoint, or set init='' to start from scratch)")
        net = build_dit(config["model"], checkpoint=config["init"], dtype=torch.float32)  # strict load
    else:  # the full model on the training device (fast init), identical for any number of ranks
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config["seed"])
            net = build_dit(config["model"], device=device, dtype=torch.float32)
    # Cross-attention of an all-zero caption slot is exactly zero, forward and backward: the model skips
    # such views (4 of 5 in Waymo training: the caption sits in the front camera's slot), and when text
    # dropout empties every slot it still runs the caption's view, for gradients (MultiViewDiT.forward).
    net.idle_text_view = config["camera_keys"].index(config["front_camera_key"])
    trainable = setup_trainable(net, config)
    apply_activation_checkpointing(net, config["activation_checkpointing"], config["saved_attention_blocks"],
                                   config["uncheckpointed_blocks"], config["saved_linear_blocks"])
    if config["compile"]:
        compile_blocks(net)
    shard_model(net, mesh, config["precision"], offload=config["offload"] == "all")
    if resuming:
        # fully_shard already moved real shards to the mesh's device (or, offloaded, to the CPU)
        net.to_empty(device="cpu" if config["offload"] == "all" else device)
    return net.train(), trainable


def build_optimizer(config, trainable_params):
    """AdamW (fused: one kernel per step instead of a dozen foreach passes) and the LambdaLinear schedule."""
    optimizer = torch.optim.AdamW(trainable_params, lr=config["lr"], betas=tuple(config["adam_betas"]),
                                  eps=config["adam_eps"], weight_decay=config["weight_decay"], fused=True)
    schedule = functools.partial(lr_multiplier, warmup_iters=config["warmup_iters"], decay_iters=config["decay_iters"],
                                 f_start=config["lr_f_start"], f_max=config["lr_f_max"], f_min=config["lr_f_min"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def apply_optimizer_settings(config, optimizer, scheduler):
    """After a resume: the config's lr, betas, eps and weight decay win over the checkpoint's.

    (The schedule's shape already does: its settings are not stored.) With unchanged settings this
    reproduces the stored values exactly, so an interrupted run still resumes bit for bit.
    """
    scheduler.base_lrs = [config["lr"]] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=config["lr"], lr=config["lr"] * lr_lambda(scheduler.last_epoch),
                     betas=tuple(config["adam_betas"]), eps=config["adam_eps"], weight_decay=config["weight_decay"])
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports


def build_vae(config, device, dtype):
    """The frozen VAE: the official Wan2.1 file, or (demo) a random one rebuilt identically from vae_seed."""
    if config["vae"] == "tiny":
        vae = model.build_vae("tiny", seed=config["vae_seed"], dtype=dtype, device=device)
    else:
        vae = model.build_vae(config["vae"], path=config["vae_path"], dtype=dtype, device=device)
    if config["compile"]:
        compile_vae(vae)
    return vae


def compile_vae(vae):
    """torch.compile the VAE encoder, which training runs on every batch (sample.py keeps its VAE eager).

    Eager, every RMS norm -> SiLU -> causal time pad before a convolution is a handful of full-size memory
    passes; compiled, one kernel. Channels-last activations and weights spare cuDNN its NCHW <-> NHWC
    conversions around every convolution. Together they take the VAE phase of a 480p-5v iteration on an
    H100 from 1.55 s to 0.9 s (BENCH.md). On Hopper the 96-channel 3x3x3 layers then run on conv.py's kernel
    (0.02-0.04 s less). One graph per chunk length (frame 0, temporal_window frames, rest).
    """
    encoder = vae.encoder
    for p in encoder.parameters():  # frozen: swapping .data in place is safe
        if p.dim() in (4, 5):
            p.data = p.data.contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.channels_last_3d)
    for m in encoder.modules():  # the kernel's contract: causal pad 2 in time, 1 in H and W, stride 1
        if (isinstance(m, model.CausalConv3d) and m.time_pad == 2 and m.padding == (0, 1, 1)
                and m.stride == (1, 1, 1) and conv.triton_conv3d_suits(m.weight)):
            m.use_triton = True
    eager_forward = encoder.forward

    def channels_last_forward(x_BCTHW, cache=None):
        return eager_forward(x_BCTHW.contiguous(memory_format=torch.channels_last_3d), cache)

    encoder.forward = torch.compile(channels_last_forward, dynamic=False)


@torch.no_grad()
def encode_batch(vae, batch, device, views_per_call, group=None):
    """uint8 video [B, V, T, 3, H, W] -> latent [B, 16, V*t, H/8, W/8] (fp32), views encoded separately.

    With a context-parallel group the views are spread: rank r encodes views r, r + cp, ... and the group
    all-gathers the latents, so every rank returns the full latent. (A rank cannot encode just its own
    latent frames: the encoder is causal in time, frame k depends on all frames before it.)
    """
    video = batch["video"]
    B, V = video.shape[:2]
    if group is None:
        latents = []
        for b in range(B):
            for views in video[b].split(views_per_call):
                x = views.to(device, non_blocking=True).permute(0, 2, 1, 3, 4)  # [v, 3, T, H, W]
                latents.append(vae.encode(x))  # [v, 16, t, h, w]
        z = torch.cat(latents)  # [(B V), 16, t, h, w]
        return z.unflatten(0, (B, V)).transpose(1, 2).flatten(2, 3)  # views stacked along time, view-major
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    slots = -(-V // cp)  # views per rank, rounded up; ranks with fewer (or none, when cp > V) send zeros
    _, T, _, H, W = video.shape[1:]
    t, h, w = 1 + (T - 1) // vae.time_factor, H // vae.space_factor, W // vae.space_factor
    mine = torch.zeros(slots, B, vae.z_dim, t, h, w, device=device)
    for b in range(B):
        for i, views in enumerate(video[b, rank::cp].split(views_per_call) if rank < V else ()):
            x = views.to(device, non_blocking=True).permute(0, 2, 1, 3, 4)  # [v, 3, T, H, W]
            mine[i * views_per_call:i * views_per_call + len(views), b] = vae.encode(x)
    z = attention.all_gather_spread_views(mine, V, group)  # [V, B, 16, t, h, w]
    return z.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [B, 16, V*t, h, w]


def batch_inputs(batch, device, latent_frames):
    """Context [B, V*512, D], latent view ids [B, V*t] and fps [B] on the device."""
    context = batch["t5_text_embeddings"].to(device, torch.float32, non_blocking=True)
    view_ids = batch["view_ids"].to(device).repeat_interleave(latent_frames, dim=1)
    fps = torch.as_tensor(batch["fps"], dtype=torch.float32, device=device)
    return context, view_ids, fps


@torch.no_grad()
def clip_gradients(params, max_norm, device):
    """Zero non-finite gradient entries, scale to global L2 norm <= max_norm; returns the norm before."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    sq = torch.zeros((), device=device)
    if grads:
        sq = torch.stack(torch._foreach_norm(grads)).float().square().sum().to(device)  # CPU under offload
    dist.all_reduce(sq)  # shards are disjoint: the sum of squares adds up over ranks
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device) if grads else coef)
    return norm.item()


# ---------------------------------------------------------------------------------------------------
# 5. Checkpoints
# ---------------------------------------------------------------------------------------------------
# <run>/checkpoints/{model,optim,scheduler,trainer}/iter_{:09d}.pt and latest_checkpoint.txt (the official
# layout). model: net.* (fp32 master weights) and net_ema.*, keys exactly as model.py's, so
# model.load_dit_weights and sample.py read it. All four files are written to temporary names, fsynced and
# renamed; only then is latest_checkpoint.txt replaced, so an interrupted save never becomes latest.

KINDS = ("model", "optim", "scheduler", "trainer")


def _save_file(obj, path):
    """torch.save + fsync (the data is on disk before the rename that publishes it)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(ckpt_dir, iteration, payloads, kill_midway=False):
    """Publish {kind: object} as iter_<iteration>.pt atomically, then point latest_checkpoint.txt at it."""
    name = f"iter_{iteration:09d}.pt"
    staged = []
    try:
        for kind in KINDS:
            folder = ckpt_dir / kind
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp{os.getpid()}"
            staged.append((tmp, folder / name))
            _save_file(payloads[kind], tmp)
            if kill_midway and len(staged) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a crash in the middle of a save
        for tmp, final in staged:
            os.replace(tmp, final)
        for kind in KINDS:
            _fsync_dir(ckpt_dir / kind)
        latest = ckpt_dir / "latest_checkpoint.txt"
        tmp = ckpt_dir / f".latest_checkpoint.txt.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, latest)
        _fsync_dir(ckpt_dir)
    except BaseException:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
        raise


def latest_checkpoint(ckpt_dir):
    """Iteration named by latest_checkpoint.txt, or None (all four files must be there)."""
    path = ckpt_dir / "latest_checkpoint.txt"
    if not path.is_file():
        return None
    name = path.read_text().strip()
    m = re.fullmatch(r"iter_(\d{9})\.pt", name)
    if not m:
        raise ValueError(f"{path}: expected 'iter_NNNNNNNNN.pt', found {name!r}")
    missing = [str(ckpt_dir / k / name) for k in KINDS if not (ckpt_dir / k / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} names {name} but these files are missing: {missing}")
    return int(m.group(1))


def clean_stale_files(ckpt_dir):
    """Remove temporary files of saves that were killed midway (never published)."""
    for kind in KINDS:
        for tmp in (ckpt_dir / kind).glob(".iter_*.tmp*"):
            tmp.unlink(missing_ok=True)
    for tmp in ckpt_dir.glob(".latest_checkpoint.txt.tmp*"):
        tmp.unlink(missing_ok=True)


def prune_checkpoints(ckpt_dir, keep):
    """Keep the newest `keep` checkpoints (0: all)."""
    if keep <= 0:
        return
    iters = sorted(int(p.stem[5:]) for p in (ckpt_dir / "trainer").glob("iter_*.pt"))
    for it in iters[:-keep]:
        for kind in KINDS:
            (ckpt_dir / kind / f"iter_{it:09d}.pt").unlink(missing_ok=True)


def rng_state(device):
    """This process's global RNG states (the objective uses its own seeded generators; saved anyway)."""
    np_state = np.random.get_state()
    return dict(python=random.getstate(), numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(ckpt_dir, iteration, net, optimizer, scheduler, ema, config, dataset_len, device, rank,
                    kill_midway=False):
    """Gather full state dicts (collective) and write them from rank 0."""
    t0 = time.perf_counter()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    net_sd = get_model_state_dict(net, options=opts)
    ema_sd = ema.full_state_dict(keep=rank == 0)
    optim_sd = get_optimizer_state_dict(net, optimizer, options=opts)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        model_file = {f"net.{k}": v for k, v in net_sd.items()}
        # EMA of what trains; frozen weights (LoRA) are their own average
        model_file.update({f"net_ema.{k}": ema_sd.get(k, v) for k, v in net_sd.items()})
        trainer = dict(iteration=iteration, config=config, model_config=dit_config(config["model"]),
                       world_size=dist.get_world_size(), dataset_len=dataset_len, rng=rngs, trainable=ema.names)
        payloads = dict(model=model_file, optim=optim_sd, scheduler=scheduler.state_dict(), trainer=trainer)
        write_checkpoint(ckpt_dir, iteration, payloads, kill_midway=kill_midway)
        _write_json(ckpt_dir / "config.json", config)
        prune_checkpoints(ckpt_dir, config["keep_checkpoints"])
        print(f"saved {ckpt_dir}/*/iter_{iteration:09d}.pt in {time.perf_counter() - t0:.1f} s", flush=True)
    dist.barrier()


def load_checkpoint(ckpt_dir, iteration, net, optimizer, scheduler, ema, device, rank):
    """Restore everything saved at `iteration`; returns the trainer dict."""
    name = f"iter_{iteration:09d}.pt"
    load = lambda kind: torch.load(ckpt_dir / kind / name, map_location="cpu", mmap=True, weights_only=True)  # noqa: E731
    model_file, trainer = load("model"), load("trainer")
    net_sd = {k[4:]: v for k, v in model_file.items() if k.startswith("net.")}
    set_model_state_dict(net, net_sd, options=StateDictOptions(full_state_dict=True, strict=True))
    ema.load_full_state_dict({k[8:]: v for k, v in model_file.items() if k.startswith("net_ema.")})
    set_optimizer_state_dict(net, optimizer, load("optim"), options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(load("scheduler"))
    if trainer["world_size"] == dist.get_world_size():
        set_rng_state(trainer["rng"][rank], device)
    elif rank == 0:
        print(f"note: checkpoint was written by {trainer['world_size']} ranks, resuming on "
              f"{dist.get_world_size()}: the data order differs from an uninterrupted run")
    return trainer


def _write_json(path, obj):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# 6. Training
# ---------------------------------------------------------------------------------------------------


# With offload=all, AdamW, the schedule and the EMA update are seconds of CPU work per step at 2B
# parameters. They run on a background thread while the GPU encodes the next batch with the VAE (which
# reads no DiT weight); the next forward, a checkpoint or a sample waits for them (finish_step). Same math
# and order as a synchronous step; the collectives (gradient norm, loss) stay on the main thread.
_step_thread = ThreadPoolExecutor(1, thread_name_prefix="optimizer-step")


def finish_step(optimizer):
    """Wait for a background optimizer step still in flight (re-raises its error); no-op otherwise."""
    pending = getattr(optimizer, "pending_step", None)
    if pending is not None:
        optimizer.pending_step = None
        pending.result()


def train_step(net, vae, batch, optimizer, scheduler, ema, iteration, config, trainable_params, device, dp_rank,
               mark=None):
    """One optimizer step; returns (mean loss over all ranks, gradient norm before clipping).

    mark(phase), if given, is called after 'vae', 'forward_backward' and 'optimizer' (bench.py times and
    adds them up: 'optimizer' is also called for the wait on the previous background step).
    Under context parallelism (the net's cp_group) every rank of the group passes the same batch.
    With offload=all the step itself may still run when this returns (see finish_step);
    optimizer.step_lr is the learning rate it uses.
    """
    mark = mark or (lambda phase: None)
    n_views = batch["video"].shape[1]
    cp_group = getattr(net, "cp_group", None)
    x0 = encode_batch(vae, batch, device, config["vae_views_per_call"], cp_group)  # [B, 16, V*t, h, w]
    mark("vae")
    finish_step(optimizer)  # the previous step (offload=all), hidden behind the encode above
    mark("optimizer")
    optimizer.step_lr = optimizer.param_groups[0]["lr"]  # lr * schedule(iteration)
    B = x0.shape[0]
    context, view_ids, fps = batch_inputs(batch, device, x0.shape[2] // n_views)
    sample_ids = range(dp_rank * B, (dp_rank + 1) * B)  # global sample index: same draws for any world size
    # Full-size draws on every rank of a cp group (identical: keyed by sample); the loss takes its shard.
    noise = draw_training_noise(config, x0.shape[1:], n_views, iteration, sample_ids, device)
    loss = diffusion_loss(net, x0, context, view_ids, fps, noise, n_views, config["loss_scale"])
    # FSDP2 averages gradients over all dp x cp ranks. The cp shards are equal in size, so that average
    # of per-shard means is the gradient of the batch mean (ring attention carries the cross-shard terms).
    loss.backward()
    mark("forward_backward")
    grad_norm = clip_gradients(trainable_params, config["grad_clip"], device)
    beta = ema_beta(iteration, config["ema_rate"])

    def step():
        optimizer.step()
        scheduler.step()
        ema.update(beta)
        optimizer.zero_grad(set_to_none=True)

    if config["offload"] == "all":
        optimizer.pending_step = _step_thread.submit(step)
    else:
        step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)  # sum (gloo has no average); the mean of equal-sized shard means = the batch mean
    loss = loss.item() / dist.get_world_size()
    mark("optimizer")  # clip, AdamW, schedule, EMA (offloaded EMA or offload=all: they finish in the background)
    return loss, grad_norm


def _sample_module():
    """sample.py if it provides the training hooks, else None (samples are then skipped)."""
    try:
        import sample
    except ImportError:
        return None
    needed = ("sample_batch_for_training", "save_multiview_video")
    return sample if all(hasattr(sample, f) for f in needed) else None


def write_samples(net, vae, ema, batch, iteration, config, out_dir, device, rank):
    """Sample the batch's first clip with the regular and the EMA weights for each guidance (all ranks run)."""
    sample = _sample_module()
    if sample is None:
        if rank == 0:
            print("note: sample.py (sample_batch_for_training) not available; skipping samples")
        return
    n_views = batch["video"].shape[1]
    batch = {k: v[:1].to(device) if torch.is_tensor(v) else v[:1] for k, v in batch.items()}  # the first clip
    for tag, weights in (("reg", contextlib.nullcontext()), ("ema", ema.swapped_in(net))):
        with weights, torch.no_grad():
            for guidance in config["sample_guidance"]:
                video = sample.sample_batch_for_training(
                    net, vae, batch, guidance=guidance, seed=config["seed"], steps=config["sample_steps"],
                    num_conditional_frames=config["sample_conditional_frames"])
                if rank == 0:
                    path = out_dir / f"iter_{iteration:09d}_{tag}_guidance{guidance:g}.mp4"
                    try:  # a sample that cannot be written must not end a long run
                        out_dir.mkdir(parents=True, exist_ok=True)
                        sample.save_multiview_video(str(path), video[0], n_views, float(batch["fps"][0]))
                        print(f"sample: {path}")
                    except Exception as e:
                        print(f"warning: could not write {path}: {type(e).__name__}: {e}", file=sys.stderr)


def _log_iteration(line):
    """The iteration of one log.jsonl line, or None for a line cut short by a kill mid-write."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


def trim_log(path, iteration):
    """Keep only complete log lines of iterations <= the resumed one (a killed run may have logged further)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if (it := _log_iteration(ln)) is not None and it <= iteration]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def peak_memory_gb(device):
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def train(config):
    """Train to config['max_iter'], resuming from the run's latest checkpoint if there is one."""
    rank, world, device, created_group = setup_distributed()
    try:
        return _train(config, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config, rank, world, device):
    out = run_dir(config)
    ckpt_dir = out / "checkpoints"
    attention.set_backend(config["attention_backend"])
    fsdp_mesh, cp_group, dp_rank, dp = setup_parallelism(device, world, config["cp"])
    if rank == 0:
        print(f"config ({world} rank(s) = {dp} data-parallel x cp {config['cp']}, {device.type}):")
        for key, value in config.items():
            print(f"  {key} = {value!r}")
        prepare_demo_data(config)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_files(ckpt_dir)
        _write_json(out / "config.json", config)
    dist.barrier()

    # Data: rank 0 indexes (ffmpeg probes every file) and shares the result, so every rank agrees.
    clips = [None]
    if rank == 0:
        clips[0] = index_dataset(config["dataset_dir"], config["camera_keys"], config["front_camera_key"],
                                 config["num_frames"])
    dist.broadcast_object_list(clips)
    clips = clips[0]
    dataset = MultiviewDataset(clips, config["camera_keys"], config["camera_to_view_id"], config["front_camera_key"],
                               config["num_frames"], config["height"], config["width"])
    if len(dataset) == 0:
        raise ValueError(f"{config['dataset_dir']}: no training samples (the last int(0.1 N) + 1 of N clips are "
                         f"held out, so at least 2 usable clips with >= {config['num_frames']} frames are needed)")
    model_cfg = dit_config(config["model"])
    wrong_width = [c for c in clips if c["text_dim"] != model_cfg["crossattn_emb_channels"]]
    if wrong_width:
        names = ", ".join(f"{c['embedding']} ({c['text_dim']}-d)" for c in wrong_width[:5])
        raise ValueError(f"{config['dataset_dir']}: T5 embeddings of {len(wrong_width)} clip(s) do not have the "
                         f"{model_cfg['crossattn_emb_channels']}-d width model {config['model']!r} expects: {names}"
                         f"{' ...' if len(wrong_width) > 5 else ''} (embed every clip with the matching T5)")

    # Model, EMA, optimizer, schedule; then the latest checkpoint if any.
    start = latest_checkpoint(ckpt_dir)
    net, trainable = build_model(config, device, fsdp_mesh, resuming=start is not None)
    net.enable_context_parallel(cp_group)  # ring self-attention over the group's shards (None: off)
    params = dict(net.named_parameters())
    trainable_params = [params[n] for n in trainable]
    ema = EMA([(n, params[n]) for n in trainable], offload=config["offload"] != "none")
    optimizer, scheduler = build_optimizer(config, trainable_params)
    log_path = out / "log.jsonl"
    if start is not None:
        trainer = load_checkpoint(ckpt_dir, start, net, optimizer, scheduler, ema, device, rank)
        apply_optimizer_settings(config, optimizer, scheduler)
        changed = {k: (trainer["config"].get(k), v) for k, v in config.items() if trainer["config"].get(k) != v}
        if rank == 0:
            print(f"resuming from {ckpt_dir}/*/iter_{start:09d}.pt" +
                  (f"; changed settings (old, new), in effect from here: {changed}" if changed else ""))
        if trainer["dataset_len"] != len(dataset) and rank == 0:
            print(f"note: the data set has {len(dataset)} samples, the checkpoint saw {trainer['dataset_len']}: "
                  f"the data order differs from an uninterrupted run")
    start = start or 0
    if rank == 0:  # a killed run may have logged past its last checkpoint (or logged without one)
        trim_log(log_path, start)
    if start >= config["max_iter"] and rank == 0:
        print(f"already at iteration {start} >= max_iter={config['max_iter']}: nothing to train (raise max_iter "
              f"to continue)")
    n_train = sum(p.numel() for p in trainable_params)
    if rank == 0:
        print(f"model {config['model']}: {sum(p.numel() for p in params.values()):,} parameters, {n_train:,} trainable; "
              f"{len(dataset)} samples from {len(clips)} clips; global batch {config['batch_size'] * dp}")

    vae = build_vae(config, device, torch.bfloat16 if config["precision"] == "bf16" else torch.float32)
    # Over data-parallel ranks only: the cp ranks of a group load the same samples.
    sampler = ResumableSampler(len(dataset), dp_rank, dp, config["batch_size"], config["seed"], start_iter=start)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config["batch_size"], sampler=sampler, drop_last=True, num_workers=config["num_workers"],
        pin_memory=device.type == "cuda", persistent_workers=config["num_workers"] > 0,
        worker_init_fn=worker_init if config["num_workers"] > 0 else None)
    kill = config["debug_kill"].partition(":")
    losses, window = [], []
    batch = None
    it = start
    batches = iter(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while it < config["max_iter"]:
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        loss, grad_norm = train_step(net, vae, batch, optimizer, scheduler, ema, it, config, trainable_params,
                                     device, dp_rank)
        lr = optimizer.step_lr  # lr * schedule(it), the rate of this step
        it += 1
        dt = time.perf_counter() - t0
        losses.append(loss)
        window.append((loss, grad_norm, dt, t_data))
        if rank == 0:
            record = dict(iter=it, loss=loss, lr=lr, grad_norm=grad_norm, sec_per_iter=dt, data_sec=t_data,
                          peak_mem_gb=peak_memory_gb(device))
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if it % config["log_every"] == 0 or it == config["max_iter"]:
                mean = lambda i: sum(w[i] for w in window) / len(window)  # noqa: E731
                print(f"iter {it:>7d}/{config['max_iter']} | loss {mean(0):.4f} | lr {lr:.3e} | grad norm "
                      f"{mean(1):.3f} | {mean(2):.3f} s/it (data {mean(3):.3f}) | peak mem {record['peak_mem_gb']:.2f} GB",
                      flush=True)
        if it % config["log_every"] == 0:
            window = []
        if config["save_every"] and (it % config["save_every"] == 0 or it == config["max_iter"]):
            finish_step(optimizer)
            save_checkpoint(ckpt_dir, it, net, optimizer, scheduler, ema, config, len(dataset), device, rank,
                            kill_midway=kill[0] == "save" and int(kill[2]) == it)
        if config["sample_every"] and (it % config["sample_every"] == 0 or it == config["max_iter"]):
            finish_step(optimizer)
            write_samples(net, vae, ema, batch, it, config, out / "samples", device, rank)
        if kill[0] == "step" and int(kill[2]) == it:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a crash between checkpoints
    finish_step(optimizer)
    ema.wait()
    del batches
    if rank == 0 and len(losses) >= 2:
        k = max(1, len(losses) // 10)
        print(f"done at iteration {it}: mean loss of the first {k} steps {sum(losses[:k]) / k:.4f}, "
              f"of the last {k} {sum(losses[-k:]) / k:.4f}")
    return dict(iteration=it, losses=losses, run_dir=str(out))


# ---------------------------------------------------------------------------------------------------
# 7. Demo data and command line
# ---------------------------------------------------------------------------------------------------


def prepare_demo_data(config):
    """Create what the demo needs and is missing: synthetic clips, a tiny T5, the caption embeddings."""
    root = Path(config["dataset_dir"])
    if config["synthetic_clips"] > 0 and not (root / "videos").is_dir():
        import prepare

        print(f"writing {config['synthetic_clips']} synthetic clips to {root}")
        prepare.write_synthetic_dataset(str(root), config["synthetic_clips"], num_frames=config["synthetic_frames"],
                                        height=config["height"], width=config["width"], seed=config["seed"],
                                        workers=min(2, os.cpu_count() or 1))
    if not config["t5_dir"]:
        return
    metas = sorted(root.glob(f"metas/{config['front_camera_key']}/*.txt"))
    if all((root / "t5_xxl" / m.parent.name / f"{m.stem}.pickle").exists() for m in metas):
        return
    import embed

    t5 = Path(config["t5_dir"])
    if config["tiny_t5_dim"] > 0 and not (t5 / "config.json").exists():
        print(f"building a tiny random T5 (d_model {config['tiny_t5_dim']}) at {t5}")
        embed.make_tiny_t5(t5, d_model=config["tiny_t5_dim"], seed=config["seed"])
    tokenizer, encoder = embed.load_t5(t5)
    stats = embed.embed_dataset(root, tokenizer, encoder)
    print(f"embedded captions of {root}: wrote {stats['written']}, kept {stats['skipped']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="presets: " + ", ".join(PRESETS) + "; keys: see DEFAULTS in train.py")
    p.add_argument("--config", default="waymo5views", help="preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config value (type-checked)")
    args = p.parse_args(argv)
    try:
        config = resolve_config(args.config, args.overrides)
    except ValueError as e:
        p.error(str(e))
    train(config)


if __name__ == "__main__":
    main()
