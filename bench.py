"""Benchmark post-training: real training iterations of the 2B multiview DiT, attention kernels, VAE, sampling.

    python bench.py                                   # everything on one GPU (~25 min on an H100)
    torchrun --nproc_per_node=8 bench.py --setups 720p-7v   # data parallel over the GPUs torchrun gives
    torchrun --nproc_per_node=2 bench.py --runs 480p-5v:triton:1:1 --cp 2   # context parallel: 2 GPUs, one sample
    python bench.py --runs 480p-5v:triton:1:3 480p-5v:sdpa:1:3   # SETUP:BACKEND[:WARMUP:ITERS][:compile]
    python bench.py --runs 720p-5v:sdpa:1:1:compile --plan 720p-5v=save_attention:ema:14   # AC:OFFLOAD[:BLOCKS[:LINEAR]]
    python bench.py --runs 480p-5v:auto:1:2:compile --profile           # + GPU time by kernel family
    python bench.py --tiny                            # CPU smoke test: tiny model, same code paths (tests)

Training iterations go through train.py itself (setup_parallelism, build_model, EMA, build_optimizer,
train_step) with random weights, a random Wan2.1 VAE and random uint8 videos in memory: online VAE
encoding, the rectified-flow loss, backward, clipping, AdamW and EMA all run as in training. Per setup
it reports the median over timed iterations after warm-up, the split into data / VAE / forward-backward /
optimizer, FLOP rates and MFU against a bf16 GEMM peak measured in the same run, peak memory, and the
seed's 8-GPU number beside ours in GPU-seconds per training sample.

With --cp N the world is data-parallel x N exactly as train.py cp=N builds it (setup_parallelism): each
group of N consecutive ranks splits one sample (ring attention over its latent frames, the views' VAE
encodes spread over the group), so an iteration trains dp x batch_size samples; GPU-seconds per sample
and MFU count all world GPUs.

Sections, in reading order:
  1. setups       the seed's table, our shapes, the memory plan for one 80 GB GPU
  2. FLOP model   model and hardware FLOPs of one iteration (shared/reference/perf.md conventions)
  3. measuring    timers, GEMM peak, attention kernels, training iterations, VAE, sampling
  4. ring model   predicted 8-GPU context-parallel times from our measured kernel rates
  5. report       markdown tables + JSON (written atomically after every section)
"""

import os

# Before torch touches CUDA: fewer fragmentation OOMs when 720p fills the card.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attention  # noqa: E402
import train  # noqa: E402
from model import VAE_PRESETS, WanVAE, build_dit, dit_config  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# 1. Setups
# ---------------------------------------------------------------------------------------------------
# The seed's table: s/iter on 8 H100 with context parallelism 8, batch 1, full fine-tune, online VAE
# (perf.md section 0). One sample per iteration on 8 GPUs = 8 x s/iter GPU-seconds per sample.

SEED_S_PER_ITER = {"720p-7v": 8.9, "720p-5v": 6.5, "480p-5v": 3.5}
SEED_GPUS = 8

SETUPS = {  # train.py preset + the views and pixels of one sample (29 frames each)
    "480p-5v": dict(preset="waymo5views_480p", n_views=5, height=480, width=848),
    "720p-5v": dict(preset="waymo5views", n_views=5, height=704, width=1280),
    "720p-7v": dict(preset="waymo5views", n_views=7, height=704, width=1280),
    "lora-720p-5v": dict(preset="waymo5views_lora", n_views=5, height=704, width=1280),
    # --tiny: the demo DiT and the tiny VAE on the CPU, same code paths
    "tiny": dict(preset="demo", n_views=2, height=64, width=96, num_frames=5),
}

# Memory plan for one 80 GB H100, batch 1, tried in order (the next one after an out-of-memory error).
# Static state of the 2B model: fp32 weights 7.3 GiB + fp32 grads 7.3 + AdamW 14.6 + fp32 EMA 7.3 = 36.4 GiB.
# Activations: the checkpointed block inputs (4 KB per token and block), the self-attention outputs that
# save_attention keeps (4.2 KB per token and block; cross-attention is recomputed), and the one block
# recomputed in backward. Measured peaks (BENCH.md, compiled, triton-cudnn): 480p-5v save_attention 49.7 GiB
# (with the last 10 blocks uncheckpointed: out of memory); 720p-5v save_attention + EMA on the CPU 66.7 GiB;
# 720p-7v save_attention with weights, gradients, AdamW and EMA on the CPU 62.9 GiB (the AdamW step then
# runs on the CPU behind the next VAE encode). A third field N keeps the attention outputs of the first N
# blocks only (train.py saved_attention_blocks), for cards with less memory.
MEMORY_PLANS = {  # setup: [(activation_checkpointing, offload[, saved_attention_blocks[, saved_linear_blocks]])]
    # 480p-5v: 14 blocks also keep their linear outputs (67.8 GiB on an 80 GB H100; 18 blocks: 73 GiB, no faster)
    "480p-5v": [("save_attention", "none", -1, 14), ("save_attention", "none"), ("full", "none"), ("full", "ema")],
    "720p-5v": [("save_attention", "ema"), ("save_attention", "ema", 14), ("full", "ema"), ("full", "all")],
    "720p-7v": [("save_attention", "all"), ("save_attention", "all", 14), ("full", "all")],
    "lora-720p-5v": [("save_attention", "none"), ("full", "none")],
    "tiny": [("save_attention", "none")],
}

# Attention backends for whole iterations: attention.py's choice (auto: on Hopper our Gluon kernels for
# self-attention, cuDNN for cross-attention), our kernels everywhere (triton), our forward with cuDNN's
# backward (triton-cudnn), or PyTorch SDPA with its default kernel choice, or SDPA with cuDNN first.
BACKENDS = ("auto", "triton", "triton-cudnn", "sdpa", "sdpa-cudnn", "reference")


def attention_context(backend):
    """Set attention.py's backend; returns the context manager that fixes SDPA's kernel order (if any)."""
    attention.set_backend("sdpa" if backend.startswith("sdpa") else backend)
    if backend != "sdpa-cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: the list only enables, in the default order
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def training_config(setup, ac, offload, backend, overrides=(), saved_blocks=-1, compile=False, cp=1,
                    linear_blocks=0):
    """train.py's config for one setup and memory plan (random weights: init='', random VAE)."""
    s = SETUPS[setup]
    config = train.resolve_config(s["preset"], ["init=''", "save_every=0", "sample_every=0", *overrides])
    cams = [f"camera_{i}" for i in range(s["n_views"])]  # view ids 0..V-1 of the 7-view embedding
    config.update(height=s["height"], width=s["width"], num_frames=s.get("num_frames", config["num_frames"]),
                  camera_keys=cams, camera_to_view_id={c: i for i, c in enumerate(cams)}, front_camera_key=cams[0],
                  activation_checkpointing=ac, offload=offload, saved_attention_blocks=saved_blocks,
                  saved_linear_blocks=linear_blocks,
                  compile=compile, cp=cp, attention_backend="sdpa" if backend.startswith("sdpa") else backend)
    train.check_config(config)
    return config


def triton_attention_saveable():
    """Is attention.py's Triton attention a registered op? Selective checkpointing keeps only ops by
    name: as a plain autograd.Function (before 2026-11-25 15:48) its forward re-ran in backward."""
    try:
        torch.ops.cosmos_mv.flash_attention  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def checkpointed_share(ac, num_blocks=28, uncheckpointed=0):
    """Share of the blocks under activation checkpointing (train.py uncheckpointed_blocks leaves the last out)."""
    return 0.0 if ac == "none" else (num_blocks - min(uncheckpointed, num_blocks)) / num_blocks


def attention_recomputed(ac, backend, saved_blocks=-1, num_blocks=28, uncheckpointed=0):
    """Share of the blocks whose attention forward re-runs in backward (0.0 .. 1.0) under this plan."""
    checkpointed = num_blocks - min(uncheckpointed, num_blocks)
    if ac == "full" or (ac == "save_attention" and backend.startswith("triton") and not triton_attention_saveable()):
        return checkpointed / num_blocks
    if ac == "save_attention" and saved_blocks >= 0:
        return max(0, checkpointed - saved_blocks) / num_blocks
    return 0.0


# ---------------------------------------------------------------------------------------------------
# 2. FLOP model
# ---------------------------------------------------------------------------------------------------
# Every matrix product of one forward pass (elementwise work is not counted), for batch 1:
#   token-proportional linears per block: self q,k,v,o (4 D^2), cross q,o (2 D^2), MLP (2 D H_mlp)
#   cross k,v on the 512 caption tokens of every view; AdaLN-LoRA and the time MLP once per latent frame
#   self-attention 4 N^2 D per block (QK^T and PV), cross-attention 4 N 512 D per block
#   patch embed and final linear per token.
# Model FLOPs = 3 x forward (backward counted as 2 x forward for every op). Hardware FLOPs: backward of
# attention = 2.5 x forward (the FlashAttention recompute of QK^T), plus what checkpointing recomputes.


def tokens(cfg, n_views, num_frames, height, width):
    """(N tokens, latent frames in total) of one sample."""
    t = 1 + (num_frames - 1) // 4  # Wan VAE: 4x in time
    p, pt = cfg["patch_spatial"], cfg["patch_temporal"]
    frames = n_views * t // pt
    return frames * (height // 8 // p) * (width // 8 // p), n_views * t


def forward_flops(cfg, n_views, num_frames, height, width, text_tokens=512):
    """Matmul FLOPs of one forward pass of one sample, by kind (dict of floats)."""
    D, L, r = cfg["model_channels"], cfg["num_blocks"], cfg["adaln_lora_dim"]
    H_mlp, Dc = int(D * cfg["mlp_ratio"]), cfg["crossattn_emb_channels"]
    p, pt = cfg["patch_spatial"], cfg["patch_temporal"]
    N, frames = tokens(cfg, n_views, num_frames, height, width)
    ctx = text_tokens * n_views
    patch_in = (cfg["in_channels"] + 2 + cfg["n_cameras_emb"]) * p * p * pt
    out_dim = p * p * pt * cfg["out_channels"]
    f = dict(
        linear=2.0 * N * L * (6 * D * D + 2 * D * H_mlp),
        cross_kv=2.0 * L * ctx * Dc * D * 2,
        self_attn=4.0 * L * N * N * D,
        cross_attn=4.0 * L * N * text_tokens * D,
        adaln=2.0 * frames * (L * 3 * (D * r + r * 3 * D) + (D * D + D * 3 * D) + (D * r + r * 2 * D)),
        embed=2.0 * N * (patch_in * D + D * out_dim),
    )
    f["total"] = sum(f.values())
    return f


def iteration_flops(cfg, n_views, num_frames, height, width, checkpointing=False, recomputed_attention=0.0,
                    lora=False, text_views=None, saved_linear_share=0.0):
    """Model and hardware FLOPs of one training iteration of one sample (VAE not included).

    checkpointing: backward re-runs the block forward except attention (True: in every block, or the
    checkpointed_share() of the blocks), and attention's forward in the recomputed_attention share.
    lora: the frozen base weights get no weight gradients (backward of those linears = 1x forward).
    text_views: views whose cross-attention runs (the others have an all-zero caption slot, which the
    model skips exactly); the model FLOPs count every view, as perf.md does, the hardware FLOPs only these.
    saved_linear_share: share of the blocks that keep their non-widening linear outputs (not recomputed).
    """
    f = forward_flops(cfg, n_views, num_frames, height, width)
    attn = f["self_attn"] + f["cross_attn"]
    other = f["total"] - attn
    model = 3 * f["total"]
    backward_factor = 1 if lora else 2
    hardware = f["total"] + 2.5 * attn + backward_factor * other + float(checkpointing) * other \
        + recomputed_attention * attn
    skipped_other = skipped_attn = 0.0
    if text_views is not None:  # skipped: cross q/o projections, context k/v projections, cross-attention
        skipped = 1 - text_views / n_views
        N, D, L = tokens(cfg, n_views, num_frames, height, width)[0], cfg["model_channels"], cfg["num_blocks"]
        skipped_other = skipped * (2.0 * N * L * 2 * D * D + f["cross_kv"])
        skipped_attn = skipped * f["cross_attn"]
        hardware -= skipped_other * (1 + backward_factor + float(checkpointing))
        hardware -= skipped_attn * (1 + 2.5 + recomputed_attention)
    if saved_linear_share:  # q, k, v, self output, fc2 and the running views' cross q / output projections
        N, D, L = tokens(cfg, n_views, num_frames, height, width)[0], cfg["model_channels"], cfg["num_blocks"]
        views = n_views if text_views is None else text_views
        per_token = 4 * D * D + D * int(D * cfg["mlp_ratio"]) + 2 * D * D * views / n_views
        hardware -= saved_linear_share * 2.0 * N * L * per_token
    return dict(forward=f, model=model, hardware=hardware, attention_share=attn / f["total"],
                skipped_forward=skipped_other + skipped_attn)


# ---------------------------------------------------------------------------------------------------
# 3. Measuring
# ---------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, reps=3, warmup=1):
    """Median wall seconds of fn() over reps calls after warmup calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# What the card did while a run was timed. The same iteration ran at 8.3 s on one H100 and 9.1 s on another
# whose GPU reached 83 C and throttled (BENCH.md, sixth session): every training row records its card's
# clocks, power, temperature and the reasons the driver gave for lowering the clock, sampled by nvidia-smi.
CLOCK_EVENTS = {0x4: "power_cap", 0x8: "hw_slowdown", 0x20: "thermal", 0x40: "thermal", 0x80: "power_brake"}


def summarize_clocks(lines):
    """nvidia-smi CSV lines 'MHz, W, C, 0xREASONS' -> medians over the busy samples and event shares, or None."""
    busy = []
    for line in lines:
        try:
            mhz, watts, celsius, reasons = (f.strip() for f in line.split(","))
            sample = float(mhz), float(watts), float(celsius), int(reasons, 16)
        except ValueError:  # a header, a cut last line, "[N/A]"
            continue
        if not sample[3] & 0x1:  # 0x1: GPU idle
            busy.append(sample)
    if not busy:
        return None
    share = lambda mask: sum(1 for b in busy if b[3] & mask) / len(busy)  # noqa: E731
    return dict(samples=len(busy), sm_mhz=statistics.median(b[0] for b in busy),
                power_w=statistics.median(b[1] for b in busy), max_temp_c=max(b[2] for b in busy),
                **{name: share(sum(m for m, n in CLOCK_EVENTS.items() if n == name))
                   for name in dict.fromkeys(CLOCK_EVENTS.values())})


class ClockMonitor:
    """Samples the GPU with nvidia-smi in the background from start() to stop() (no-op without one)."""

    def __init__(self, device, period_ms=500):
        self.proc, self.cmd = None, None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            p = torch.cuda.get_device_properties(device)
            if not hasattr(p, "pci_domain_id"):  # older torch
                return
            bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"  # CUDA_VISIBLE_DEVICES-proof
            self.cmd = ["nvidia-smi", f"--id={bus}", f"-lms={period_ms}", "--format=csv,noheader,nounits",
                        "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"]

    def start(self):
        if self.cmd:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self):
        """Summary of the samples since start() (summarize_clocks), or None."""
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate()
        self.proc = None
        return summarize_clocks(out.splitlines())


def gemm_peak(device, tiny):
    """Dense matmul rate (TFLOP/s): bf16 8192^3 on a GPU (the MFU denominator), fp32 256^3 on the CPU."""
    n, dtype = (256, torch.float32) if tiny else (8192, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))  # never zeros
    sec = median_time(lambda: a @ b, device, reps=5 if tiny else 20, warmup=2 if tiny else 5)
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), tflops=2 * n ** 3 / sec / 1e12)


def attention_impls(device):
    """{name: attention(q, k, v) on [B, S, H, D]} for the kernel table."""
    def sdpa_with(order):
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(order):
                return attention.attention(q, k, v, backend="sdpa")
        return fn

    if device.type != "cuda":
        return {"sdpa": lambda q, k, v: attention.attention(q, k, v, backend="sdpa"),
                "reference": lambda q, k, v: attention.attention(q, k, v, backend="reference")}
    from torch.nn.attention import SDPBackend

    impls = {}
    if attention.triton_available():
        impls["ours (triton)"] = attention.flash_attention
    impls["sdpa default"] = lambda q, k, v: attention.attention(q, k, v, backend="sdpa")
    impls["sdpa cudnn"] = sdpa_with([SDPBackend.CUDNN_ATTENTION])
    impls["sdpa flash"] = sdpa_with([SDPBackend.FLASH_ATTENTION])
    return impls


def kernel_time(fn, device, reps):
    """Median seconds of one call: CUDA events over back-to-back calls on a GPU (triton's do_bench), so a
    millisecond kernel is not timed together with its launch and a synchronisation; median_time elsewhere."""
    if device.type == "cuda" and attention.triton_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * reps), return_mode="median") / 1e3
    return median_time(fn, device, reps=reps)


def kernel_table(device, shapes, heads, head_dim, reps):
    """Forward and backward TFLOP/s of every attention implementation at (name, Sq, Sk) shapes."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, Sq, Sk in shapes:
        g = torch.Generator(device=device).manual_seed(Sq + 7 * Sk)
        mk = lambda S: torch.randn(1, S, heads, head_dim, device=device, dtype=dtype, generator=g)  # noqa: E731
        q, k, v, do = mk(Sq), mk(Sk), mk(Sk), mk(Sq)
        fwd_flops = 4.0 * Sq * Sk * heads * head_dim
        row = dict(shape=name, Sq=Sq, Sk=Sk, heads=heads, fwd_flops=fwd_flops, dtype=str(dtype)[6:])
        for impl, fn in attention_impls(device).items():
            try:
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                fwd = kernel_time(lambda: fn(*leaves), device, reps)
                out = fn(*leaves)
                bwd = kernel_time(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), device, reps)
                row[impl] = dict(fwd_s=fwd, bwd_s=bwd, fwd_tflops=fwd_flops / fwd / 1e12,
                                 bwd_tflops=2.5 * fwd_flops / bwd / 1e12)
                del out, leaves
            except Exception as e:  # a backend may refuse a shape: say so in the table
                row[impl] = dict(error=f"{type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
        print(f"kernels {name} {Sq}x{Sk}: " + ", ".join(
            f"{i} {r['fwd_tflops']:.0f}/{r['bwd_tflops']:.0f}" if "fwd_tflops" in r else f"{i} {r['error']}"
            for i, r in ((i, row[i]) for i in attention_impls(device))), flush=True)
        del q, k, v, do
        free_memory(device)
    return rows


def random_vae(config, device, dtype):
    """The Wan2.1 VAE with random weights, built directly on the device (no file, no CPU init)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config["vae_seed"])
        with torch.device(device):
            vae = WanVAE(**VAE_PRESETS[config["vae"]])
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def synthetic_batch(config, n_views, seed, device):
    """One loader batch as train.MultiviewDataset + default collate give it (random pixels, caption)."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, W = config["batch_size"], config["num_frames"], config["height"], config["width"]
    video = torch.randint(0, 256, (B, n_views, T, 3, H, W), dtype=torch.uint8, generator=g)
    context = torch.zeros(B, n_views, 512, dit_config(config["model"])["crossattn_emb_channels"])
    context[:, 0, :60] = 0.1 * torch.randn(B, 60, context.shape[-1], generator=g)  # the front camera's caption
    if device.type == "cuda":
        video = video.pin_memory()  # as the DataLoader's pin_memory=True
    return dict(video=video, t5_text_embeddings=context.flatten(1, 2),
                view_ids=torch.arange(n_views).expand(B, n_views), fps=torch.full((B,), 10.0, dtype=torch.float64))


def compile_stats():
    """Graphs compiled and graph breaks so far in this process (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))


# Where one iteration's GPU time goes (--profile): one extra iteration after the timed ones runs under
# torch.profiler, and each kernel's time goes to the first family whose pattern matches its name (cuDNN,
# FlashAttention, cuBLAS/CUTLASS, inductor and our own kernel names). On the CPU (--tiny) the same patterns
# sort ATen ops by their self time, so the test exercises the code path.
KERNEL_FAMILIES = [
    ("attention backward", r"attn_bwd|flash_bwd|sdpa.*bprop|bprop.*sdpa|fmha.*bwd|(attention|sdpa).*backward"),
    ("attention forward", r"attn_fwd|flash_fwd|sdpa|fmha|scaled_dot_product|flash_attention|ring_attention"),
    ("VAE convolutions", r"conv|implicit_gemm|fprop|dgrad|wgrad|nchwToNhwc|nhwcToNchw"),
    ("GEMMs (linear layers)", r"gemm|nvjet|cutlass|cublas|xmma|Kernel2|aten::(mm|addmm|bmm|baddbmm|linear)$"),
    ("optimizer + EMA", r"multi_tensor|[Aa]dam|foreach"),
    ("communication", r"nccl|gloo|all_gather|reduce_scatter|all_reduce"),
    ("copies (offload, layout)", r"[Mm]emcpy|[Mm]emset|copy_kernel|aten::(copy_|to|_to_copy|contiguous)$"),
    ("elementwise, norms, reductions", r"triton_|elementwise|vectorized|reduce|unrolled|norm|softmax|index|"
                                       r"cat|fill|aten::"),
]


def kernel_family(name):
    """The KERNEL_FAMILIES entry of a kernel (or ATen op) name; 'other' when none matches."""
    for family, pattern in KERNEL_FAMILIES:
        if re.search(pattern, name):
            return family
    return "other"


def profile_iteration(step, device):
    """Run step() under torch.profiler: {wall_s, kernel_s, families: {family: seconds}, top: [...]}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    families, kernels = {}, []
    for e in prof.key_averages():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        fam = kernel_family(e.key)
        families[fam] = families.get(fam, 0.0) + us / 1e6
        kernels.append((us / 1e6, e.count, e.key[:120], fam))
    kernels.sort(reverse=True)
    return dict(wall_s=wall, kernel_s=sum(families.values()), families=families,
                top=[dict(seconds=s, calls=n, name=k, family=f) for s, n, k, f in kernels[:15]])


def plan_name(ac, offload, saved_blocks, uncheckpointed=0, linear_blocks=0):
    saved = f" ({saved_blocks} blocks)" if ac == "save_attention" and saved_blocks >= 0 else ""
    linear = f" + linears ({linear_blocks} blocks)" if linear_blocks else ""
    plain = f", last {uncheckpointed} blocks not checkpointed" if uncheckpointed and ac != "none" else ""
    return f"{ac}{saved}{linear}{plain} / {offload}"


def bench_training(setup, backend, plan, iters, warmup, device, rank, world, parallel, overrides=(), compile=False,
                   profile=False):
    """Time real train.train_step iterations of one setup; returns the result dict (or raises OOM).

    plan: (activation_checkpointing, offload[, saved_attention_blocks[, saved_linear_blocks]]).
    compile: torch.compile the blocks
    (train.py compile=True); the first iteration then includes the compilation (give it a warm-up).
    profile: one more iteration under torch.profiler (not in the medians), kernel time by family.
    parallel: train.setup_parallelism(device, world, cp), i.e. (FSDP mesh, cp group or None, dp rank, dp).
    """
    ac, offload, saved_blocks, linear_blocks = (*plan, *(-1, 0)[len(plan) - 2:])
    s = SETUPS[setup]
    mesh, cp_group, dp_rank, dp = parallel
    cp = world // dp
    config = training_config(setup, ac, offload, backend, overrides, saved_blocks, compile, cp, linear_blocks)
    free_memory(device)
    compiled_before = compile_stats()
    t_build = time.perf_counter()
    net, trainable = train.build_model(config, device, mesh, resuming=False)
    net.enable_context_parallel(cp_group)  # as train.py: ring self-attention over the group's shards
    params = dict(net.named_parameters())
    trainable_params = [params[n] for n in trainable]
    ema = train.EMA([(n, params[n]) for n in trainable], offload=offload != "none")
    optimizer, scheduler = train.build_optimizer(config, trainable_params)
    vae = random_vae(config, device, torch.bfloat16 if config["precision"] == "bf16" else torch.float32)
    if config["compile"]:
        train.compile_vae(vae)  # as train.build_vae
    # Seeded by the dp rank, as train.py's sampler runs over dp: the ranks of a cp group hold the same sample.
    batches = [synthetic_batch(config, s["n_views"], seed=dp_rank * 1000 + i, device=device) for i in range(2)]
    sync(device)
    build_s = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, monitor, clocks = [], ClockMonitor(device), None
    try:
        with attention_context(backend):
            for it in range(warmup + iters):
                if it == warmup:
                    monitor.start()  # the timed iterations only
                phases, last = {}, [time.perf_counter()]

                def mark(name):
                    sync(device)
                    now = time.perf_counter()
                    phases[name] = phases.get(name, 0.0) + now - last[0]  # train_step may mark one twice
                    last[0] = now

                sync(device)
                t0 = last[0] = time.perf_counter()
                batch = batches[it % len(batches)]  # in memory: the loader's workers decode ahead of the GPU
                mark("data")
                loss, grad_norm = train.train_step(net, vae, batch, optimizer, scheduler, ema, it, config,
                                                   trainable_params, device, dp_rank, mark=mark)
                phases["total"] = time.perf_counter() - t0  # offload=all: AdamW may still run (next VAE)
                rows.append(dict(phases, loss=loss, grad_norm=grad_norm))
                if rank == 0:
                    print(f"  {setup}{f' cp={cp}' if cp > 1 else ''} {backend}{' compiled' if compile else ''} "
                          f"{plan_name(ac, offload, saved_blocks, config['uncheckpointed_blocks'], linear_blocks)} "
                          f"iter {it}{' (warm-up)' if it < warmup else ''}: "
                          + " ".join(f"{k} {v:.2f}s" for k, v in phases.items()) + f" loss {loss:.3f}", flush=True)
            train.finish_step(optimizer)
            ema.wait()
            clocks = monitor.stop()
            peak = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                    else train.peak_memory_gb(device))
            reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else None
            profiled = None
            if profile:
                it = warmup + iters
                profiled = profile_iteration(
                    lambda: train.train_step(net, vae, batches[it % len(batches)], optimizer, scheduler, ema, it,
                                             config, trainable_params, device, dp_rank), device)
                train.finish_step(optimizer)
                ema.wait()
    finally:
        monitor.stop()
        train.finish_step(optimizer)
        ema.wait()
        del net, params, trainable_params, ema, optimizer, scheduler, vae, batches
        free_memory(device)
    timed = rows[warmup:] or rows
    med = {k: statistics.median(r[k] for r in timed) for k in ("data", "vae", "forward_backward", "optimizer", "total")}
    cfg = dit_config(config["model"])
    uncheckpointed = config["uncheckpointed_blocks"]
    recomputed = attention_recomputed(ac, backend, saved_blocks, cfg["num_blocks"], uncheckpointed)
    fl = iteration_flops(cfg, s["n_views"], config["num_frames"], config["height"], config["width"],
                         checkpointing=checkpointed_share(ac, cfg["num_blocks"], uncheckpointed),
                         recomputed_attention=recomputed, lora=config["lora_rank"] > 0,
                         text_views=1,  # the caption's view (or, text dropped, the one view that still runs)
                         saved_linear_share=linear_blocks / cfg["num_blocks"])
    B = config["batch_size"]
    samples = dp * B  # per iteration: each cp group trains B samples
    compiled = None
    if compile:  # did it compile, and in one graph per block kind (a graph break would split the blocks)?
        after = compile_stats()
        compiled = {k: after[k] - compiled_before[k] for k in after}
        if compiled["graph_breaks"] and rank == 0:
            print(f"  warning: {compiled['graph_breaks']} graph break(s) in the compiled blocks", flush=True)
    return dict(setup=setup, backend=backend, activation_checkpointing=ac, offload=offload,
                saved_attention_blocks=saved_blocks, uncheckpointed_blocks=uncheckpointed, num_blocks=cfg["num_blocks"],
                saved_linear_blocks=linear_blocks,
                compile=compile, compiled=compiled,
                attention_recomputed=recomputed, world=world, cp=cp, dp=dp, batch_per_rank=B, samples_per_iter=samples,
                tokens=tokens(cfg, s["n_views"], config["num_frames"], config["height"], config["width"])[0],
                warmup=warmup, iters=len(timed), build_s=build_s, median=med, iterations=rows,
                # of the whole iteration (all ranks); per-sample FLOPs are the same at any cp (the ring splits them)
                model_flops=fl["model"] * samples, hardware_flops=fl["hardware"] * samples, forward_flops=fl["forward"],
                attention_share=fl["attention_share"], peak_mem_gib=peak, peak_reserved_gib=reserved,
                gpu_s_per_sample=med["total"] * world / samples, profile=profiled, clocks=clocks)


def train_with_fallback(setup, backend, iters, warmup, device, rank, world, parallel, plans=None, overrides=(),
                        compile=False, profile=False):
    """bench_training with the first memory plan that fits; out-of-memory attempts are recorded."""
    failed = []
    for plan in plans or MEMORY_PLANS[setup]:
        try:
            r = bench_training(setup, backend, plan, iters, warmup, device, rank, world, parallel, overrides, compile,
                               profile)
            r["oom_plans"] = failed
            return r
        except torch.OutOfMemoryError as e:
            failed.append(dict(plan=list(plan), error=str(e).splitlines()[0][:200]))
            if rank == 0:
                print(f"  {setup} {backend} {plan}: out of memory, trying the next plan", flush=True)
            free_memory(device)
    return dict(setup=setup, backend=backend, cp=world // parallel[3], error="out of memory with every plan",
                oom_plans=failed)


def bench_vae(device, tiny, reps):
    """Encode and decode of one 29-frame view (704x1280 bf16 on a GPU): seconds and peak memory."""
    frames, H, W = (5, 32, 48) if tiny else (29, 704, 1280)
    dtype = torch.float32 if tiny else torch.bfloat16
    config = dict(vae="tiny" if tiny else "wan2.1", vae_seed=0)
    vae = random_vae(config, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    video = torch.randint(0, 256, (1, 3, frames, H, W), dtype=torch.uint8, device=device, generator=g)
    latent = torch.randn(1, 16, 1 + (frames - 1) // 4, H // 8, W // 8, device=device, generator=g)
    out = {}
    for name, fn in (("encode", lambda: vae.encode(video)), ("decode", lambda: vae.decode(latent))):
        fn()  # warm-up
        free_memory(device)
        sec = median_time(fn, device, reps=reps, warmup=0)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        out[name] = dict(seconds=sec, peak_mem_gib=peak)
    del vae
    free_memory(device)
    return dict(frames=frames, height=H, width=W, dtype=str(dtype).replace("torch.", ""), **out)


def bench_sampling(device, tiny, warmup, evals, backend):
    """One CFG sampling step (batch of 2 through the DiT) at 720p x 7 views, as sample.py runs it."""
    import sample

    attn = attention_context(backend)

    n_views, frames, H, W = (2, 5, 64, 96) if tiny else (7, 29, 704, 1280)
    preset, dtype = ("demo", torch.float32) if tiny else ("2b", torch.bfloat16)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = build_dit(preset, device=device, dtype=dtype).eval().requires_grad_(False)
    t = 1 + (frames - 1) // 4
    D = net.config["crossattn_emb_channels"]
    g = torch.Generator().manual_seed(0)
    context = torch.zeros(1, n_views * 512, D)
    context[0, :60] = torch.randn(60, D, generator=g)  # a caption in slot 0, as sample.py --benchmark
    uncond = torch.zeros_like(context)
    uncond[0, :40] = torch.randn(40, D, generator=g)  # a negative prompt: two CFG branches
    x0_fn = sample.guided_x0_fn(net, context.to(device), uncond.to(device), 7.0,
                                sample.latent_view_indices(list(range(n_views)), t).to(device),
                                torch.tensor([10.0], device=device))
    x = torch.randn(1, 16, n_views * t, H // 8, W // 8, generator=g).mul_(80.0).to(device)
    free_memory(device)
    with torch.no_grad(), attn:
        sec = median_time(lambda: x0_fn(x, 80.0), device, reps=evals, warmup=warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del net, x0_fn
    free_memory(device)
    steps = sample.STEPS
    return dict(n_views=n_views, frames=frames, height=H, width=W, steps=steps, per_step_s=sec,
                warmup=warmup, evals=evals, peak_mem_gib=peak, backend=backend,
                sampling_s_projected=(steps + 1) * sec)  # 35 AB2 steps + the final clean evaluation


# ---------------------------------------------------------------------------------------------------
# 4. Ring model: 8 GPUs, context parallelism 8, from our measured kernel rates
# ---------------------------------------------------------------------------------------------------
# Each of P ranks holds S = N/P tokens. Per layer the ring runs P attention steps of S x S (forward) and
# P backward steps, each overlapping the transfer of the next K/V chunk (bf16) or of the travelling
# dK/dV (fp32): a step costs max(compute, transfer). Not hidden: the fp32 merge of (out, lse) per
# forward step and the fp32 adds per backward step (HBM passes), and the last dK/dV hop per layer.
# Everything else of our 1-GPU iteration (linears, norms, VAE, optimizer) divides by P: each rank runs
# the same code on 1/P of the tokens, encodes at most one view, and owns 1/P of the optimizer state.

NVLINK_BYTES_S = 300e9  # per direction, conservative for H100 SXM NVLink 4 (P2P)
HBM_BYTES_S = 3.0e12


def rate_at(kernels, S, impl, which):
    """Measured TFLOP/s of impl ('fwd'/'bwd') at the kernel-table shape closest to S self-attention."""
    rows = [r for r in kernels if r["Sq"] == r["Sk"] and "fwd_tflops" in r.get(impl, {})]
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(math.log(r["Sq"] / S)))
    return row[impl][f"{which}_tflops"] * 1e12


# The kernel-table columns behind each training backend's self-attention: (forward, backward).
KERNEL_OF_BACKEND = {"auto": ("ours (triton)", "ours (triton)"), "triton": ("ours (triton)", "ours (triton)"),
                     "triton-cudnn": ("ours (triton)", "sdpa cudnn"), "sdpa-cudnn": ("sdpa cudnn", "sdpa cudnn"),
                     "sdpa": ("sdpa default", "sdpa default")}


def ring_model(result, kernels, vae, impl, P=8):
    """Predicted s/iter at CP=P from one measured 1-GPU training result and the kernel table.

    Two numbers: with the attention output kept by checkpointing, and with the attention forward
    recomputed in backward (activation_checkpointing=full; save_attention keeps the ring's output).
    """
    S = result["tokens"] / P
    run_fwd, run_bwd = KERNEL_OF_BACKEND.get(result["backend"], (None, None))
    rates = [rate_at(kernels, S, impl, "fwd"), rate_at(kernels, S, impl, "bwd"),
             rate_at(kernels, result["tokens"], run_fwd, "fwd"), rate_at(kernels, result["tokens"], run_bwd, "bwd")]
    if None in rates:
        return None
    fwd_rate, bwd_rate, big_fwd, big_bwd = rates
    D, L = 2048, result.get("num_blocks", 28)  # the 2B model: the ring model is made for the seed's setups only
    step_flops = 4.0 * S * S * D
    kv_bytes = 2 * S * D * 2
    fwd_step = max(step_flops / fwd_rate, kv_bytes / NVLINK_BYTES_S) + 3 * S * D * 4 / HBM_BYTES_S
    bwd_step = max(2.5 * step_flops / bwd_rate, (kv_bytes + 2 * S * D * 4) / NVLINK_BYTES_S) + 6 * S * D * 4 / HBM_BYTES_S
    attn_saved = L * (P * fwd_step + P * bwd_step + kv_bytes / NVLINK_BYTES_S)
    attn_recomputed = attn_saved + L * P * fwd_step
    # our 1-GPU attention time at the run's own kernel rates; the rest of forward-backward divides by P
    f = result["forward_flops"]
    attn_1gpu = f["self_attn"] * ((1 + float(result["attention_recomputed"])) / big_fwd + 2.5 / big_bwd)
    rest = max(result["median"]["forward_backward"] - attn_1gpu, 0.0) / P
    setup = SETUPS[result["setup"]]
    same_size = vae and (vae.get("height"), vae.get("width")) == (setup["height"], setup["width"])
    vae_one_view = vae["encode"]["seconds"] if same_size else result["median"]["vae"] / setup["n_views"]
    opt = result["median"]["optimizer"] / P
    other = rest + vae_one_view + opt
    return dict(P=P, local_tokens=S, impl=impl, fwd_tflops=fwd_rate / 1e12, bwd_tflops=bwd_rate / 1e12,
                fwd_step_ms=fwd_step * 1e3, bwd_step_ms=bwd_step * 1e3,
                compute_over_comm_fwd=(step_flops / fwd_rate) / (kv_bytes / NVLINK_BYTES_S),
                attention_s=attn_saved, attention_recomputed_s=attn_recomputed, other_dit_s=rest,
                vae_s=vae_one_view, optimizer_s=opt, total_s=attn_saved + other,
                total_recomputed_s=attn_recomputed + other, attention_1gpu_est_s=attn_1gpu)


# ---------------------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------------------


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def setup_name(r):
    """The setup column: the setup, and its cp when a sample is split over ranks (runs before cp: none)."""
    return f"{r['setup']}, cp={r['cp']}" if r.get("cp", 1) > 1 else r["setup"]


def markdown(res):
    """The BENCH.md tables from a results dict."""
    cp = res.get("cp", 1)
    split = f" = data-parallel {res['world'] // cp} x cp {cp}" if cp > 1 else ""
    out = [f"Card: {res['device']}; torch {res['torch']}, triton {res.get('triton')}, "
           f"cuDNN {res.get('cudnn')}; {res['date']}; world size {res['world']}{split}.", ""]
    peak = res.get("gemm", {}).get("tflops")
    if peak:
        out += [f"GEMM peak measured in this run: {peak:.0f} TFLOP/s ({res['gemm']['dtype']} "
                f"{res['gemm']['n']}^3 matmul); MFU below is model FLOPs / (GPUs x this peak x time).", ""]
    if res.get("training"):
        out += ["| setup | attention | checkpointing / offload | s/iter (median) | data | VAE | fwd+bwd | optimizer "
                "| model PFLOP | TFLOP/s model (hw) | MFU | peak GiB | GPU-s/sample: ours vs seed | ratio |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["training"]:
            if "median" not in r:
                out.append(f"| {setup_name(r)} | {r['backend']} | {r.get('error')} | | | | | | | | | | | |")
                continue
            m = r["median"]
            # FLOP columns per GPU: the JSON has the iteration's (all ranks); runs saved before cp was recorded
            # stored those of one rank
            gpus = r["world"] if "cp" in r else 1
            pf = r["model_flops"] / gpus / 1e15
            tf = r["model_flops"] / gpus / m["total"] / 1e12
            hw = r["hardware_flops"] / gpus / m["total"] / 1e12
            mfu = f"{100 * tf / peak:.0f}%" if peak else "n/a"
            seed = SEED_S_PER_ITER.get(r["setup"])  # full fine-tune setups only
            seed_gpu_s = seed * SEED_GPUS if seed else None
            cmp_ = f"{r['gpu_s_per_sample']:.1f} vs {seed_gpu_s:.0f}" if seed_gpu_s else f"{r['gpu_s_per_sample']:.1f}"
            ratio = f"{seed_gpu_s / r['gpu_s_per_sample']:.2f}x" if seed_gpu_s else ""
            share, L = float(r["attention_recomputed"]), r.get("num_blocks", 28)
            again = ("" if not share else " (attn recomputed)" if share == 1 else
                     f" (attn recomputed in {round(share * L)} of {L} blocks)")
            plan = plan_name(r["activation_checkpointing"], r["offload"], r.get("saved_attention_blocks", -1),
                             r.get("uncheckpointed_blocks", 0), r.get("saved_linear_blocks", 0))
            out.append(f"| {setup_name(r)} | {r['backend']}{', compiled' if r.get('compile') else ''} | "
                       f"{plan}"
                       f"{again} | {m['total']:.2f} "
                       f"({r['iters']} it) | {m['data']:.2f} | {m['vae']:.2f} | {m['forward_backward']:.2f} | "
                       f"{m['optimizer']:.2f} | {pf:.2f} | {tf:.0f} ({hw:.0f}) | {mfu} | "
                       f"{r['peak_mem_gib']:.1f} | {cmp_} | {ratio} |")
        out.append("")
        for r in res["training"]:  # what the card did meanwhile (a hot card throttles: compare like with like)
            c = r.get("clocks")
            if c:
                out.append(f"- {setup_name(r)} {r['backend']}{' compiled' if r.get('compile') else ''}, card during "
                           f"the timed iterations ({c['samples']} busy samples): SM clock median {c['sm_mhz']:.0f} MHz, "
                           f"power median {c['power_w']:.0f} W, up to {c['max_temp_c']:.0f} C; clock lowered for the "
                           f"power cap in {100 * c['power_cap']:.0f} % of the samples, for temperature in "
                           f"{100 * c['thermal']:.0f} %, by hardware slowdown / power brake in "
                           f"{100 * (c['hw_slowdown'] + c['power_brake']):.0f} %.")
        if out[-1]:
            out.append("")
        for r in res["training"]:  # what compiling cost (its first iteration) and whether it split the blocks
            if r.get("compile") and "median" in r:
                c = r.get("compiled") or {}
                out.append(f"- {setup_name(r)} {r['backend']} compiled: first iteration "
                           f"{r['iterations'][0]['total']:.2f} s (compilation included) vs {r['median']['total']:.2f} s median of the timed; "
                           f"{c.get('graphs')} graph(s) compiled, {c.get('graph_breaks')} graph break(s).")
        if out[-1]:
            out.append("")
        for r in res["training"]:  # --profile: where the GPU time of one more iteration went
            prof = r.get("profile")
            if prof:
                unit, rest = (("ATen op self", "Python and dispatch") if res["device"] == "cpu" else
                              ("GPU kernel", "GPU idle, e.g. waiting for the CPU or a synchronisation"))
                out += [f"Profile of one more {setup_name(r)} {r['backend']} iteration (torch.profiler): "
                        f"{prof['wall_s']:.2f} s wall, {prof['kernel_s']:.2f} s of {unit} time (the rest: {rest}).",
                        "",
                        "| kernel family | seconds | share of the wall time |", "|---|---|---|"]
                for fam, sec in sorted(prof["families"].items(), key=lambda kv: -kv[1]):
                    out.append(f"| {fam} | {sec:.2f} | {100 * sec / prof['wall_s']:.1f}% |")
                out.append("")
    if res.get("kernels"):
        impls = [k for k in res["kernels"][0] if isinstance(res["kernels"][0][k], dict)]
        dtype = res["kernels"][0].get("dtype", "bfloat16")
        out += [f"Attention kernels, B=1, {dtype}, [B, S, H, D], non-causal; TFLOP/s forward / backward "
                "(forward 4·Sq·Sk·H·d, backward 2.5×):", "",
                "| shape | Sq × Sk, heads | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
        for r in res["kernels"]:
            cells = [f"{r[i]['fwd_tflops']:.0f} / {r[i]['bwd_tflops']:.0f}" if "fwd_tflops" in r[i] else "n/a"
                     for i in impls]
            out.append(f"| {r['shape']} | {r['Sq']:,} × {r['Sk']:,}, {r['heads']} | " + " | ".join(cells) + " |")
        out.append("")
    mem = lambda d: f", peak {d['peak_mem_gib']:.1f} GiB" if d.get("peak_mem_gib") else ""  # noqa: E731
    if res.get("vae"):
        v = res["vae"]
        out += [f"VAE, one view {v['frames']}x{v['height']}x{v['width']} {v['dtype']}: encode "
                f"{v['encode']['seconds']:.2f} s{mem(v['encode'])}; decode {v['decode']['seconds']:.2f} s"
                f"{mem(v['decode'])}.", ""]
    if res.get("sampling"):
        s = res["sampling"]
        decode = res["vae"]["decode"]["seconds"] * s["n_views"] if res.get("vae") else 0.0
        out += [f"Sampling {s['n_views']} views x {s['frames']}x{s['height']}x{s['width']}, CFG batch 2, "
                f"attention {s['backend']}: {s['per_step_s']:.2f} s/step (median of {s['evals']} after "
                f"{s['warmup']} warm-up){mem(s)}; projected {s['steps']} steps + "
                f"final evaluation {s['sampling_s_projected']:.0f} s + decode {decode:.0f} s = "
                f"{s['sampling_s_projected'] + decode:.0f} s.", ""]
    if res.get("ring"):
        out += ["Ring model, 8 GPUs, CP=8 (kernel rates measured above at the local length; NVLink 300 GB/s; "
                "the rest of our 1-GPU iteration divided by 8, one view encoded per GPU):", "",
                "| setup | ring kernels | local tokens | fwd / bwd TF/s | compute/comm | attention (saved / recomputed) "
                "| other DiT | VAE | optimizer | predicted s/iter (saved / recomputed) | seed |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in res["ring"].items():
            out.append(f"| {m['setup']} | {m['impl']} | {m['local_tokens']:,.0f} | {m['fwd_tflops']:.0f} / "
                       f"{m['bwd_tflops']:.0f} | {m['compute_over_comm_fwd']:.1f}x | {m['attention_s']:.2f} / "
                       f"{m['attention_recomputed_s']:.2f} | {m['other_dit_s']:.2f} | {m['vae_s']:.2f} | "
                       f"{m['optimizer_s']:.2f} | {m['total_s']:.2f} / {m['total_recomputed_s']:.2f} | "
                       f"{SEED_S_PER_ITER.get(m['setup'], '')} |")
        out.append("")
    return "\n".join(out)


def finish(res):
    """Results of a run cut short keep their partial training list; add the ring model."""
    if "training" not in res and res.get("training_partial"):
        res["training"] = res.pop("training_partial")
    if res.get("kernels") and res.get("training"):
        impls = [k for k in res["kernels"][0] if isinstance(res["kernels"][0][k], dict) and "flash" not in k]
        ring = {}
        for setup in SEED_S_PER_ITER:  # from the fastest full fine-tune run of each setup on whole samples
            runs = [r for r in res["training"] if r.get("setup") == setup and "median" in r and r.get("cp", 1) == 1]
            if runs:
                best = min(runs, key=lambda r: r["median"]["total"])
                for name in impls:
                    m = ring_model(best, res["kernels"], res.get("vae"), name)
                    if m:
                        ring[f"{setup} / {name}"] = dict(m, setup=setup, from_run=best["backend"])
        res["ring"] = ring
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: demo DiT, tiny VAE, tiny shapes")
    p.add_argument("--setups", nargs="*", help=f"training setups (default all but tiny): {list(SETUPS)}")
    p.add_argument("--backends", nargs="*", help=f"attention backends for training {BACKENDS} "
                                                 "(default on Hopper: sdpa eager and auto compiled -- the last one also "
                                                 "runs LoRA; sdpa and reference on CPU)")
    p.add_argument("--plan", action="append", default=[], metavar="SETUP=AC:OFFLOAD[:BLOCKS[:LINEAR]]",
                   help="force a memory plan, e.g. 720p-5v=full:all; BLOCKS: save_attention in the first BLOCKS "
                        "blocks only (720p-5v=save_attention:ema:14); LINEAR: the first LINEAR blocks also keep "
                        "their linear outputs (480p-5v=save_attention:none:-1:14); repeat for fallbacks, tried in order")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks in every run (train.py compile)")
    p.add_argument("--profile", nargs="*", metavar="SETUP",
                   help="one more iteration of these setups (all when none named) under torch.profiler: GPU time "
                        "by kernel family")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per setup")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations per setup (autotuning, allocator)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="train.py config override")
    p.add_argument("--cp", type=int, default=1, help="context parallelism as train.py cp=N: each N consecutive ranks "
                                                     "split one sample (world = data-parallel x N)")
    p.add_argument("--skip", nargs="*", default=[], choices=["gemm", "kernels", "training", "vae", "sampling"])
    p.add_argument("--runs", nargs="*", metavar="SETUP:BACKEND[:WARMUP:ITERS][:compile]",
                   help="explicit training runs instead of --setups x --backends, e.g. 720p-7v:sdpa-cudnn:0:1 "
                        "480p-5v:sdpa:1:2:compile")
    p.add_argument("--sample_backend", default="auto", help="attention for the sampling step (sample.py: auto)")
    p.add_argument("--sample_warmup", type=int, default=1)
    p.add_argument("--sample_evals", type=int, default=1)
    p.add_argument("--out", default="bench_results/bench.json", help="results JSON (rewritten after every section)")
    p.add_argument("--md", help="also write the markdown tables here")
    p.add_argument("--report", metavar="JSON", help="only re-render the tables (and ring model) of a saved run")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded with the results
    if args.report:
        with open(args.report) as f:
            res = finish(json.load(f))
        print(markdown(res))
        return res

    plans = {}
    for item in args.plan:
        name, _, spec = item.partition("=")
        ac, off, *blocks = spec.split(":") + ([] if ":" in spec else ["none"])
        if (name not in SETUPS or ac not in ("none", "full", "save_attention") or off not in ("none", "ema", "all")
                or len(blocks) > 2 or not all(b.lstrip("-").isdigit() for b in blocks)):
            p.error(f"--plan {item}: expected SETUP=AC:OFFLOAD[:BLOCKS[:LINEAR_BLOCKS]] with SETUP in {list(SETUPS)}, "
                    f"AC none|full|save_attention, OFFLOAD none|ema|all, BLOCKS an integer (-1 = all), LINEAR_BLOCKS "
                    f"the blocks that also keep their linear outputs")
        plans.setdefault(name, []).append((ac, off, *(int(b) for b in blocks)))
    runs = []
    for item in args.runs or []:
        setup, backend, *rest = item.split(":")
        compiled = args.compile or rest[-1:] == ["compile"]
        counts = rest[:-1] if rest[-1:] == ["compile"] else rest
        if len(counts) not in (0, 2) or not all(c.isdigit() for c in counts):
            p.error(f"run {item}: expected SETUP:BACKEND[:WARMUP:ITERS][:compile]")
        warmup, iters = (int(counts[0]), int(counts[1])) if counts else (args.warmup, args.iters)
        if iters < 1:
            p.error(f"run {item}: needs at least one timed iteration")
        runs.append((setup, backend, warmup, iters, compiled))
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if any(item.partition("=")[0].strip() == "cp" for item in args.set):
        # cp is more than a config value here: it sets the process groups, the batches and the accounting
        p.error("--set cp=N: bench.py takes context parallelism as --cp N")
    if args.cp < 1:
        p.error(f"--cp {args.cp}: must be >= 1")
    rank, world, device, created = train.setup_distributed()
    try:
        return _main(p, args, plans, runs, rank, world, device)
    finally:
        if created:
            dist.destroy_process_group()


def default_runs(setups, backends, tiny, warmup, iters, compile, kernels):
    """The training runs of a plain `python bench.py`: [(setup, backend, warmup, iters, compiled)].

    On a GPU with our kernels: what a user would otherwise pick (SDPA, eager) beside ours as train.py runs
    fastest (attention_backend=auto: on Hopper our Gluon forward and backward for self-attention, SDPA
    for cross-attention; compiled blocks and VAE encoder). LoRA runs once, with the last (preferred)
    backend. --backends replaces the pair (compiled only with --compile).
    """
    ours = "auto" if kernels and not tiny else None
    chosen = backends or (["sdpa", "reference"] if tiny else ["sdpa"] + ([ours] if ours else []))
    return [(s, b, warmup, iters, compile or (not backends and b == ours)) for s in setups for b in chosen
            if tiny or not s.startswith("lora") or b == chosen[-1]]


def _main(p, args, plans, runs, rank, world, device):
    """main() inside the process group: check the runs, build the dp x cp groups, run the sections."""
    tiny = args.tiny or device.type != "cuda"
    if tiny and not args.tiny:
        print("no GPU: running the --tiny CPU smoke test")
    setups = args.setups if args.setups is not None else (["tiny"] if tiny else [s for s in SETUPS if s != "tiny"])
    if args.runs is None:
        runs = default_runs(setups, args.backends, tiny, args.warmup, args.iters, args.compile,
                            attention.triton_available())
    for setup, backend, _, _, compiled in runs:  # refused now, not after the kernel and VAE sections
        if setup not in SETUPS or backend not in BACKENDS:
            p.error(f"unknown run {setup}:{backend}; setups {list(SETUPS)}, backends {BACKENDS}")
        for plan in plans.get(setup) or MEMORY_PLANS[setup]:
            try:
                training_config(setup, *plan[:2], backend, args.set, (*plan, -1)[2], compiled, args.cp)
            except ValueError as e:
                p.error(f"run {setup}:{backend}{':compile' if compiled else ''} with --cp {args.cp}: {e}")
    try:  # the groups train.py builds for cp: cp groups of consecutive ranks, data parallel over the groups
        parallel = train.setup_parallelism(device, world, args.cp)
    except ValueError as e:
        p.error(f"--cp {args.cp}: {e} (start dp x cp processes, e.g. torchrun --nproc_per_node={args.cp})")
    if any(r[-1] for r in runs):
        # Every compiled run adds entries (per shape and checkpointing kind) to the cache of the one code
        # object all blocks share; past the limit dynamo would quietly run the blocks eagerly.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, triton=triton_version,
               cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None, world=world, cp=args.cp,
               command=" ".join(["bench.py"] + args.argv), tiny=tiny)
    out_dir = os.path.dirname(args.out)
    if rank == 0 and out_dir:
        os.makedirs(out_dir, exist_ok=True)

    def save():
        if rank == 0:
            write_json(args.out, res)
            if args.md:
                tmp = f"{args.md}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(markdown(res) + "\n")
                os.replace(tmp, args.md)

    def section(name, fn):
        if name in args.skip:
            return
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # one broken section must not cost the others (device time is scarce)
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            if rank == 0:
                print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            if tiny:
                raise
        if rank == 0:
            print(f"section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        free_memory(device)
        save()

    section("gemm", lambda: gemm_peak(device, tiny))
    if tiny:
        shapes, heads, hd, reps = [("self", 64, 64), ("cross", 96, 24)], 2, 64, 3
    else:  # the 1-GPU sequence (480p) and the per-GPU lengths at CP=8 of the three setups; cross = one 720p view
        shapes = [("self, CP=8 480p-5v", 7950, 7950), ("self, CP=8 720p-5v", 17600, 17600),
                  ("self, CP=8 720p-7v", 24640, 24640), ("self, 1 GPU 480p-5v", 63600, 63600),
                  ("cross, 720p view", 28160, 512)]
        heads, hd, reps = 16, 128, 5
    section("kernels", lambda: kernel_table(device, shapes, heads, hd, reps))
    section("vae", lambda: bench_vae(device, tiny, reps=2))

    def training():
        results = res.setdefault("training_partial", [])
        for setup, backend, warmup, iters, compiled in runs:
            try:
                r = train_with_fallback(setup, backend, iters, warmup, device, rank, world, parallel,
                                        plans.get(setup), args.set, compiled,
                                        args.profile is not None and (not args.profile or setup in args.profile))
            except Exception as e:  # record and go on with the next run
                if tiny:
                    raise
                r = dict(setup=setup, backend=backend, cp=args.cp, compile=compiled,
                         error=f"{type(e).__name__}: {e}"[:400])
                print(f"  {setup} {backend} failed: {r['error']}", flush=True)
                free_memory(device)
            results.append(r)
            save()
        return results

    section("training", training)
    res.pop("training_partial", None)
    section("sampling", lambda: bench_sampling(device, tiny, args.sample_warmup, args.sample_evals,
                                               args.sample_backend))
    finish(res)
    save()
    if rank == 0:
        print(markdown(res), flush=True)
    return res


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)  # a section that failed fails the command
