"""Triton flash-attention kernels against float64 math.

CPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, so that part runs in a subprocess); fp32 and fp16 only, the interpreter mis-reads bf16.
GPU (skipped without CUDA): bf16 errors must stay within 1.5x of SDPA's on the same inputs, for the
Triton kernels and the Gluon (Hopper) forward and backward. Gluon kernels cannot run in the interpreter;
on CPU they are compiled for sm_90 instead, which checks that they build with the pinned Triton and keep
the properties their speed depends on (wgmma, TMA, setmaxnreg, few or no register spills).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attention  # noqa: E402

# Runs inside the interpreter subprocess; prints one JSON line of relative errors per case.
INTERPRETER_SCRIPT = r"""
import json, sys
import triton.runtime.interpreter as interp

# Triton 3.6's interpreter turns 1-element arrays into ints with int(), which numpy >= 2.4 rejects
# (loop bounds computed from kernel arguments); read the element explicitly instead.
_patch_tensor = interp._patch_lang_tensor
def _patch_tensor_index(tensor, scope):
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patch_tensor_index

import torch
sys.path.insert(0, sys.argv[1])
import attention as A

def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()

torch.manual_seed(0)
cases = [  # (B, Sq, Sk, H, D, dtype, query split of the backward)
    (2, 70, 45, 2, 64, torch.float32, None),    # ragged tails, batch rows crossing tiles
    (1, 100, 77, 1, 128, torch.float16, 2),     # D=128, fp16, backward split over query chunks
    (1, 64, 32, 2, 64, torch.float16, None),    # exact tile multiples
    (1, 130, 20, 1, 64, torch.float32, 3),      # fewer keys than one tile (cross-attention shape)
]
for B, Sq, Sk, H, D, dt, split in cases:
    q, do = (torch.randn(B, Sq, H, D, dtype=dt) for _ in range(2))
    k, v = (torch.randn(B, Sk, H, D, dtype=dt) for _ in range(2))
    out, lse = A._triton_forward(q, k, v)
    # the second case takes the other backward schedule (dP issued right after S)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, DQ_TMA=False, EARLY_DP=True) if D == 128 else None
    grads = A._triton_backward(do, q, k, v, out, lse, config=cfg, q_split=split)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    ref_out, ref_lse = A.reference_attention(q64, k64, v64)
    ref_grads = A.reference_attention_backward(do64, q64, k64, v64, ref_out, ref_lse)
    errs = {"out": rel(out, ref_out), "lse": rel(lse, ref_lse)}
    errs.update({n: rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    print(json.dumps({"case": [B, Sq, Sk, H, D, str(dt)], "lse_dtype": str(lse.dtype),
                      "lse_shape": list(lse.shape), "errs": errs}))

# The autograd Function and the public primitives route through the kernels under the interpreter.
q, k, v = (torch.randn(1, 50, 2, 64, requires_grad=True) for _ in range(3))
out = A.flash_attention(q, k, v)
out.backward(torch.ones_like(out))
q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
ref = A.reference_attention(q64, k64, v64)[0]
ref.backward(torch.ones_like(ref))
errs = {"out": rel(out.detach(), ref.detach())}
errs.update({n: rel(t.grad, r.grad) for n, t, r in zip(("dq", "dk", "dv"), (q, k, v), (q64, k64, v64))})
print(json.dumps({"case": "autograd", "errs": errs}))

# The backward's preprocessing with padded rows (what the Gluon backward's loader reads by TMA):
# delta = rowsum(dO * O) and lse in log2 units for the Sq real rows; +inf and 0 in the padding.
B, Sq, H, D, Sq_pad = 2, 70, 3, 64, 128
o, do = (torch.randn(B, Sq, H, D) for _ in range(2))
lse = torch.randn(B, H, Sq)
delta, lse2 = (torch.full((B * H, Sq_pad), 7.0) for _ in range(2))
A._attn_bwd_prep_kernel[(Sq_pad // 64, B * H)](o, do, lse, delta, lse2, H, Sq, Sq_pad, o.stride(1), do.stride(1),
                                              HEAD_DIM=D, BLOCK_M=64)
ref_delta = (o.double() * do.double()).sum(-1).transpose(1, 2).reshape(B * H, Sq)
ref_lse2 = lse.double().reshape(B * H, Sq) * 1.4426950408889634
print(json.dumps({"case": "prep", "delta": (delta[:, :Sq].double() - ref_delta).abs().max().item(),
                  "lse2": (lse2[:, :Sq].double() - ref_lse2).abs().max().item(),
                  "pad_delta_zero": bool((delta[:, Sq:] == 0).all()),
                  "pad_lse_inf": bool(torch.isinf(lse2[:, Sq:]).all() and (lse2[:, Sq:] > 0).all())}))
"""

# fp32 math in the kernels lands far below 1e-5; fp16 operands (p and dS rounded to fp16) near 3e-4.
TOLERANCE = {"torch.float32": 1e-5, "torch.float16": 2e-3}


def test_kernels_in_interpreter_match_float64():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 6, proc.stdout
    prep = results.pop()
    assert prep["delta"] < 1e-4 and prep["lse2"] < 1e-5, prep
    assert prep["pad_delta_zero"] and prep["pad_lse_inf"], prep
    for res in results[:-1]:
        B, Sq, Sk, H, D, dt = res["case"]
        assert res["lse_dtype"] == "torch.float32" and res["lse_shape"] == [B, H, Sq]
        for name, err in res["errs"].items():
            assert err < TOLERANCE[dt], (res["case"], name, err)
    for name, err in results[-1]["errs"].items():
        assert err < TOLERANCE["torch.float32"], ("autograd", name, err)


def test_cpu_fallback_matches_reference_gradients():
    """Off CUDA the primitives are the reference math; the autograd wrapper must still be right."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 9, 3, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention.attention_forward(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 9)
    torch.testing.assert_close(lse.double(), torch.logsumexp(
        torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, dim=-1), rtol=1e-6, atol=1e-6)
    g = torch.randn(2, 9, 3, 16, dtype=torch.float64)
    grads = torch.autograd.grad(attention.flash_attention(q, k, v), (q, k, v), g)
    # independent route: autograd through the plain softmax formula
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):  # the saved lse is fp32 by contract: ~1e-7 relative
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    q = torch.zeros(1, 8, 2, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dims"):
        attention._check_inputs(q, q, q)
    with pytest.raises(ValueError, match="batch, heads or head dim"):
        attention._check_inputs(q[..., :64], torch.zeros(1, 8, 3, 64, dtype=torch.bfloat16),
                                torch.zeros(1, 8, 3, 64, dtype=torch.bfloat16))


def _sdpa(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,Sq,Sk,H,D", [(2, 1000, 1000, 4, 128), (1, 1531, 1531, 2, 64),
                                         (1, 2200, 512, 4, 128), (1, 300, 4099, 2, 128)])
@pytest.mark.parametrize("forward,backward", [("gluon", "gluon"), ("gluon", "triton"), ("triton", "triton"),
                                              ("gluon", "cudnn")])
def test_gpu_bf16_within_sdpa_error(B, Sq, Sk, H, D, forward, backward, monkeypatch):
    assert attention.triton_available()
    if forward == "gluon" and not attention.gluon_available():
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    if forward == "triton":  # what non-Hopper GPUs run
        monkeypatch.setattr(attention, "gluon_available", lambda x=None: False)
    monkeypatch.setattr(attention, "_GLUON_FWD_MIN_KEYS", 0)  # the Gluon forward for short keys too
    # The Gluon backward at any size here (in training it waits for enough key tiles to fill the GPU).
    monkeypatch.setattr(attention, "_gluon_backward_suits",
                        lambda q, k: backward == "gluon" and attention.gluon_backward_available(q))
    torch.manual_seed(2)
    dev = "cuda"
    q, do = (torch.randn(B, Sq, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, Sk, H, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    ref_out, ref_lse = attention.reference_attention(q64, k64, v64)
    ref = (ref_out, *attention.reference_attention_backward(do64, q64, k64, v64, ref_out, ref_lse))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(do)
        return (out.detach(), *(t.grad for t in leaves))

    ours = run(lambda *qkv: attention.flash_attention(*qkv, cudnn_backward=backward == "cudnn"))
    theirs = run(_sdpa)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert torch.isfinite(a).all(), name
        err_ours = ((a.double() - r).norm() / r.norm()).item()
        err_sdpa = ((b.double() - r).norm() / r.norm()).item()
        assert err_ours <= 1.5 * err_sdpa, (name, err_ours, err_sdpa)
    _, lse = attention.attention_forward(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3
    # the model's entry point runs the same kernels (backend triton; auto may pick SDPA for short keys)
    torch.testing.assert_close(attention.attention(q, k, v, backend="triton"), ours[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "triton", "triton-cudnn"])
def test_gpu_backends_compile_without_graph_breaks(backend):
    """Deciding the backend inside a compiled, selectively checkpointed block (as train.py runs the DiT
    blocks; device queries included) keeps one graph: fullgraph raises at a break."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    attention.set_backend(backend)
    try:
        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.PREFER_RECOMPUTE

        def context_fn():  # a plain function, as train.py's (torch.compile traces it)
            return create_selective_checkpoint_contexts(policy)

        # self-attention with enough key tiles for the Gluon backward (auto: ours), cross with 512 (auto: SDPA)
        q, k, v = (torch.randn(1, 4096, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        kc, vc = (torch.randn(1, 512, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        assert attention.resolve_backend(q, k=k) == ("triton" if backend == "auto" else backend)

        def block(q, k, v):
            x = attention.attention(q, k, v)
            return attention.attention(x, kc, vc).float().square().sum()

        fn = torch.compile(lambda q, k, v: checkpoint(block, q, k, v, use_reentrant=False,
                                                      context_fn=context_fn), fullgraph=True)
        torch.autograd.grad(fn(q, k, v), (q, k, v))
    finally:
        attention.set_backend("auto")


def _compile_for_hopper(fn, signature, const, tmp_path):
    """Compile a Gluon kernel for sm_90a on the CPU: (compiled kernel, PTX, ptxas -v report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    const = dict(const, BAR_N=triton.next_power_of_2(const["NUM_BUF"]))
    signature = dict(signature, **{name: "constexpr" for name in const})
    src = GluonASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    ptx = compiled.asm["ptx"]
    (tmp_path / "k.ptx").write_text(ptx)
    info = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"),
                           "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    return compiled, ptx, info


@pytest.mark.skipif(not attention._HAVE_GLUON, reason="needs Triton with Gluon")
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_forward_compiles_for_hopper(D, tmp_path):
    from triton.runtime.jit import mangle_type

    cfg = attention.GLUON_FWD_CONFIG
    x = torch.zeros(1, 256, 2, D, dtype=torch.bfloat16)  # descriptors only need shapes and strides
    dq, dk = attention._gl_desc(x, cfg["BLOCK_M"]), attention._gl_desc(x, cfg["BLOCK_N"])
    signature = dict(desc_q=mangle_type(dq), desc_k=mangle_type(dk), desc_v=mangle_type(dk),
                     desc_o=mangle_type(dq), Lse="*fp32", H="i32", Sq="i32", Sk="i32", qk_scale="fp32")
    const = dict(HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], NUM_BUF=cfg["NUM_BUF"])
    compiled, ptx, info = _compile_for_hopper(attention._gl_attn_fwd_kernel, signature, const, tmp_path)
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)  # the consumers' registers
    assert compiled.metadata.num_warps == 12  # 2 consumer warpgroups + the producer's warpgroup
    assert compiled.metadata.shared <= 227 * 1024
    assert "0 bytes spill stores" in info, info


@pytest.mark.skipif(not attention._HAVE_GLUON_BWD, reason="needs Triton with Gluon and the TMA reduce op")
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_backward_compiles_for_hopper(D, tmp_path):
    """The warp-specialised backward builds for sm_90a with the Hopper paths its speed depends on."""
    from triton.runtime.jit import mangle_type

    cfg = attention.GLUON_BWD_CONFIG
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    x = torch.zeros(1, 256, 2, D, dtype=torch.bfloat16)  # descriptors only need shapes and strides
    dm, dn = mangle_type(attention._gl_desc(x, bm)), mangle_type(attention._gl_desc(x, bn))
    dq = mangle_type(attention._gl_dq_tiles_desc(torch.zeros(4096, 128), D))  # thread-major dQ tiles
    vec = mangle_type(attention._gl_vec_desc(torch.zeros(512), bm))
    signature = dict(desc_q=dm, desc_do=dm, desc_k=dn, desc_v=dn, desc_dk=dn, desc_dv=dn, desc_dq=dq,
                     desc_lse=vec, desc_delta=vec, H="i32", Sq="i32", Sq_pad="i32", qk_scale="fp32",
                     sm_scale="fp32")
    const = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, NUM_BUF=cfg["NUM_BUF"])
    compiled, ptx, info = _compile_for_hopper(attention._gl_attn_bwd_kernel, signature, const, tmp_path)
    assert ptx.count("wgmma.mma_async") >= 10  # S^T, dP^T, dV, dK, dQ in both warpgroups
    # dV and dK take P^T and dS^T from registers (wgmma's A operand): no shared-memory round trip
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.(bf16|f16)\.(bf16|f16)\s+\{[^}]*\},\s*\{", ptx)
    assert "cp.async.bulk.tensor" in ptx and "cp.reduce.async.bulk.tensor" in ptx  # TMA loads, dQ reduce-add
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)
    assert compiled.metadata.num_warps == 12
    assert compiled.metadata.shared <= 227 * 1024
    # The consumers spill a few registers at D=128 (132 bytes with Triton 3.6; BENCH.md); much more than
    # that costs speed (a variant with 576 bytes ran at 0.7x).
    spilled = re.search(r"(\d+) bytes spill stores", info)
    assert spilled is None or int(spilled.group(1)) <= 256, info


def test_flash_attention_is_saved_by_selective_checkpointing():
    """The custom op is visible to selective checkpointing: kept, not recomputed, same gradients."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    calls = []
    forward = attention.attention_forward

    def counting_forward(*args):
        calls.append(1)
        return forward(*args)

    def keep_attention(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if "flash_attention" in str(op) else CheckpointPolicy.PREFER_RECOMPUTE

    q, k, v = (torch.randn(1, 20, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: attention.flash_attention(q * 2, k, v).sin()  # noqa: E731
    ref = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))
    attention.attention_forward = counting_forward
    try:
        context_fn = functools.partial(create_selective_checkpoint_contexts, keep_attention)
        out = checkpoint(fn, q, k, v, use_reentrant=False, context_fn=context_fn)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    finally:
        attention.attention_forward = forward
    assert len(calls) == 1  # forward only: the backward reused the saved output
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_primitives_in_query_blocks_match_float64(monkeypatch, dtype):
    """The non-kernel primitives (ring attention on CPU/fp32/other GPUs) work a block of queries at a time."""
    monkeypatch.setattr(attention, "_FALLBACK_QUERY_BLOCK", 7)  # 30 queries: 5 blocks, ragged last one
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 30, 3, 16, generator=g, dtype=torch.float64) for _ in range(4))
    out_ref, lse_ref = attention.reference_attention(q, k, v)
    grads_ref = attention.reference_attention_backward(dout, q, k, v, out_ref, lse_ref)
    out, lse = attention.attention_forward(q.to(dtype), k.to(dtype), v.to(dtype))
    grads = attention.attention_backward(dout.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), out, lse)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: rounding of the inputs and outputs only
    assert out.dtype == dtype and lse.dtype == torch.float32
    for got, want in ((out, out_ref), (lse, lse_ref), *zip(grads, grads_ref)):
        assert got.shape == want.shape
        assert ((got.double() - want).norm() / want.norm()).item() < tol


def _dq_to_thread_major(dq, D):
    """Mirror of the Gluon kernel's _gl_dq_thread_major + tile addressing, in torch: [B,S,H,D] -> tiles."""
    B, S, H, _ = dq.shape
    nt = -(-S // 64)
    padded = torch.zeros(B, nt * 64, H, D, dtype=dq.dtype)
    padded[:, :S] = dq
    tiles = torch.empty(B, H, nt, 2, D // 4, 128, dtype=dq.dtype)
    for b in range(B):
        for h in range(H):
            for j in range(nt):
                for w in range(2):
                    tile = padded[b, j * 64:(j + 1) * 64, h, w * D // 2:(w + 1) * D // 2]  # [64, D/2]
                    x = tile.reshape(4, 2, 8, D // 16, 4, 2).permute(3, 1, 5, 0, 2, 4)
                    tiles[b, h, j, w] = x.reshape(D // 4, 128)
    return tiles.reshape(-1, 128)


@pytest.mark.parametrize("B,S,H,D", [(1, 200, 2, 128), (2, 130, 3, 64), (2, 128, 1, 128)])
def test_dq_thread_major_tiles_round_trip(B, S, H, D):
    """The Gluon backward's dQ tile layout (slot x thread) maps back to [B, S, H, D] exactly."""
    dq = torch.randn(B, S, H, D)
    back = attention._dq_from_thread_major(_dq_to_thread_major(dq, D), B, H, S, D, torch.float32)
    assert back.shape == dq.shape and back.is_contiguous()
    assert torch.equal(back, dq)


def test_auto_backend_rule(monkeypatch):
    """auto: our kernels both ways where the Gluon backward suits (self-attention on Hopper), SDPA (cuDNN)
    for the short key sets of cross-attention, triton-cudnn on other GPUs with Triton, SDPA without."""
    class Q:
        is_cuda, dtype, shape = True, torch.bfloat16, (1, 4096, 16, 128)

    monkeypatch.setattr(attention, "triton_available", lambda: True)
    monkeypatch.setattr(attention, "gluon_backward_available", lambda x=None: True)
    monkeypatch.setattr(attention, "_gluon_backward_suits", lambda q, k: k.shape[1] >= 1024)
    self_k, cross_k = torch.zeros(1, 4096, 16, 128), torch.zeros(1, 512, 16, 128)
    assert attention.resolve_backend(Q(), "auto", self_k) == "triton"
    assert attention.resolve_backend(Q(), "auto") == "triton"  # keys default to the queries' length
    assert attention.resolve_backend(Q(), "auto", cross_k) == "sdpa"
    assert attention.resolve_backend(Q(), "triton-cudnn", cross_k) == "triton-cudnn"  # explicit choices stay
    monkeypatch.setattr(attention, "gluon_backward_available", lambda x=None: False)
    assert attention.resolve_backend(Q(), "auto", self_k) == "triton-cudnn"
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert attention.resolve_backend(Q(), "auto", self_k) == "sdpa"


def test_backward_dispatch_gluon_only_where_the_keys_fill_the_gpu(monkeypatch):
    """attention_backward: the Gluon kernel when there are >= one CTA of 128 keys per SM, else Triton's."""
    monkeypatch.setattr(attention, "gluon_backward_available", lambda x=None: True)
    monkeypatch.setattr(attention, "_device_facts", lambda index=None: ((9, 0), 132))
    monkeypatch.setattr(attention, "GLUON_BWD_CONFIG", dict(BLOCK_M=64, BLOCK_N=64, NUM_BUF=2), raising=False)
    q = torch.zeros(1, 63600, 16, 128)
    suits = lambda sk, heads=16: attention._gluon_backward_suits(q[:, :, :heads], torch.zeros(1, sk, heads, 128))  # noqa: E731
    assert suits(63600) and suits(1100)  # 497 and 9 x 16 = 144 CTAs
    assert not suits(512) and not suits(1000)  # cross-attention: 4 x 16 = 64; 8 x 16 = 128 < 132
    assert suits(17000, heads=1) and not suits(16000, heads=1)  # 133 vs 125 CTAs
    calls = []
    monkeypatch.setattr(attention, "_use_kernels", lambda x: True)
    monkeypatch.setattr(attention, "_gluon_backward", lambda *a: calls.append("gluon") or a[1:4])
    monkeypatch.setattr(attention, "_triton_backward", lambda *a: calls.append("triton") or a[1:4])
    x = torch.zeros(1, 4, 16, 128)
    for sk in (63600, 512):
        k = torch.zeros(1, sk, 16, 128)
        attention.attention_backward(x, x, k, k, x, torch.zeros(1, 16, 4))
    assert calls == ["gluon", "triton"]
