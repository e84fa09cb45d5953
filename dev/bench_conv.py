"""conv.py's Triton 3x3x3 convolution against cuDNN at the Wan2.1 encoder's shapes (480p, 16-frame chunk).

    python dev/bench_conv.py                  # kernel table: TFLOP/s of ours and cuDNN (channels-last), error
    python dev/bench_conv.py --encode cudnn   # the whole compiled encoder on 5 views of 29 x 480 x 848,
    python dev/bench_conv.py --encode triton  #   without / with the kernel (as train.py's compile_vae)

Medians of triton.testing.do_bench; both sides get channels-last bf16 input with the time padding already
in place (as CausalConv3d hands it over) and cuDNN runs with benchmark mode on (train.py sets it).
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conv  # noqa: E402

# (in, out, H, W, frames): the encoder's 3x3x3 layers for a 480x848 view, one 16-frame chunk
SHAPES = [(96, 96, 480, 848, 16), (96, 192, 240, 424, 16), (192, 192, 240, 424, 16), (192, 384, 120, 212, 8),
          (384, 384, 120, 212, 8), (384, 384, 60, 106, 4)]


def kernel_table():
    from triton.testing import do_bench
    torch.backends.cudnn.benchmark = True
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| layer | output T x H x W | ours TFLOP/s | cuDNN TFLOP/s | ours / cuDNN | rel. error ours / cuDNN (vs fp64) |")
    print("|---|---|---|---|---|---|")
    for cin, cout, H, W, T in SHAPES:
        x = torch.randn(1, cin, T + 2, H, W, device="cuda").to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        w = (torch.randn(cout, cin, 3, 3, 3, device="cuda") / math.sqrt(27 * cin)).to(torch.bfloat16)
        b = torch.randn(cout, device="cuda", dtype=torch.bfloat16)
        w_cl = w.contiguous(memory_format=torch.channels_last_3d)
        ours = lambda: conv.conv3d_3x3x3(x, w, b)  # noqa: E731
        cudnn = lambda: conv.reference_conv3d(x, w_cl, b)  # noqa: E731
        ref = conv.reference_conv3d(x[:, :, :3].double(), w.double(), b.double())  # first output frame
        err = [((f()[:, :, :1].double() - ref).abs().max() / ref.abs().max()).item() for f in (ours, cudnn)]
        flops = 2 * T * H * W * cout * cin * 27
        t_ours, t_cudnn = do_bench(ours, rep=300), do_bench(cudnn, rep=300)
        print(f"| {cin} -> {cout} | {T} x {H} x {W} | {flops / t_ours / 1e9:.0f} | {flops / t_cudnn / 1e9:.0f} | "
              f"{t_cudnn / t_ours:.2f}x | {err[0]:.1e} / {err[1]:.1e} |", flush=True)


def encode(which, reps=5):
    """Median seconds of the compiled encoder over 5 views (one call per view, as train.py encodes)."""
    import model
    import train
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    vae = model.WanVAE(**model.VAE_PRESETS["wan2.1"]).cuda().to(torch.bfloat16).eval().requires_grad_(False)
    train.compile_vae(vae)
    if which == "cudnn":
        for m in vae.encoder.modules():
            if isinstance(m, model.CausalConv3d):
                m.use_triton = False
    used = sum(getattr(m, "use_triton", False) for m in vae.encoder.modules())
    video = torch.randint(0, 256, (5, 3, 29, 480, 848), dtype=torch.uint8, device="cuda")
    run = lambda: [vae.encode(video[i:i + 1]) for i in range(5)]  # noqa: E731
    run()  # compile, autotune
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"encode 5 views x 29 x 480 x 848, compiled, {which} ({used} layers on the kernel): "
          f"median {statistics.median(times):.3f} s ({' '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encode", choices=["cudnn", "triton"], help="time the whole compiled encoder instead")
    args = p.parse_args()
    encode(args.encode) if args.encode else kernel_table()
