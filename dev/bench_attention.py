"""Benchmark the Triton attention kernels against PyTorch SDPA (cuDNN and flash backends).

Layout [B, S, H, D] as the model calls it (SDPA gets transposed views, no copies), bf16, B=1, H=16,
D=128. FLOPs: forward 4*Nq*Nk*D*H*B, backward 2.5x that. SDPA forward runs with inputs that require
grad (training mode: it must produce the LSE too, as ours does). Backward = autograd.grad alone on a
retained graph, so each side pays its own preprocessing (rowsum(dO*O), dQ accumulator) but no forward.

  python dev/bench_attention.py --out bench_results/attention_kernels.md   # table for BENCH.md
  python dev/bench_attention.py --sweep                                      # per-config numbers
  python dev/bench_attention.py --in-model 480p-5v                           # a training step's own tensors
"""

import argparse
import datetime
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attention as A  # noqa: E402
import triton  # noqa: E402

SIZES = [("self", 7950, 7950), ("self", 17600, 17600), ("self", 24640, 24640), ("self", 63600, 63600),
         ("cross", 28160, 512)]


def timeit(fn, rep_ms=300):
    """Median milliseconds of fn (CUDA events through triton's do_bench)."""
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def inputs(Sq, Sk, H=16, D=128, B=1, dtype=torch.bfloat16):
    """Random q, k, v, dout on the GPU (never zeros: they run faster than real data)."""
    g = torch.Generator(device="cuda").manual_seed(Sq * 7 + Sk)
    mk = lambda S: torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g)
    return mk(Sq), mk(Sk), mk(Sk), mk(Sq)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def bench_impl(name, q, k, v, do):
    """(forward ms, backward ms) of one implementation.

    ours: what attention.py's `triton` backend runs (on sm_90 the Gluon forward and, when the keys fill
    the GPU, the Gluon backward); triton: the plain Triton kernels other GPUs get (forward and backward,
    gluon_available() off); cudnn / flash: SDPA forced to that backend; default:
    SDPA with PyTorch's own choice (what train.py's attention_backend=sdpa runs).
    """
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(name)
    fn = A.flash_attention if name in ("ours", "triton") else sdpa
    if name == "triton":
        gluon_available = A.gluon_available
        A.gluon_available = lambda x=None: False
        try:
            return bench_impl("ours", q, k, v, do)
        finally:
            A.gluon_available = gluon_available
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def run():
        if backend is None:
            return fn(*leaves)
        with sdpa_kernel(backend):
            return fn(*leaves)

    out = run()  # also runs the autotuner on first use
    f_ms = timeit(run)
    b_ms = timeit(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))
    return f_ms, b_ms


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def accuracy_line(q, k, v, do, n=2048):
    """Relative error vs float64 of ours and cuDNN on the first n queries/keys (cheap reference)."""
    q, k, v, do = q[:, :n], k[:, :n], v[:, :n], do[:, :n]
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    ro, rl = A.reference_attention(q64, k64, v64)
    ref = (ro, *A.reference_attention_backward(do64, q64, k64, v64, ro, rl))
    res = {}
    for name in ("ours", "cudnn"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if name == "ours":
            out = A.flash_attention(*leaves)
        else:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = sdpa(*leaves)
        grads = torch.autograd.grad(out, leaves, do)
        res[name] = [rel_err(t, r) for t, r in zip((out, *grads), ref)]
    return res


def main_table(args):
    props = torch.cuda.get_device_properties(0)
    rows = []
    for kind, Sq, Sk in SIZES:
        q, k, v, do = inputs(Sq, Sk)
        flops = 4 * Sq * Sk * 128 * 16
        row = {"kind": kind, "Sq": Sq, "Sk": Sk}
        for name in ("ours", "triton", "cudnn", "default", "flash"):
            try:
                f_ms, b_ms = bench_impl(name, q, k, v, do)
                row[name] = (flops / f_ms / 1e9, 2.5 * flops / b_ms / 1e9, f_ms, b_ms)
            except Exception as e:  # a backend may refuse a shape; say so in the table
                row[name] = None
                print(f"{name} {Sq}x{Sk}: {type(e).__name__}: {str(e)[:200]}")
        row["cfg"] = (str(A._attn_fwd_tuned.best_config), str(A._attn_bwd_tuned.best_config))
        rows.append(row)
        fmt = lambda r, i: f"{r[i]:.0f}" if r else "n/a"
        print(f"{kind:5s} {Sq:>7d} x {Sk:<7d} fwd ours {fmt(row['ours'], 0)} triton {fmt(row['triton'], 0)} "
              f"cudnn {fmt(row['cudnn'], 0)} default {fmt(row['default'], 0)} flash {fmt(row['flash'], 0)} | "
              f"bwd ours {fmt(row['ours'], 1)} cudnn {fmt(row['cudnn'], 1)} default {fmt(row['default'], 1)} "
              f"flash {fmt(row['flash'], 1)}  [{row['cfg'][0]} / {row['cfg'][1]}]", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    acc = accuracy_line(*inputs(4096, 4096))

    lines = ["## Attention kernels (issue 9)", "",
             f"Card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
             f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
             "", "Command: `python dev/bench_attention.py --out bench_results/attention_kernels.md`", "",
             "B=1, H=16, D=128, bf16, layout [B, S, H, D], non-causal. TFLOP/s with forward = 4·Nq·Nk·D·H, "
             "backward = 2.5× forward; medians of CUDA-event timings. SDPA forward in training mode "
             "(inputs require grad). ours = the `triton` backend: on sm_90 the Gluon forward and the Gluon "
             "backward (the Triton backward where the keys give fewer CTAs than SMs: cross-attention); "
             "triton = the plain Triton kernels both ways; default = SDPA's own kernel choice.", "",
             "| shape | Nq × Nk | fwd ours | fwd triton | fwd cuDNN | fwd default | fwd flash | ours/cuDNN "
             "| bwd ours | bwd cuDNN | bwd default | bwd flash | ours/cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda name, i: f"{r[name][i]:.0f}" if r[name] else "n/a"
        ratio = lambda i: f"{r['ours'][i] / r['cudnn'][i]:.2f}×" if r["ours"] and r["cudnn"] else "n/a"
        lines.append(f"| {r['kind']} | {r['Sq']:,} × {r['Sk']:,} | {f('ours', 0)} | {f('triton', 0)} | "
                     f"{f('cudnn', 0)} | {f('default', 0)} | {f('flash', 0)} | {ratio(0)} | {f('ours', 1)} | "
                     f"{f('cudnn', 1)} | {f('default', 1)} | {f('flash', 1)} | {ratio(1)} |")
    lines += ["", "Autotuned configs (forward / backward) per shape:", ""]
    lines += [f"- {r['Sq']:,} × {r['Sk']:,}: {r['cfg'][0]} / {r['cfg'][1]}" for r in rows]
    lines += ["", "Relative error vs float64 (Nq = Nk = 2,048 slice, bf16): out, dq, dk, dv",
              f"- ours:  {', '.join(f'{e:.2e}' for e in acc['ours'])}",
              f"- cuDNN: {', '.join(f'{e:.2e}' for e in acc['cudnn'])}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)


def kernel_report(jit_fn):
    """Registers, spills and tensor-core instruction counts of every compiled variant of jit_fn."""
    out = []
    for cache in jit_fn.device_caches.values():
        for kern in cache[0].values():
            try:
                sass = kern.asm["sass"]
                counts = {op: sass.count(op) for op in ("HGMMA", "HMMA", "UTMALDG", "UTMAREDG", "LDL", "STL")}
            except Exception as e:
                counts = {"sass": f"unavailable ({type(e).__name__})"}
            out.append(f"  {kern.name}: warps={kern.metadata.num_warps} stages={kern.metadata.num_stages} "
                       f"regs={kern.n_regs} spills={kern.n_spills} smem={kern.metadata.shared} {counts}")
    return "\n".join(out)


def sweep(args):
    """Time explicit forward/backward configs at one long and one cross-attention shape."""
    fwd = [(128, 128, 8, 3, False), (128, 64, 8, 3, False)]
    bwd = [(64, 128, 8, 2, True, False), (64, 128, 8, 3, True, False), (64, 128, 8, 2, False, False),
           (64, 128, 8, 3, False, False), (64, 128, 8, 2, True, True), (64, 128, 8, 3, True, True),
           (64, 128, 8, 2, False, True), (64, 128, 8, 3, False, True)]
    for kind, Sq, Sk in [("self", 24640, 24640), ("self", 24640, 24640), ("cross", 28160, 512)]:
        q, k, v, do = inputs(Sq, Sk)
        flops = 4 * Sq * Sk * 128 * 16
        for bm, bn, w, s, ws in fwd:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, WARP_SPEC=ws)
            try:
                t0 = time.time()
                A._triton_forward(q, k, v, config=cfg)
                torch.cuda.synchronize()
                ms = timeit(lambda: A._triton_forward(q, k, v, config=cfg), rep_ms=200)
                print(f"fwd {kind} {cfg}: {flops / ms / 1e9:.0f} TF/s (compile+1st {time.time() - t0:.1f}s)",
                      flush=True)
            except Exception as e:
                print(f"fwd {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        out, lse = A._triton_forward(q, k, v)
        for bm, bn, w, s, tma, early in bwd:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, DQ_TMA=tma, EARLY_DP=early)
            try:
                t0 = time.time()
                A._triton_backward(do, q, k, v, out, lse, config=cfg)
                torch.cuda.synchronize()
                ms = timeit(lambda: A._triton_backward(do, q, k, v, out, lse, config=cfg), rep_ms=200)
                print(f"bwd {kind} {cfg}: {2.5 * flops / ms / 1e9:.0f} TF/s "
                      f"(compile+1st {time.time() - t0:.1f}s)", flush=True)
            except Exception as e:
                print(f"bwd {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print("forward kernels:\n" + kernel_report(A._attn_fwd_kernel))
    print("backward kernels:\n" + kernel_report(A._attn_bwd_kernel))


def capture_training_inputs(setup, min_keys=1024, backend="auto"):
    """(q, k, v, dout) of the first self-attention backward in one bench.py training iteration of `setup`.

    The iteration is bench.py's (random 2B weights, synthetic batch, its memory plan, the given
    attention_backend, eager); attention.attention_backward is wrapped meanwhile to copy the inputs of its
    first self-attention call with at least min_keys keys (backward runs the last block first).
    """
    import bench
    import train

    captured = {}
    backward = A.attention_backward

    def keep_first(dout, q, k, v, out, lse):
        if not captured and q.shape[1] == k.shape[1] >= min_keys:  # self-attention (one sample, no cp)
            captured.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(),
                            do=dout.detach().clone())
        return backward(dout, q, k, v, out, lse)

    A.attention_backward = keep_first
    rank, world, device, created = train.setup_distributed()
    try:
        parallel = train.setup_parallelism(device, world, 1)
        bench.bench_training(setup, backend, bench.MEMORY_PLANS[setup][0], iters=1, warmup=0, device=device,
                             rank=rank, world=world, parallel=parallel)
    finally:
        A.attention_backward = backward
        if created:
            torch.distributed.destroy_process_group()
    if not captured:
        raise RuntimeError(f"{setup}: no self-attention backward with >= {min_keys} keys ran through attention.py")
    return captured["q"], captured["k"], captured["v"], captured["do"]


def in_model(args):
    """Ours and cuDNN on a training step's own q, k, v, dO beside random tensors of the same shape.

    Inside a 480p-5v iteration our backward ran ~7 % below its rate here; this separates the data from
    everything else. Answer (BENCH.md, sixth session): the step's tensors run as fast as random ones.
    """
    captured = capture_training_inputs(args.in_model)
    q = captured[0]
    random_inputs = inputs(q.shape[1], q.shape[1], H=q.shape[2], D=q.shape[3], B=q.shape[0], dtype=q.dtype)
    flops = 4 * q.shape[0] * q.shape[1] ** 2 * q.shape[3] * q.shape[2]
    stats = lambda t: f"std {t.float().std().item():.3g} max|.| {t.float().abs().max().item():.3g} stride {t.stride()}"
    print(f"{args.in_model}: q/k/v/dO {tuple(q.shape)} {q.dtype}; " + "; ".join(
        f"{n} {stats(t)}" for n, t in zip(("q", "k", "v", "dO"), captured)))
    variants = (("training step", captured), ("random", random_inputs),
                ("step q,k + random v,dO", (*captured[:2], *random_inputs[2:])))
    for round_ in range(2):  # two rounds, so drift in the card's clocks shows up as a difference between them
        for name in ("ours", "cudnn"):
            for label, tensors in variants:
                f_ms, b_ms = bench_impl(name, *tensors)
                print(f"round {round_} {name:5s} {label:23s} forward {flops / f_ms / 1e9:4.0f} TFLOP/s   "
                      f"backward {2.5 * flops / b_ms / 1e9:4.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="markdown file for the results table (written atomically)")
    parser.add_argument("--sweep", action="store_true", help="time explicit tile configs instead")
    parser.add_argument("--in-model", metavar="SETUP", help="time the tensors of one bench.py training step of "
                                                           "SETUP (e.g. 480p-5v) beside random ones")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and A.triton_available()):
        sys.exit("bench_attention.py needs a CUDA GPU (Hopper) with Triton")
    if args.in_model:
        in_model(args)
    else:
        sweep(args) if args.sweep else main_table(args)
