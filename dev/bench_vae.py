"""Time the Wan2.1 VAE on one 29 x 704 x 1280 view (bf16, random weights) and print a markdown table.

    python dev/bench_vae.py                   # on a CUDA GPU: the BENCH.md numbers
    python dev/bench_vae.py --device cpu --dtype float32 --frames 5 --height 64 --width 64 --reps 1  # smoke

Each row: median wall time over --reps runs after one warm-up, peak memory allocated and reserved by
PyTorch during those runs (weights included, about 0.25 GB), and the relative difference of the output
from the first row of its kind (chunk sizes change only float rounding).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VAE_PRESETS, WanVAE  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_conv3d_layout(module, memory_format):
    """Store every Conv3d weight in `memory_format` (same values)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=memory_format)


def benchmark_vae(frames=29, height=704, width=1280, reps=3, device="cuda", dtype=torch.bfloat16,
                  encode_chunks=(16, 4), decode_chunks=(1, 2), channels_last=True):
    """Time encode/decode of one view at each chunk size; returns the rows and prints a markdown table."""
    device = torch.device(device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = WanVAE(**VAE_PRESETS["wan2.1"]).to(device=device, dtype=dtype).eval()
    video = torch.randint(0, 256, (1, 3, frames, height, width), dtype=torch.uint8, device=device)
    latent = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, device=device)
    cases = [(f"encode, chunk {c} frames", lambda c=c: vae.encode(video, chunk=c), "encode")
             for c in encode_chunks]
    cases += [(f"decode, chunk {c} latent frames", lambda c=c: vae.decode(latent, chunk=c), "decode")
              for c in decode_chunks]
    if channels_last:  # cuDNN often prefers NDHWC: conv3d weights in that layout make activations follow
        def with_layout(fn):
            def run():
                set_conv3d_layout(vae, torch.channels_last_3d)
                try:
                    return fn()
                finally:
                    set_conv3d_layout(vae, torch.contiguous_format)
            return run
        base = [cases[0], cases[len(encode_chunks)]]
        cases += [(f"{name}, channels_last_3d", with_layout(fn), kind) for name, fn, kind in base]

    rows, first_out = [], {}
    for name, fn, kind in cases:
        try:
            fn()  # warm-up: cuDNN autotuning, allocator growth
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                reserved = torch.cuda.max_memory_reserved(device) / 2**30
            else:
                peak = reserved = float("nan")
            ref = first_out.setdefault(kind, out)
            diff = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            rows.append((name, statistics.median(times), peak, reserved, diff, tuple(out.shape), ""))
        except Exception as e:  # report and go on with the other rows
            nan = float("nan")
            rows.append((name, nan, nan, nan, nan, (), f"{type(e).__name__}: {e}"))
        finally:
            out = None

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nWan2.1 VAE, 1 view {frames}x{height}x{width}, {str(dtype).replace('torch.', '')}, {gpu}, "
          f"torch {torch.__version__}, median of {reps}\n")
    print("| case | time (s) | peak alloc (GiB) | peak reserved (GiB) | rel. diff vs first | output | error |")
    print("|---|---|---|---|---|---|---|")
    for name, t, peak, reserved, diff, shape, err in rows:
        print(f"| {name} | {t:.3f} | {peak:.2f} | {reserved:.2f} | {diff:.1e} | {list(shape)} | {err[:200]} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=29)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--encode_chunks", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--decode_chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no_channels_last", action="store_true")
    args = parser.parse_args()
    benchmark_vae(args.frames, args.height, args.width, args.reps, args.device, getattr(torch, args.dtype),
                  tuple(args.encode_chunks), tuple(args.decode_chunks), not args.no_channels_last)
