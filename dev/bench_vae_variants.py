"""Time variants of the VAE encode of one 480p-5v training sample (5 views x 29 x 480 x 848, bf16, H100).

    python dev/bench_vae_variants.py            # the table in BENCH.md ("Third session", VAE side roads)

Variants: train.py's default (one view per call, 16-frame chunks); all five views in one call; the whole
clip in one pass; RMS-norm + SiLU fused by torch.compile (patched into the residual blocks here, not in
model.py); channels_last_3d conv weights. Random weights; medians of 3 after a warm-up; then a
torch.profiler table of the default encode's kernels.
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from model import VAE_PRESETS, WanVAE  # noqa: E402


def timeit(fn, reps=3):
    """(median seconds, last output) after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.compile(dynamic=True)
def rms_silu(x, gain):
    """SiLU(F.normalize(x, dim=1) * gain) as one fused kernel."""
    return F.silu(F.normalize(x, dim=1) * gain)


def fused_forward(self, x_BCTHW, cache=None):
    """VAEResBlock.forward with each norm + SiLU pair fused."""
    norm1, _, conv1, norm2, _, _, conv2 = self.residual
    h = conv1(rms_silu(x_BCTHW, norm1.gamma * norm1.scale), cache)
    h = conv2(rms_silu(h, norm2.gamma * norm2.scale), cache)
    return h.add_(self.shortcut(x_BCTHW))


def set_conv_layout(vae, memory_format):
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=memory_format)


def main():
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = WanVAE(**VAE_PRESETS["wan2.1"]).to("cuda", torch.bfloat16).eval()
    V = 5
    video = torch.randint(0, 256, (V, 3, 29, 480, 848), dtype=torch.uint8, device="cuda")
    per_view = lambda chunk=None: torch.cat([vae.encode(video[i:i + 1], chunk=chunk) for i in range(V)])  # noqa: E731
    rows = {}
    rows["default (1 view per call, 16-frame chunks)"], ref = timeit(per_view)
    rows["5 views per call"], _ = timeit(lambda: vae.encode(video))
    rows["whole clip in one pass"], _ = timeit(lambda: per_view(0))
    plain = model.VAEResBlock.forward
    model.VAEResBlock.forward = fused_forward
    try:
        rows["RMS-norm + SiLU fused (torch.compile)"], out = timeit(per_view)
        set_conv_layout(vae, torch.channels_last_3d)
        rows["fused + channels_last_3d"], _ = timeit(per_view)
    finally:
        model.VAEResBlock.forward = plain
    rows["channels_last_3d"], _ = timeit(per_view)
    set_conv_layout(vae, torch.contiguous_format)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; fused vs default: relative difference "
          f"{((out - ref).norm() / ref.norm()).item():.1e}\n")
    print("| variant | seconds for 5 views |\n|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec:.3f} |")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        per_view()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=90))


if __name__ == "__main__":
    main()
