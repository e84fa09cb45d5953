"""Attention for the multiview DiT: one entry point, a float64 reference, Triton kernels, ring attention.

Layout everywhere is the model's own: q, k, v are [B, S, H, D] (no transposes around the call).
The softmax scale is 1/sqrt(D) and there is never a mask (the DiT attends to every token).

Sections, in reading order:
  1. entry point      attention(q, k, v): what model.py calls
  2. reference        plain PyTorch math returning (out, lse), and its backward; float64 in tests
  3. triton kernels   flash-attention forward/backward for CUDA (Hopper-tuned)
  3b. gluon forward   the warp-specialised Hopper forward (producer warp + ping-pong warpgroups)
  3c. gluon backward  the warp-specialised Hopper backward (loader and dQ-writer warps + 2 warpgroups)
  4. ring attention   context parallelism over a process group, merging partials through the LSE
"""

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# 1. Entry point
# ---------------------------------------------------------------------------------------------------

# triton: our kernels both ways; triton-cudnn: our forward with cuDNN's backward, fed our out and lse.
# auto picks the fastest measured (BENCH.md): on Hopper our kernels for self-attention (Gluon forward
# 1.07-1.18x and backward 1.02-1.11x cuDNN's) and SDPA (cuDNN) for cross-attention's 512 keys, where our
# kernels are 0.65x / 0.88x; on other GPUs with Triton triton-cudnn; SDPA elsewhere.
BACKENDS = ("auto", "sdpa", "triton", "triton-cudnn", "reference")
_backend = "auto"


def set_backend(name):
    """Choose the attention implementation globally (one of BACKENDS)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name
    if torch.cuda.is_available() and not _INTERPRET:  # before any compile: see _DEVICE_FACTS
        triton_available()
        for index in range(torch.cuda.device_count()):
            _device_facts(index)


def resolve_backend(q, backend=None, k=None):
    """The backend that runs for q (and keys k, default q's length): `backend` (default: the global
    one) with 'auto' decided."""
    backend = backend or _backend
    if backend == "auto":
        kernel_ok = q.shape[-1] in KERNEL_HEAD_DIMS and q.dtype in (torch.bfloat16, torch.float16)
        if not (q.is_cuda and kernel_ok and triton_available()):
            backend = "sdpa"
        elif gluon_backward_available(q):
            backend = "triton" if _gluon_backward_suits(q, q if k is None else k) else "sdpa"
        else:
            backend = "triton-cudnn"
    return backend


def attention(q, k, v, backend=None):
    """Non-causal softmax attention on [B, S, H, D] tensors; returns [B, S_q, H, D]."""
    backend = resolve_backend(q, backend, k)
    if backend == "sdpa":
        # SDPA wants [B, H, S, D]; the transposes are views, SDPA handles the strides.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend in ("triton", "triton-cudnn"):
        return flash_attention(q, k, v, cudnn_backward=backend == "triton-cudnn")
    if backend == "reference":
        return reference_attention(q, k, v)[0]
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------
# 2. Reference implementation (any dtype; the tests run it in float64)
# ---------------------------------------------------------------------------------------------------


def reference_attention(q, k, v):
    """Softmax attention in the inputs' dtype; returns (out [B,Sq,H,D], lse [B,H,Sq] natural log)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores_BHQK = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse_BHQ = torch.logsumexp(scores_BHQK, dim=-1)
    probs_BHQK = torch.exp(scores_BHQK - lse_BHQ[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs_BHQK, v)
    return out, lse_BHQ


def reference_attention_backward(dout, q, k, v, out, lse):
    """Gradients (dq, dk, dv) of reference_attention given the saved out and lse."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores_BHQK = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs_BHQK = torch.exp(scores_BHQK - lse[..., None])
    dv = torch.einsum("bhqk,bqhd->bkhd", probs_BHQK, dout)
    dprobs_BHQK = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    delta_BHQ = (dout * out).sum(-1).transpose(1, 2)  # rowsum(dO * O), [B, H, Sq]
    dscores_BHQK = probs_BHQK * (dprobs_BHQK - delta_BHQ[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores_BHQK, k)
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores_BHQK, q)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# 3. Triton kernels (FlashAttention-2 tiling, tuned for Hopper; the reference math stands in elsewhere)
# ---------------------------------------------------------------------------------------------------
# How the kernels see the data: q, k, v, out, dout stay [B, S, H, D]; with heads packed (stride D)
# that is a 2-D matrix [B*S, H*D] whose row stride is the token stride, and head h of batch b is the
# column block h*D of rows b*S .. b*S+S-1. TMA tensor descriptors over that 2-D view load [rows, D]
# tiles straight into shared memory, so nothing is transposed or copied around the call.
# Ragged tails: a tile may run past S into the next batch element (or past the end, which TMA fills
# with zeros). Forward: keys >= S_k are masked to -inf in the last key tile and out/lse are stored for
# rows < S_q only. Backward: query rows >= S_q get lse = +inf, so their probabilities are exactly 0 and
# they add nothing to dK, dV (and exactly 0 to the dQ rows they overlap); keys >= S_k get probability 0.
# The softmax runs in base 2: scores are scaled by log2(e)/sqrt(D) once and exp2 is one MUFU op.
# Backward = FA2 schedule: one program per key tile walks the query tiles, keeps dK, dV in registers
# and adds its share of dQ into an fp32 buffer (fp32 atomics or TMA reduce-add): 5 matmuls per tile pair.

import os

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAVE_TRITON = True
except ImportError:  # the kernels are optional: everything falls back to the reference / SDPA
    _HAVE_TRITON = False

try:  # Gluon: Triton's lower-level dialect (explicit warps, barriers, wgmma), for the Hopper forward
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    _HAVE_GLUON = True
except ImportError:
    _HAVE_GLUON = False

try:  # the Gluon backward's dQ: Triton 3.6 has the TMA reduce op in its IR builder, not a Gluon wrapper yet
    from triton._C.libtriton import ir as _triton_ir
    from triton.experimental.gluon.language._core import builtin as _gluon_builtin

    _HAVE_GLUON_BWD = _HAVE_GLUON and hasattr(_triton_ir, "DESCRIPTOR_REDUCE_KIND")
except ImportError:
    _HAVE_GLUON_BWD = False

# TRITON_INTERPRET=1 runs the kernels on CPU tensors through Triton's interpreter (the CPU tests).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_HEAD_DIMS = (64, 128)
_triton_ok = None

if _HAVE_TRITON:

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, kv_row, col, n_lo, n_hi, Sk, qk_scale,
                   BLOCK_N: tl.constexpr, MASK_K: tl.constexpr, WARP_SPEC: tl.constexpr):
        """Online softmax over key tiles [n_lo, n_hi); m_i is the running max in log2 units."""
        for start_n in tl.range(n_lo, n_hi, BLOCK_N, warp_specialize=WARP_SPEC):
            k = desc_k.load([kv_row + start_n, col])  # [BN, D]
            s = tl.dot(q, tl.trans(k))  # [BM, BN] raw q.k in fp32
            if MASK_K:  # only the last, partial key tile pays for the mask
                offs_n = start_n + tl.arange(0, BLOCK_N)
                s = tl.where(offs_n[None, :] < Sk, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = desc_v.load([kv_row + start_n, col])  # [BN, D]
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(desc_q, desc_k, desc_v, desc_o, Out, Lse, H, Sq, Sk, qk_scale, tune_key,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         WARP_SPEC: tl.constexpr):
        """One program = BLOCK_M queries of one (batch, head); writes out and lse (natural log)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)  # consecutive programs share (b, h): K/V tiles stay in L2
        b = pid_bh // H
        col = (pid_bh % H) * HEAD_DIM
        q_row = b * Sq + pid_m * BLOCK_M
        kv_row = b * Sk
        q = desc_q.load([q_row, col])  # [BM, D], stays in shared memory
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (Sk // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, kv_row, col, 0, n_full, Sk,
                                   qk_scale, BLOCK_N, False, WARP_SPEC)
        if n_full < Sk:
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, desc_k, desc_v, kv_row, col, n_full, Sk, Sk,
                                       qk_scale, BLOCK_N, True, False)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
        tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
        out = (acc / l_i[:, None]).to(q.dtype)
        if (pid_m + 1) * BLOCK_M <= Sq:
            desc_o.store([q_row, col], out)
        else:  # ragged tail: a TMA store would spill into the next batch element's rows
            offs_d = tl.arange(0, HEAD_DIM)
            rows = (b * Sq + offs_m).to(tl.int64)
            tl.store(Out + rows[:, None] * (H * HEAD_DIM) + col + offs_d[None, :], out,
                     mask=offs_m[:, None] < Sq)

    @triton.jit
    def _attn_bwd_prep_kernel(Out, DOut, Lse, Delta, Lse2, H, Sq, Sq_pad, stride_o, stride_do,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """Delta = rowsum(dO * O) and lse in log2 units, both [B*H, Sq_pad] fp32.

        Rows Sq .. Sq_pad-1 (padding the Gluon backward loads by TMA) get lse +inf and delta 0.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        col = (pid_bh % H) * HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_m < Sq
        rows = (b * Sq + offs_m).to(tl.int64)
        o = tl.load(Out + rows[:, None] * stride_o + col + offs_d[None, :], mask=valid[:, None], other=0.0)
        do = tl.load(DOut + rows[:, None] * stride_do + col + offs_d[None, :], mask=valid[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + offs_m, mask=valid, other=float("inf"))
        base = pid_bh.to(tl.int64) * Sq_pad
        tl.store(Delta + base + offs_m, delta, mask=offs_m < Sq_pad)
        tl.store(Lse2 + base + offs_m, lse * 1.4426950408889634, mask=offs_m < Sq_pad)

    @triton.jit
    def _attn_bwd_kernel(desc_q, desc_k, desc_v, desc_do, desc_dq, DQacc, DK, DV, Lse2, Delta,
                         H, Sq, Sk, qk_scale, sm_scale, q_chunk, split_stride, tune_key,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DQ_TMA: tl.constexpr, EARLY_DP: tl.constexpr):
        """One program = one key tile of one (batch, head) over one chunk of the queries.

        The transposed FA2 backward: S^T = K Q^T and P^T, so dK and dV accumulate in registers as
        [BN, D] and each query tile's share of dQ = dS K goes out as an fp32 reduce-add.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)  # query chunk: > 1 only when there are too few key tiles (cross-attn)
        b = pid_bh // H
        col = (pid_bh % H) * HEAD_DIM
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # desc_k is 3-D [B, S_k, H*D]: TMA zero-fills keys past S_k of this batch element, so their
        # dQ share is exactly 0; their own dK/dV rows are computed but never stored.
        k = desc_k.load([b, start_n, col]).reshape(BLOCK_N, HEAD_DIM)  # [BN, D]
        v = desc_v.load([b * Sk + start_n, col])
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        bh_base = pid_bh.to(tl.int64) * Sq
        q_row0 = b * Sq
        m_lo = pid_s * q_chunk
        m_hi = tl.minimum(m_lo + q_chunk, Sq)
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = desc_q.load([q_row0 + start_m, col])  # [BM, D]
            do = desc_do.load([q_row0 + start_m, col])  # [BM, D]
            lse2 = tl.load(Lse2 + bh_base + offs_m, mask=offs_m < Sq, other=float("inf"))
            delta = tl.load(Delta + bh_base + offs_m, mask=offs_m < Sq, other=0.0)
            sT = tl.dot(k, tl.trans(q))  # [BN, BM]
            if EARLY_DP:
                dpT = tl.dot(v, tl.trans(do))  # [BN, BM]
            pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
            dv = tl.dot(pT.to(do.dtype), do, dv)
            if not EARLY_DP:
                dpT = tl.dot(v, tl.trans(do))  # [BN, BM]
            dsT = (pT * (dpT - delta[None, :])).to(q.dtype)  # dS^T without the softmax scale
            dk = tl.dot(dsT, q, dk)
            dq = tl.dot(tl.trans(dsT), k)  # [BM, D] share of dQ from this key tile
            if DQ_TMA:
                desc_dq.atomic_add([q_row0 + start_m, col], dq)
            else:
                rows = (q_row0 + offs_m).to(tl.int64)
                ptrs = DQacc + rows[:, None] * (H * HEAD_DIM) + col + tl.arange(0, HEAD_DIM)[None, :]
                tl.atomic_add(ptrs, dq, mask=offs_m[:, None] < Sq, sem="relaxed")
        rows = (b * Sk + offs_n).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        offs = pid_s.to(tl.int64) * split_stride + rows[:, None] * (H * HEAD_DIM) + col + offs_d[None, :]
        tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < Sk)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < Sk)

    def _fwd_blocks(nargs):
        """Autotune pre-hook: give the TMA descriptors the tile shapes of the chosen config."""
        d = nargs["HEAD_DIM"]
        nargs["desc_q"].block_shape = nargs["desc_o"].block_shape = [nargs["BLOCK_M"], d]
        nargs["desc_k"].block_shape = nargs["desc_v"].block_shape = [nargs["BLOCK_N"], d]

    def _bwd_blocks(nargs):
        """Autotune pre-hook for the backward's descriptors."""
        d = nargs["HEAD_DIM"]
        nargs["desc_q"].block_shape = nargs["desc_do"].block_shape = [nargs["BLOCK_M"], d]
        nargs["desc_dq"].block_shape = [nargs["BLOCK_M"], d]
        nargs["desc_k"].block_shape = [1, nargs["BLOCK_N"], d]
        nargs["desc_v"].block_shape = [nargs["BLOCK_N"], d]

    def _fwd_config(bm, bn, warps, stages, ws=False):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_warps=warps,
                             num_stages=stages, pre_hook=_fwd_blocks)

    def _bwd_config(bm, bn, warps, stages, dq_tma=True, early_dp=False):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "DQ_TMA": dq_tma, "EARLY_DP": early_dp}
        return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=_bwd_blocks)

    # A handful of Hopper candidates each (tuning takes seconds); the interpreter gets one small tile
    # so the CPU tests cross several tiles and ragged tails at tiny sequence lengths.
    if _INTERPRET:
        FWD_CONFIGS = [_fwd_config(32, 16, 4, 1)]
        BWD_CONFIGS = [_bwd_config(16, 32, 4, 1, dq_tma=False)]  # no TMA reduce in the interpreter
    else:
        FWD_CONFIGS = [_fwd_config(128, 128, 8, 2), _fwd_config(128, 128, 8, 3),
                       _fwd_config(128, 64, 8, 3), _fwd_config(128, 64, 8, 4)]
        # Backward knobs: dQ through fp32 atomics or TMA reduce-add (DQ_TMA); S and dP back to back,
        # FA3 order (EARLY_DP), or dP after dV. Measured on an H100 at 24,640 tokens: atomics, dP after
        # dV, 3 stages ~395 TF/s; the others 350-370 (the TMA reduce's staging buffer costs a pipeline
        # stage of shared memory), so only the leaders stay in the tuning list.
        BWD_CONFIGS = [_bwd_config(64, 128, 8, s, dq_tma=t) for s, t in ((3, False), (2, False), (3, True))]

    def _quick_bench(fn, quantiles):
        """Short timing for the autotuner: a few calls of a few-ms kernel, so tuning takes seconds."""
        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=quantiles)

    _attn_fwd_tuned = triton.autotune(FWD_CONFIGS, key=["HEAD_DIM", "tune_key"], do_bench=_quick_bench)(
        _attn_fwd_kernel)
    _attn_bwd_tuned = triton.autotune(BWD_CONFIGS, key=["HEAD_DIM", "tune_key"], do_bench=_quick_bench,
                                      reset_to_zero=["DQacc"])(_attn_bwd_kernel)


# ---------------------------------------------------------------------------------------------------
# 3b. Hopper forward in Gluon (warp-specialised, FlashAttention-3 schedule)
# ---------------------------------------------------------------------------------------------------
# Plain Triton runs the forward as one 8-warp CTA per SM: the tensor cores idle while those warps do
# the softmax (~0.9x cuDNN). Gluon (Triton's lower-level dialect) lets us split the CTA by role:
#   - a producer warp streams K and V tiles into a ring of NUM_BUF shared buffers with TMA;
#   - two consumer warpgroups own 64 queries each (128 per CTA) and share those K/V tiles. Inside a
#     warpgroup the softmax of key tile j runs while the P V wgmma of tile j-1 is still in flight;
#     between the warpgroups an mbarrier "turn" makes them issue their matmuls alternately (ping-pong),
#     so one warpgroup's softmax hides behind the other's matmuls;
#   - setmaxnreg gives the consumers 240 registers and the producer 24.
# Same math, contract and ragged-tail handling as the Triton forward; used on sm_90 only (wgmma).
if _HAVE_GLUON:

    @gluon.jit
    def _gl_fwd_loader(desc_k, desc_v, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, b, col, n_tiles):
        """Producer warp: K and V tiles into the ring; waits until both consumers released a slot."""
        NUM_BUF: gl.constexpr = k_bufs.type.shape[0]
        BLOCK_N: gl.constexpr = k_bufs.type.shape[2]
        for j in range(n_tiles):
            idx = j % NUM_BUF
            phase = (j // NUM_BUF) & 1
            mbarrier.wait(k_empty.index(idx), phase ^ 1)  # a fresh barrier counts as released
            mbarrier.expect(k_ready.index(idx), desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, [b, j * BLOCK_N, col], k_ready.index(idx), k_bufs.index(idx))
            mbarrier.wait(v_empty.index(idx), phase ^ 1)
            mbarrier.expect(v_ready.index(idx), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [b, j * BLOCK_N, col], v_ready.index(idx), v_bufs.index(idx))

    @gluon.jit
    def _gl_softmax_step(s, m_i, l_i, keys_left, qk_scale, MASK: gl.constexpr, BLOCK_N: gl.constexpr,
                         s_layout: gl.constexpr):
        """Online-softmax update for one key tile: (p, m, l, alpha), m in log2 units."""
        if MASK:  # only the last, partial key tile pays for the mask
            offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(offs_n[None, :] < keys_left, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        return p, m_new, l_i * alpha + gl.sum(p, 1), alpha

    @gluon.jit
    def _gl_fwd_consumer(WG: gl.constexpr, desc_q, desc_o, Lse, q_bufs, k_bufs, v_bufs, k_ready, k_empty,
                         v_ready, v_empty, q_bars, turn, b, m0, col, pid_bh, Sq, Sk, n_tiles, qk_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Consumer warpgroup WG: queries m0 + WG*BLOCK_M ..., all key tiles, then out and lse."""
        NUM_BUF: gl.constexpr = k_bufs.type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        dtype: gl.constexpr = desc_q.dtype
        q_smem = q_bufs.index(WG)
        row0 = m0 + WG * BLOCK_M
        mbarrier.expect(q_bars.index(WG), desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, row0, col], q_bars.index(WG), q_smem)
        q = q_smem.reshape([BLOCK_M, HEAD_DIM])
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        ragged = Sk % BLOCK_N != 0
        mbarrier.wait(q_bars.index(WG), 0)

        # key tile 0: S = Q K^T alone (nothing to overlap with yet)
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(turn.index(WG), WG ^ 1)  # warpgroup 0 starts
        k_t = k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)  # [BM, BN]
        mbarrier.arrive(turn.index(1 - WG), count=1)
        s, q, k_t = warpgroup_mma_wait(0, deps=(s, q, k_t))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, m_i, l_i, alpha = _gl_softmax_step(s, m_i, l_i, Sk, qk_scale, ragged and n_tiles == 1, BLOCK_N,
                                              s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        # tile j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, then the softmax of S_j under that matmul
        for j in range(1, n_tiles):
            idx = j % NUM_BUF
            prv = (j - 1) % NUM_BUF
            mbarrier.wait(k_ready.index(idx), (j // NUM_BUF) & 1)
            mbarrier.wait(v_ready.index(prv), ((j - 1) // NUM_BUF) & 1)
            mbarrier.wait(turn.index(WG), (j & 1) ^ WG ^ 1)
            k_t = k_bufs.index(idx).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
            v_t = v_bufs.index(prv).reshape([BLOCK_N, HEAD_DIM])
            acc = warpgroup_mma(p_op, v_t, acc, is_async=True)
            mbarrier.arrive(turn.index(1 - WG), count=1)
            s, k_t = warpgroup_mma_wait(1, deps=(s, k_t))  # S_j done, P V may still run
            mbarrier.arrive(k_empty.index(idx), count=1)
            if ragged and j == n_tiles - 1:
                p, m_i, l_i, alpha = _gl_softmax_step(s, m_i, l_i, Sk - j * BLOCK_N, qk_scale, True, BLOCK_N,
                                                      s_layout)
            else:
                p, m_i, l_i, alpha = _gl_softmax_step(s, m_i, l_i, Sk, qk_scale, False, BLOCK_N, s_layout)
            acc, p_op, v_t = warpgroup_mma_wait(0, deps=(acc, p_op, v_t))
            mbarrier.arrive(v_empty.index(prv), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = (n_tiles - 1) % NUM_BUF
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // NUM_BUF) & 1)
        v_t = v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_op, v_t, acc, is_async=True)
        acc, p_op, v_t = warpgroup_mma_wait(0, deps=(acc, p_op, v_t))
        mbarrier.arrive(v_empty.index(last), count=1)

        # epilogue: lse (natural log) for rows < Sq; out through Q's buffer, the 3-D TMA store clips at Sq
        offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(Lse + pid_bh.to(gl.int64) * Sq + offs_m, (m_i + gl.log2(l_i)) * 0.6931471805599453,
                 mask=offs_m < Sq)
        out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        q.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_o, [b, row0, col], q_smem)
        tma.store_wait(0)

    @gluon.jit
    def _gl_attn_fwd_kernel(desc_q, desc_k, desc_v, desc_o, Lse, H, Sq, Sk, qk_scale,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            NUM_BUF: gl.constexpr, BAR_N: gl.constexpr):
        """One program = 2 x BLOCK_M queries of one (batch, head); out [B,Sq,H,D], lse [B,H,Sq]."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)  # consecutive programs share (b, h): K/V tiles stay in L2
        b = pid_bh // H
        col = (pid_bh % H) * HEAD_DIM
        m0 = pid_m * (2 * BLOCK_M)
        n_tiles = gl.cdiv(Sk, BLOCK_N)
        dtype: gl.constexpr = desc_q.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [2] + desc_q.block_type.shape, desc_q.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF] + desc_k.block_type.shape, desc_k.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF] + desc_v.block_type.shape, desc_v.layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        k_ready = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)  # BAR_N: NUM_BUF rounded
        k_empty = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)  # up to a power of 2
        v_ready = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)
        v_empty = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        gl.warp_specialize([
            (_gl_fwd_consumer, (0, desc_q, desc_o, Lse, q_bufs, k_bufs, v_bufs, k_ready, k_empty, v_ready,
                                v_empty, q_bars, turn, b, m0, col, pid_bh, Sq, Sk, n_tiles, qk_scale,
                                BLOCK_M, BLOCK_N, HEAD_DIM)),
            (_gl_fwd_consumer, (1, desc_q, desc_o, Lse, q_bufs, k_bufs, v_bufs, k_ready, k_empty, v_ready,
                                v_empty, q_bars, turn, b, m0, col, pid_bh, Sq, Sk, n_tiles, qk_scale,
                                BLOCK_M, BLOCK_N, HEAD_DIM)),
            (_gl_fwd_loader, (desc_k, desc_v, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, b, col,
                              n_tiles)),
        ], [4, 1], [240, 24])

    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}
    # Measured on an H100 (BENCH.md): 64 queries per warpgroup, 128-key tiles and 3 K/V buffers
    # (224 KB of shared memory) with the ping-pong: -2 % to +15 % against 2 buffers without it (the
    # longer the sequence, the larger the gain); 64-key tiles lose ~15 %.
    GLUON_FWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, NUM_BUF=3)

    def _gl_desc(x, rows, cols=None):
        """Gluon TMA descriptor over x [B, S, H, D] as 3-D [B, S, H*D] with [1, rows, cols (D)] tiles."""
        B, S, H, D = x.shape
        cols = cols or D
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, cols], _GL_DTYPES[x.dtype])
        return GluonTensorDescriptor(x, [B, S, H * D], [x.stride(0), x.stride(1), 1], [1, rows, cols], layout)


# ---------------------------------------------------------------------------------------------------
# 3c. Hopper backward in Gluon (warp-specialised, FlashAttention-3's partition)
# ---------------------------------------------------------------------------------------------------
# One CTA owns 2 x 64 keys of one (batch, head) and walks all query tiles of 64 rows:
#   - a loader warp streams Q, dO and that tile's lse / delta (padded rows: +inf / 0) through TMA into
#     NUM_BUF shared buffers;
#   - two consumer warpgroups (240 registers) own 64 keys each, with dK and dV in registers. Per tile:
#     S^T = K Q^T and dP^T = V dO^T (wgmma, both operands in shared memory), P^T = exp2(S^T - lse),
#     dS^T = P^T (dP^T - delta); then dV += P^T dO and dK += dS^T Q take P^T and dS^T straight from
#     registers (the accumulator of S^T is already laid out as the next matmul's A operand);
#   - dQ = dS K needs both warpgroups' dS^T, so dS^T also goes to shared memory (two buffers), and each
#     warpgroup computes half of dQ's columns over all 128 keys one tile late: dQ of tile j-1 is issued
#     behind dK of tile j, by when the other warpgroup has long stored its half of dS^T. The two
#     warpgroups never wait for each other within a tile, which is what hides one's softmax behind the
#     other's matmuls;
#   - the dQ tile goes to shared memory "thread-major" (row = register slot, column = thread), which
#     stmatrix writes without bank conflicts (the row-major fp32 tile cost 2x the shared-memory
#     wavefronts, ~9 % of all of them), and a dQ-writer warp adds it into an fp32 buffer of the same
#     tiled layout with TMA reduce-add; a copy puts dQ back in [B, S, H, D] at the end.
# 198 KB of shared memory, 12 warps. Measured on an H100 (BENCH.md): 1.02-1.11x cuDNN's backward.
# Used for the `triton` and `auto` backends and ring attention on sm_90 when the keys give enough CTAs to
# fill the GPU (cross-attention's 512 keys take cuDNN under `auto`, the Triton kernel under `triton`).
if _HAVE_GLUON_BWD:

    @_gluon_builtin
    def _gl_tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """TMA reduce-add of a shared-memory tile into global memory (cp.reduce.async.bulk.tensor)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_triton_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _gl_bwd_loader(desc_q, desc_do, desc_lse, desc_delta, q_bufs, do_bufs, lse_bufs, delta_bufs, q_ready,
                       q_empty, b, col, vec0, n_tiles):
        """Loader warp: Q, dO, lse and delta of every query tile into the ring."""
        NUM_BUF: gl.constexpr = q_bufs.type.shape[0]
        BLOCK_M: gl.constexpr = q_bufs.type.shape[2]
        for j in range(n_tiles):
            idx = j % NUM_BUF
            mbarrier.wait(q_empty.index(idx), ((j // NUM_BUF) & 1) ^ 1)
            bar = q_ready.index(idx)
            mbarrier.expect(bar, desc_q.block_type.nbytes + desc_do.block_type.nbytes
                            + desc_lse.block_type.nbytes + desc_delta.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [b, j * BLOCK_M, col], bar, q_bufs.index(idx))
            tma.async_copy_global_to_shared(desc_do, [b, j * BLOCK_M, col], bar, do_bufs.index(idx))
            tma.async_copy_global_to_shared(desc_lse, [vec0 + j * BLOCK_M], bar, lse_bufs.index(idx))
            tma.async_copy_global_to_shared(desc_delta, [vec0 + j * BLOCK_M], bar, delta_bufs.index(idx))

    @gluon.jit
    def _gl_dq_thread_major(dq):
        """[64, C] wgmma accumulator of 4 warps -> [C/2, 128]: row = value slot, column = thread (lane order),
        so a warp's store of one slot writes 32 consecutive floats (no bank conflicts)."""
        I: gl.constexpr = dq.type.shape[1] // 8
        x = dq.reshape([4, 2, 8, I, 4, 2])  # rows (warp, half, lane // 4), columns (8-group, lane % 4, pair)
        x = x.permute((3, 1, 5, 0, 2, 4))  # (8-group, half, pair, warp, lane // 4, lane % 4)
        return x.reshape([I * 4, 128])

    @gluon.jit
    def _gl_bwd_dq_writer(desc_dq, dq_bufs, dq_full, dq_empty, tile0, n_tiles):
        """dQ-writer warp: add each warpgroup's dQ half-tile into global memory (TMA reduce-add)."""
        VALS: gl.constexpr = dq_bufs.type.shape[1]
        for j in range(n_tiles):
            for w in gl.static_range(2):
                mbarrier.wait(dq_full.index(w), j & 1)
                _gl_tma_reduce_add(desc_dq, [((tile0 + j) * 2 + w) * VALS, 0], dq_bufs.index(w))
                tma.store_wait(0)  # the tile has been read: the warpgroup may write the next one
                mbarrier.arrive(dq_empty.index(w), count=1)

    @gluon.jit
    def _gl_bwd_consumer(WG: gl.constexpr, desc_k, desc_v, desc_dk, desc_dv, lse_bufs, delta_bufs, q_bufs,
                         do_bufs, k_all, v_bufs, ds_all, dq_bufs, q_ready, q_empty, kv_bar, ds_ready,
                         ds_free, dq_full, dq_empty, b, n0, col, n_tiles, qk_scale, sm_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Consumer warpgroup WG: keys n0 + WG*BLOCK_N .. +BLOCK_N (dK, dV) and dQ's columns WG*D/2 .. +D/2."""
        NUM_BUF: gl.constexpr = q_bufs.type.shape[0]
        DQ_COLS: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = desc_k.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DQ_COLS, 16])
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # one value per query of the tile
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)

        # This warpgroup's K and V rows; TMA zero-fills keys past S_k (their dQ share is then 0).
        k_smem = k_all.slice(WG * BLOCK_N, BLOCK_N, dim=1)
        v_smem = v_bufs.index(WG)
        key0 = n0 + WG * BLOCK_N
        mbarrier.expect(kv_bar.index(WG), 2 * desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [b, key0, col], kv_bar.index(WG), k_smem)
        tma.async_copy_global_to_shared(desc_v, [b, key0, col], kv_bar.index(WG), v_smem)
        k2 = k_all.reshape([2 * BLOCK_N, HEAD_DIM]).slice(WG * BLOCK_N, BLOCK_N, dim=0)  # [BN, D]
        v2 = v_smem.reshape([BLOCK_N, HEAD_DIM])
        k_cols = k_all.reshape([2 * BLOCK_N, HEAD_DIM]).slice(WG * DQ_COLS, DQ_COLS, dim=1)  # [2BN, D/2]
        dq_smem = dq_bufs.index(WG)  # [D/4, 128] thread-major
        mbarrier.wait(kv_bar.index(WG), 0)

        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, q_layout)
        for j in range(n_tiles):
            idx = j % NUM_BUF
            mbarrier.wait(q_ready.index(idx), (j // NUM_BUF) & 1)
            q_t = q_bufs.index(idx).reshape([BLOCK_M, HEAD_DIM])
            do_t = do_bufs.index(idx).reshape([BLOCK_M, HEAD_DIM])
            sT = warpgroup_mma(k2, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)  # [BN, BM]
            dpT = warpgroup_mma(v2, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)  # [BN, BM]
            sT = warpgroup_mma_wait(1, deps=(sT,))
            pT = gl.exp2(sT * qk_scale - lse_bufs.index(idx).load(col_layout)[None, :])  # padded rows: 0
            p_op = gl.convert_layout(pT.to(dtype), a_layout)
            dv = warpgroup_mma(p_op, do_t, dv, is_async=True)
            dpT = warpgroup_mma_wait(1, deps=(dpT,))
            dsT = (pT * (dpT - delta_bufs.index(idx).load(col_layout)[None, :])).to(dtype)  # no softmax scale
            sb = j % 2
            mbarrier.wait(ds_free.index(sb), ((j // 2) & 1) ^ 1)  # dQ of tile j-2 has read this buffer
            ds_all.index(sb).slice(WG * BLOCK_N, BLOCK_N, dim=0).store(dsT)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(sb), count=1)
            ds_op = gl.convert_layout(dsT, a_layout)
            dk = warpgroup_mma(ds_op, q_t, dk, is_async=True)
            # dQ of the previous tile: by now the other warpgroup has stored its dS^T rows of it. At j = 0
            # there is none: the matmul reads the idle buffer and nothing waits, arrives or is sent.
            has_prev = j > 0
            pb = (j + 1) % 2
            mbarrier.wait(ds_ready.index(pb), ((j - 1) // 2) & 1, pred=has_prev)
            dq = warpgroup_mma(ds_all.index(pb).permute((1, 0)), k_cols, dq_zero, use_acc=False,
                               is_async=True)  # [BM, D/2] over all 2 x BLOCK_N keys
            dq, dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dq, dv, dk, p_op, ds_op))
            mbarrier.arrive(ds_free.index(pb), count=1, pred=has_prev)
            mbarrier.wait(dq_empty.index(WG), (j & 1), pred=has_prev)  # the writer has sent tile j-2
            dq_smem.store(_gl_dq_thread_major(dq * sm_scale))  # dS had no softmax scale
            fence_async_shared()
            mbarrier.arrive(dq_full.index(WG), count=1, pred=has_prev)
            mbarrier.arrive(q_empty.index(idx), count=1)
        # dQ of the last tile
        pb = (n_tiles - 1) % 2
        mbarrier.wait(ds_ready.index(pb), ((n_tiles - 1) // 2) & 1)
        dq = warpgroup_mma(ds_all.index(pb).permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=(dq,))
        mbarrier.arrive(ds_free.index(pb), count=1)
        # Both warpgroups' last dQ read all of K: only then may K's rows stage dK (below).
        mbarrier.wait(ds_free.index(pb), ((n_tiles - 1) // 2) & 1)
        mbarrier.wait(dq_empty.index(WG), ((n_tiles - 1) & 1) ^ 1)
        dq_smem.store(_gl_dq_thread_major(dq * sm_scale))
        fence_async_shared()
        mbarrier.arrive(dq_full.index(WG), count=1)

        # K and V are no longer read: their buffers stage dK and dV for the TMA stores (clipped at S_k).
        k2.store((dk * sm_scale).to(dtype))
        v2.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_dk, [b, key0, col], k_smem)
        tma.async_copy_shared_to_global(desc_dv, [b, key0, col], v_smem)
        tma.store_wait(0)

    @gluon.jit
    def _gl_attn_bwd_kernel(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, desc_dq, desc_lse, desc_delta,
                            H, Sq, Sq_pad, qk_scale, sm_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr, BAR_N: gl.constexpr):
        """One program = 2 x BLOCK_N keys of one (batch, head); dk, dv [B,Sk,H,D], dQ added to fp32."""
        pid_n = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        col = (pid_bh % H) * HEAD_DIM
        n0 = pid_n * (2 * BLOCK_N)
        n_tiles = gl.cdiv(Sq, BLOCK_M)
        dtype: gl.constexpr = desc_q.dtype
        q_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF] + desc_q.block_type.shape, desc_q.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [NUM_BUF] + desc_do.block_type.shape, desc_do.layout)
        lse_bufs = gl.allocate_shared_memory(gl.float32, [NUM_BUF] + desc_lse.block_type.shape, desc_lse.layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [NUM_BUF] + desc_delta.block_type.shape,
                                               desc_delta.layout)
        k_all = gl.allocate_shared_memory(dtype, [1, 2 * BLOCK_N, HEAD_DIM], desc_k.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [2] + desc_v.block_type.shape, desc_v.layout)
        ds_all = gl.allocate_shared_memory(dtype, [2, 2 * BLOCK_N, BLOCK_M],
                                           gl.NVMMASharedLayout.get_default_for([2 * BLOCK_N, BLOCK_M], dtype))
        dq_bufs = gl.allocate_shared_memory(gl.float32, [2] + desc_dq.block_type.shape, desc_dq.layout)
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_ready = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [BAR_N, 1], bar_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers release a slot
        for i in gl.static_range(2):
            mbarrier.init(kv_bar.index(i), count=1)
            mbarrier.init(dq_full.index(i), count=1)
            mbarrier.init(dq_empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
            mbarrier.init(ds_free.index(i), count=2)
        gl.warp_specialize([
            (_gl_bwd_consumer, (0, desc_k, desc_v, desc_dk, desc_dv, lse_bufs, delta_bufs, q_bufs, do_bufs, k_all,
                                v_bufs, ds_all, dq_bufs, q_ready, q_empty, kv_bar, ds_ready, ds_free,
                                dq_full, dq_empty, b, n0, col, n_tiles, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                                HEAD_DIM)),
            (_gl_bwd_consumer, (1, desc_k, desc_v, desc_dk, desc_dv, lse_bufs, delta_bufs, q_bufs, do_bufs, k_all,
                                v_bufs, ds_all, dq_bufs, q_ready, q_empty, kv_bar, ds_ready, ds_free,
                                dq_full, dq_empty, b, n0, col, n_tiles, qk_scale, sm_scale, BLOCK_M, BLOCK_N,
                                HEAD_DIM)),
            (_gl_bwd_loader, (desc_q, desc_do, desc_lse, desc_delta, q_bufs, do_bufs, lse_bufs, delta_bufs,
                              q_ready, q_empty, b, col, pid_bh * Sq_pad, n_tiles)),
            (_gl_bwd_dq_writer, (desc_dq, dq_bufs, dq_full, dq_empty, pid_bh * n_tiles, n_tiles)),
        ], [4, 1, 1], [240, 24, 24])

    # 64 keys per warpgroup, 64-row query tiles, 2 Q/dO buffers (198 KB of shared memory; 3 do not fit).
    # The thread-major dQ tiles assume BLOCK_M = 64 (one wgmma row block of 4 warps).
    GLUON_BWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, NUM_BUF=2)

    def _gl_dq_tiles_desc(dq_tiles, D):
        """TMA descriptor over the fp32 thread-major dQ tiles [rows, 128]: [D/4 slots, 128 threads] boxes,
        unswizzled (the consumers' stmatrix writes them without bank conflicts as they are)."""
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        return GluonTensorDescriptor(dq_tiles, list(dq_tiles.shape), [128, 1], [D // 4, 128], layout)

    def _gl_vec_desc(x, block):
        """1-D Gluon TMA descriptor over a contiguous fp32 tensor, [block] tiles."""
        layout = gl.NVMMASharedLayout.get_default_for([block], gl.float32)
        return GluonTensorDescriptor(x, [x.numel()], [1], [block], layout)


# `auto` decides per call, inside compiled (and checkpointed) blocks too, where a device query dynamo
# cannot trace would break the block's graph: the facts are read from this cache, which set_backend
# fills for every GPU before anything is compiled.
_DEVICE_FACTS = {}  # device index -> (compute capability, number of multiprocessors)


def _device_facts(index=None):
    """(capability, SM count) of a CUDA device (None: the current one), cached."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _DEVICE_FACTS:
        _DEVICE_FACTS[index] = (torch.cuda.get_device_capability(index),
                                torch.cuda.get_device_properties(index).multi_processor_count)
    return _DEVICE_FACTS[index]


def gluon_available(x=None):
    """True when the Gluon forward can run: Gluon, a Hopper (sm_90) GPU, not the interpreter."""
    if not (_HAVE_GLUON and not _INTERPRET):
        return False
    if x is None:
        return torch.cuda.is_available() and _device_facts()[0] == (9, 0)
    return x.device.type == "cuda" and _device_facts(x.device.index)[0] == (9, 0)


def _gluon_forward(q, k, v, config=None):
    """Gluon forward: (out [B,Sq,H,D], lse [B,H,Sq] fp32), the same contract as _triton_forward."""
    _check_inputs(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    cfg = dict(GLUON_FWD_CONFIG, **(config or {}))
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(Sq, 2 * bm), B * H)
    # 12 warps (2 consumer warpgroups + the producer's): 168 x 384 threads fills the register file,
    # from which setmaxnreg moves registers to the consumers (2 x 240 + 24 per thread, per warpgroup).
    _gl_attn_fwd_kernel[grid](_gl_desc(q, bm), _gl_desc(k, bn), _gl_desc(v, bn), _gl_desc(out, bm), lse,
                              H, Sq, Sk, 1.4426950408889634 / math.sqrt(D), HEAD_DIM=D, BLOCK_M=bm,
                              BLOCK_N=bn, NUM_BUF=cfg["NUM_BUF"], BAR_N=triton.next_power_of_2(cfg["NUM_BUF"]),
                              num_warps=4, maxnreg=168)
    return out, lse


# COSMOS_MV_GLUON_BACKWARD=0 keeps the Triton backward everywhere (ring attention included), e.g. to
# compare the two or to rule the newer kernel out when chasing a numerical problem.
_GLUON_BACKWARD_ON = os.environ.get("COSMOS_MV_GLUON_BACKWARD", "1") != "0"


def gluon_backward_available(x=None):
    """True when the Gluon backward can run: the forward's conditions and Triton's TMA reduce op."""
    return _GLUON_BACKWARD_ON and _HAVE_GLUON_BWD and gluon_available(x)


def _gluon_backward_suits(q, k):
    """Gluon backward for this call? sm_90, and enough key tiles to give every SM a CTA; otherwise the
    Triton kernel, which also splits the queries (cross-attention's 512 keys: 4 CTAs per head)."""
    if not gluon_backward_available(q):
        return False
    programs = triton.cdiv(k.shape[1], 2 * GLUON_BWD_CONFIG["BLOCK_N"]) * q.shape[0] * q.shape[2]
    return programs >= _device_facts(q.device.index)[1]


def _gluon_backward(dout, q, k, v, out, lse, config=None):
    """Gluon backward: (dq, dk, dv) in the inputs' dtype, the same contract as _triton_backward."""
    _check_inputs(q, k, v)
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout.to(q.dtype))
    cfg = dict(GLUON_BWD_CONFIG, **(config or {}))
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    Sq_pad = triton.cdiv(Sq, bm) * bm  # whole query tiles for the loader's lse / delta TMA reads
    delta = torch.empty((B * H, Sq_pad), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _attn_bwd_prep_kernel[(triton.cdiv(Sq_pad, 64), B * H)](
        out, dout, lse.float().contiguous(), delta, lse2, H, Sq, Sq_pad, out.stride(1), dout.stride(1),
        HEAD_DIM=D, BLOCK_M=64)
    nt = Sq_pad // bm
    vals = D // 4  # each warpgroup's [64, D/2] dQ tile as [D/4 value slots, 128 threads]
    dq_tiles = torch.zeros((B * H * nt * 2 * vals, 128), dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    sm_scale = 1.0 / math.sqrt(D)
    grid = (triton.cdiv(Sk, 2 * bn), B * H)
    # 12 warps at launch (2 consumer warpgroups + 1 for the loader and dQ-writer warps), 168 registers
    # each; setmaxnreg then moves them to the consumers (240 + 240 + 24 per thread of each warpgroup).
    _gl_attn_bwd_kernel[grid](_gl_desc(q, bm), _gl_desc(dout, bm), _gl_desc(k, bn), _gl_desc(v, bn),
                              _gl_desc(dk, bn), _gl_desc(dv, bn), _gl_dq_tiles_desc(dq_tiles, D),
                              _gl_vec_desc(lse2, bm), _gl_vec_desc(delta, bm), H, Sq, Sq_pad,
                              sm_scale * 1.4426950408889634, sm_scale, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                              NUM_BUF=cfg["NUM_BUF"], BAR_N=triton.next_power_of_2(cfg["NUM_BUF"]),
                              num_warps=4, maxnreg=168)
    return _dq_from_thread_major(dq_tiles, B, H, Sq, D, q.dtype), dk, dv


def _dq_from_thread_major(dq_tiles, B, H, Sq, D, dtype):
    """dQ [B, Sq, H, D] from the Gluon backward's tiles [B, H, query tile, half w, D/4 slots, 128 threads].

    Slot (8-group i, half h, pair e) of thread (warp, lane) holds row 16 warp + 8 h + lane // 4 and column
    w D/2 + 8 i + 2 (lane % 4) + e of the query tile (the wgmma accumulator layout); one strided copy.
    """
    nt = dq_tiles.numel() // (B * H * 64 * D)
    dq = torch.empty((B, nt * 64, H, D), dtype=dtype, device=dq_tiles.device)
    dq.view(B, nt, 4, 2, 8, H, 2, D // 16, 4, 2).copy_(
        dq_tiles.view(B, H, nt, 2, D // 16, 2, 2, 4, 8, 4).permute(0, 2, 7, 5, 8, 1, 3, 4, 9, 6))
    return dq[:, :Sq] if B == 1 or nt * 64 == Sq else dq[:, :Sq].contiguous()


def triton_available():
    """True when the Triton flash-attention kernels can run here (CUDA, Hopper or newer, Triton)."""
    global _triton_ok
    if _triton_ok is None:
        _triton_ok = (_HAVE_TRITON and not _INTERPRET and torch.cuda.is_available()
                      and torch.cuda.get_device_capability()[0] >= 9)
    return _triton_ok


def _use_kernels(x):
    """Kernels on CUDA for bf16/fp16 and head dims they support; on CPU only under the Triton interpreter."""
    if x.is_cuda:
        return triton_available() and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] in KERNEL_HEAD_DIMS
    return _INTERPRET and _HAVE_TRITON


def _check_inputs(q, k, v):
    """Validate shapes/dtypes for the kernels; raise a clear error otherwise."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"attention expects q, k, v as [B, S, H, D] with k, v alike; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if q.shape[3] not in KERNEL_HEAD_DIMS:
        raise ValueError(f"Triton attention supports head dims {KERNEL_HEAD_DIMS}, got {q.shape[3]}")
    allowed = (torch.bfloat16, torch.float16) + ((torch.float32,) if _INTERPRET else ())
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in allowed:
        raise ValueError(f"Triton attention wants q, k, v of one dtype in {allowed}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


def _rows(x):
    """x [B, S, H, D] as the 2-D row matrix [B*S, H*D] the descriptors read; copies only odd layouts."""
    B, S, H, D = x.shape
    ok = (x.stride(3) == 1 and x.stride(2) == D and (B == 1 or x.stride(0) == S * x.stride(1))
          and (x.stride(1) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0)
    return x if ok else x.contiguous()


def _desc(x, rows_per_tile):
    """TMA descriptor over the [B*S, H*D] view of x; the autotune hook may change the tile rows."""
    B, S, H, D = x.shape
    return TensorDescriptor(x, [B * S, H * D], [x.stride(1), 1], [rows_per_tile, D])


def _launch_args(config):
    """Explicit launch parameters for a config dict (benchmark sweeps); None means autotune."""
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return meta, config.get("num_warps", 4), config.get("num_stages", 2)


def _triton_forward(q, k, v, config=None):
    """Kernel forward: (out [B,Sq,H,D], lse [B,H,Sq] fp32); config forces one tile setup."""
    _check_inputs(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    descs = [_desc(q, 64), _desc(k, 64), _desc(v, 64), _desc(out, 64)]
    qk_scale = 1.4426950408889634 / math.sqrt(D)  # 1/sqrt(D) in log2 units
    tune_key = Sk.bit_length()  # tune once per power-of-two range of key lengths
    args = (*descs, out, lse, H, Sq, Sk, qk_scale, tune_key)
    if config is None:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)
        _attn_fwd_tuned[grid](*args, HEAD_DIM=D)
    else:
        meta, warps, stages = _launch_args(config)
        _fwd_blocks({"desc_q": descs[0], "desc_k": descs[1], "desc_v": descs[2], "desc_o": descs[3],
                     "HEAD_DIM": D, **meta})
        _attn_fwd_kernel[(triton.cdiv(Sq, meta["BLOCK_M"]), B * H)](
            *args, HEAD_DIM=D, num_warps=warps, num_stages=stages, **meta)
    return out, lse


def _query_split(Sq, Sk, B, H, device):
    """Query chunks per key tile so that short-key problems (cross-attention) still fill the GPU."""
    programs = triton.cdiv(Sk, 128) * B * H
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(Sq, 1024)))


def _triton_backward(dout, q, k, v, out, lse, config=None, q_split=None):
    """Kernel backward: (dq, dk, dv) in the inputs' dtype, from the saved out and lse (natural log)."""
    _check_inputs(q, k, v)
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout.to(q.dtype))
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    lse = lse.float().contiguous()
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _attn_bwd_prep_kernel[(triton.cdiv(Sq, 64), B * H)](
        out, dout, lse, delta, lse2, H, Sq, Sq, out.stride(1), dout.stride(1), HEAD_DIM=D, BLOCK_M=64)

    split = q_split or _query_split(Sq, Sk, B, H, q.device)
    q_chunk = triton.cdiv(triton.cdiv(Sq, split), 128) * 128  # whole query tiles for any BLOCK_M
    split = triton.cdiv(Sq, q_chunk)
    dq_acc = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=q.device)
    if split == 1:
        dk = torch.empty((B, Sk, H, D), dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
    else:  # per-chunk fp32 partials, summed below (Sk is small whenever this happens)
        dk = torch.empty((split, B, Sk, H, D), dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    k_desc = TensorDescriptor(k, [B, Sk, H * D], [k.stride(0), k.stride(1), 1], [1, 64, D])
    descs = [_desc(q, 64), k_desc, _desc(v, 64), _desc(dout, 64), _desc(dq_acc, 64)]
    sm_scale = 1.0 / math.sqrt(D)
    tune_key = Sq.bit_length()  # the backward walks the queries: tune per their length range
    args = (*descs, dq_acc, dk, dv, lse2, delta, H, Sq, Sk, sm_scale * 1.4426950408889634, sm_scale,
            q_chunk, B * Sk * H * D, tune_key)
    if config is None:
        grid = lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * H, split)
        _attn_bwd_tuned[grid](*args, HEAD_DIM=D)
    else:
        meta, warps, stages = _launch_args(config)
        _bwd_blocks({"desc_q": descs[0], "desc_k": descs[1], "desc_v": descs[2], "desc_do": descs[3],
                     "desc_dq": descs[4], "HEAD_DIM": D, **meta})
        _attn_bwd_kernel[(triton.cdiv(Sk, meta["BLOCK_N"]), B * H, split)](
            *args, HEAD_DIM=D, num_warps=warps, num_stages=stages, **meta)
    if split > 1:
        dk, dv = dk.sum(0).to(q.dtype), dv.sum(0).to(q.dtype)
    dq = (dq_acc * sm_scale).to(q.dtype)
    return dq, dk, dv


# Where the kernels cannot run (CPU, fp32, other GPUs, other head dims) the primitives fall back to the
# reference math in at least fp32, one block of queries at a time: exact, and memory stays
# O(block x keys) instead of O(queries x keys), which matters for ring attention at 720p.
_FALLBACK_QUERY_BLOCK = 1024


_GLUON_FWD_MIN_KEYS = 1024


def attention_forward(q, k, v):
    """Forward primitive used by ring attention: (out, lse) with lse [B, H, Sq] in fp32."""
    if _use_kernels(q):
        # Gluon on sm_90, except for short key sets (cross-attention's 512 keys: 208 vs 348 TFLOP/s
        # for the Triton kernel, BENCH.md), where its pipeline never fills
        gluon = gluon_available(q) and k.shape[1] >= _GLUON_FWD_MIN_KEYS
        return _gluon_forward(q, k, v) if gluon else _triton_forward(q, k, v)
    compute = torch.promote_types(q.dtype, torch.float32)
    k32, v32 = k.to(compute), v.to(compute)
    outs, lses = zip(*(reference_attention(q[:, s:s + _FALLBACK_QUERY_BLOCK].to(compute), k32, v32)
                       for s in range(0, q.shape[1], _FALLBACK_QUERY_BLOCK)))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 2).float()


def attention_backward(dout, q, k, v, out, lse):
    """Backward primitive used by ring attention: (dq, dk, dv) in the inputs' dtype."""
    if _use_kernels(q):
        if _gluon_backward_suits(q, k):
            return _gluon_backward(dout, q, k, v, out, lse)
        return _triton_backward(dout, q, k, v, out, lse)
    compute = torch.promote_types(q.dtype, torch.float32)
    k32, v32 = k.to(compute), v.to(compute)
    dqs, dk, dv = [], torch.zeros_like(k32), torch.zeros_like(v32)
    for s in range(0, q.shape[1], _FALLBACK_QUERY_BLOCK):
        rows = slice(s, s + _FALLBACK_QUERY_BLOCK)
        dq_s, dk_s, dv_s = reference_attention_backward(
            dout[:, rows].to(compute), q[:, rows].to(compute), k32, v32, out[:, rows].to(compute),
            lse[:, :, rows].to(compute))
        dqs.append(dq_s)
        dk += dk_s
        dv += dv_s
    return torch.cat(dqs, 1).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# The autograd wrapper is a registered custom op (not a plain autograd.Function) so that PyTorch's
# selective activation checkpointing can see it by name and keep its output instead of recomputing
# the most expensive op of the block (train.py's `save_attention` mode).


def _cudnn_backward(dout, q, k, v, out, lse):
    """cuDNN's flash-attention backward from our out and lse, through SDPA's (private) aten op."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return attention_backward(dout, q, k, v, out, lse)
    t = lambda x: x.transpose(1, 2)  # [B, S, H, D] -> the [B, H, S, D] view cuDNN takes
    none = q.new_empty(0)  # dropout RNG state: unused without dropout
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(dout), t(q), t(k), t(v), t(out), lse.unsqueeze(-1), none, none, None, None, None, q.shape[1],
        k.shape[1], 0.0, False, scale=1.0 / math.sqrt(q.shape[-1]))
    return t(dq), t(dk), t(dv)


@torch.library.custom_op("cosmos_mv::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cudnn_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_forward(q, k, v)
    return out.contiguous(), lse.contiguous()


@_flash_attention_op.register_fake
def _(q, k, v, cudnn_backward=False):
    B, Sq, H, _ = q.shape
    return q.new_empty(B, Sq, H, v.shape[-1]), q.new_empty(B, H, Sq, dtype=torch.float32)


def _flash_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output)  # q, k, v, out, lse
    ctx.cudnn_backward = inputs[3]


# The backward is an op of its own too: torch.compile traces autograd formulas, and kernel launches
# cannot run on its fake tensors, while an op is opaque to it (train.py's compile=True).
@torch.library.custom_op("cosmos_mv::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor,
                                 cudnn_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = _cudnn_backward if cudnn_backward else attention_backward
    return tuple(g.contiguous() for g in backward(dout.contiguous(), q, k, v, out, lse))


@_flash_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cudnn_backward):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return *_flash_attention_backward_op(dout, q, k, v, out, lse, ctx.cudnn_backward), None


_flash_attention_op.register_autograd(_flash_attention_backward, setup_context=_flash_attention_setup)


def flash_attention(q, k, v, cudnn_backward=False):
    """Autograd-aware attention [B, S, H, D] -> [B, Sq, H, D] through the primitives above."""
    return _flash_attention_op(q, k, v, cudnn_backward)[0]


# ---------------------------------------------------------------------------------------------------
# 4. Ring attention (context parallelism)
# ---------------------------------------------------------------------------------------------------
# One sample's sequence is split over the P ranks of a process group; rank r holds q, k, v chunks
# [B, S_r, H, D] (S_r may differ between ranks). The K/V chunks travel around the ring, rank r
# sending to r+1 and receiving from r-1: at step s rank r holds the chunk of rank (r - s) mod P and
# runs the forward primitive on its own queries against it while the next chunk is already in
# flight. The partial (out, lse) pairs merge through the log-sum-exp. There is no mask, so every
# step is the same work and the arrival order does not matter (no zigzag layout needed).
#
# Backward: the same ring again. Given the final out and lse of the whole sequence, the gradient
# splits into a plain sum over K/V chunks of the primitive backward (or of cuDNN's, which takes the same
# global out and lse: the triton-cudnn pairing), with no renormalisation. dQ
# accumulates locally. The dK/dV of a chunk travel one hop behind it, gaining each rank's
# contribution, and after P hops land at the chunk's owner. All accumulation is fp32, including the
# dK/dV that travel (twice the bytes of bf16, but no rounding at every hop); only the last hop, which
# carries a finished gradient and is the one transfer nothing overlaps, goes in the inputs' dtype.
#
# Communication is torch.distributed point-to-point with two buffers per travelling tensor: one is
# computed on (and sent) while the other receives. It works on gloo (CPU tests) and NCCL. On NCCL
# the transfers run on NCCL's own stream, which waits for kernels already queued on the buffer it
# receives into, so reusing the two buffers needs no extra synchronisation.

import torch.distributed as dist  # noqa: E402  (only this section needs it)


def _ring_layout(group):
    """(rank in group, group size, global rank of the next rank, global rank of the previous rank)."""
    if group is None:
        return 0, 1, 0, 0
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    return rank, size, nxt, prv


def _check_qkv(q, k, v):
    """Local shape and dtype checks, before any communication."""
    if k.shape != v.shape or q.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"ring_attention: need q [B,Sq,H,D] and k, v [B,Sk,H,D] of equal B, H, D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"ring_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _exchange_kv_sizes(k, group):
    """Sequence length of every rank's K/V chunk, after checking that B, H, D agree across ranks."""
    if group is None or dist.get_world_size(group) == 1:
        return (k.shape[1],)
    mine = torch.tensor(list(k.shape), dtype=torch.int64, device=k.device)  # [B, Sk, H, D]
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shapes = torch.stack(every).tolist()
    if any((b, h, d) != (shapes[0][0], shapes[0][2], shapes[0][3]) for b, _, h, d in shapes):
        raise ValueError(f"ring_attention: ranks disagree on (B, H, D); their k shapes are {shapes}")
    return tuple(s for _, s, _, _ in shapes)


def _kv_numel(k, sizes):
    """Elements of a flat buffer that fits the largest (K, V) chunk of the ring."""
    B, _, H, D = k.shape
    return 2 * B * H * D * max(sizes)


def _kv_view(buf, n, k):
    """The first 2*B*n*H*D elements of a flat buffer as a [2, B, n, H, D] (K, V) pair shaped like k."""
    B, _, H, D = k.shape
    return buf[: 2 * B * n * H * D].view(2, B, n, H, D)


def _ring_step(tensor_out, tensor_in, nxt, prv, group, tag):
    """Post send(tensor_out -> next rank) and recv(tensor_in <- previous rank); returns the requests."""
    ops = [dist.P2POp(dist.isend, tensor_out, nxt, group, tag),
           dist.P2POp(dist.irecv, tensor_in, prv, group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(requests):
    """Block until the posted transfers are done (on CUDA: make the current stream wait for them)."""
    for req in requests:
        req.wait()


def _merge_partials(out, lse, out_s, lse_s):
    """Merge softmax partials over disjoint key sets (out fp32 [B,S,H,D] updated in place, lse [B,H,S])."""
    if out is None:
        return out_s.float(), lse_s.float()
    # The two weights exp(lse - new) and exp(lse_s - new) sum to 1, so the merge is one lerp with
    # weight sigmoid(lse_s - lse): stable for any gap, and one pass over out instead of three.
    w_new = torch.sigmoid(lse_s - lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    return out.lerp_(out_s.float(), w_new), torch.logaddexp(lse, lse_s)


def _ring_forward(q, k, v, group, sizes):
    """Forward over the ring: (out [B,Sq,H,D] in q's dtype, lse [B,H,Sq] fp32) of the whole sequence."""
    rank, P, nxt, prv = _ring_layout(group)
    if P == 1:
        return attention_forward(q, k, v)
    bufs = [torch.empty(_kv_numel(k, sizes), dtype=k.dtype, device=k.device) for _ in range(2)]
    kv = _kv_view(bufs[0], sizes[rank], k)
    kv[0].copy_(k)
    kv[1].copy_(v)
    out = lse = None
    for step in range(P):
        if step < P - 1:  # start moving the next chunk before computing on this one
            kv_next = _kv_view(bufs[(step + 1) % 2], sizes[(rank - step - 1) % P], k)
            requests = _ring_step(kv, kv_next, nxt, prv, group, tag=step)
        out_s, lse_s = attention_forward(q, kv[0], kv[1])
        out, lse = _merge_partials(out, lse, out_s, lse_s)
        if step < P - 1:
            _wait(requests)
            kv = kv_next
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, group, sizes, cudnn_backward=False):
    """Backward over the ring: (dq, dk, dv) of this rank's chunks, from the global out and lse.

    cudnn_backward: each chunk's gradients from cuDNN's kernel, fed the global out and lse exactly as
    our primitive is (the `triton-cudnn` pairing; no LSE is needed from a backward).
    """
    backward = _cudnn_backward if cudnn_backward else attention_backward
    rank, P, nxt, prv = _ring_layout(group)
    if P == 1:
        return backward(dout, q, k, v, out, lse)
    numel = _kv_numel(k, sizes)
    kv_bufs = [torch.empty(numel, dtype=k.dtype, device=k.device) for _ in range(2)]
    dkv_bufs = [torch.empty(numel, dtype=torch.float32, device=k.device) for _ in range(2)]
    kv = _kv_view(kv_bufs[0], sizes[rank], k)
    kv[0].copy_(k)
    kv[1].copy_(v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_requests = None
    for step in range(P):
        if step < P - 1:
            kv_next = _kv_view(kv_bufs[(step + 1) % 2], sizes[(rank - step - 1) % P], k)
            kv_requests = _ring_step(kv, kv_next, nxt, prv, group, tag=2 * step)
        dq_s, dk_s, dv_s = backward(dout, q, kv[0], kv[1], out, lse)
        dq.add_(dq_s)
        # dK/dV of the chunk held now: the running sum from the ranks before us, plus our share.
        dkv = _kv_view(dkv_bufs[step % 2], sizes[(rank - step) % P], k)
        if step == 0:
            dkv[0].copy_(dk_s)
            dkv[1].copy_(dv_s)
        else:
            _wait(dkv_requests)
            dkv[0].add_(dk_s)
            dkv[1].add_(dv_s)
        # Pass it on; what arrives next is the chunk we hold at the next step.
        if step < P - 1:
            dkv_in = _kv_view(dkv_bufs[(step + 1) % 2], sizes[(rank - step - 1) % P], k)
            dkv_requests = _ring_step(dkv, dkv_in, nxt, prv, group, tag=2 * step + 1)
            _wait(kv_requests)
            kv = kv_next
    # Last hop: our own dK/dV arrive complete. Nothing overlaps this transfer, so it goes in k's
    # dtype (the owner would round to it anyway), into tensors of their own: the op's outputs may not
    # share storage.
    dk_own, dv_own = torch.empty_like(k), torch.empty_like(v)
    dkv_out = dkv.to(k.dtype)
    ops = [dist.P2POp(dist.isend, dkv_out[i], nxt, group, 2 * P + i) for i in range(2)]
    ops += [dist.P2POp(dist.irecv, own, prv, group, 2 * P + i) for i, own in enumerate((dk_own, dv_own))]
    _wait(dist.batch_isend_irecv(ops))
    return dq.to(q.dtype), dk_own, dv_own


# Like the local kernel, the ring is a registered custom op, so selective activation checkpointing
# keeps its output instead of running the whole ring (communication included) again in backward. Its
# backward is an op of its own too, so torch.compile (train.py compile=True) treats both directions as
# opaque: the point-to-point exchanges only ever run on real tensors, never on tracing's fake ones.
# Custom ops take strings, not process groups: a group is registered once by name, outside any traced
# code (model.enable_context_parallel does it; eager calls register on the fly), and the ops look it up.
_RING_GROUPS = {}


def register_ring_group(group):
    """Make `group` known to the ring ops by its name (call it eagerly, before compiled code uses it)."""
    _RING_GROUPS[group.group_name] = group
    return group.group_name


def _ring_group(group_name):
    """The process group registered under `group_name`."""
    if group_name not in _RING_GROUPS:
        raise KeyError(f"ring_attention: process group {group_name!r} is not registered; call "
                       f"attention.register_ring_group(group) (model.enable_context_parallel does) first")
    return _RING_GROUPS[group_name]


@torch.library.custom_op("cosmos_mv::ring_attention", mutates_args=())
def _ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str,
                       kv_sizes: list[int], cudnn_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _ring_forward(q.contiguous(), k.contiguous(), v.contiguous(), _ring_group(group_name),
                             tuple(kv_sizes))
    return out.contiguous(), lse.contiguous()


@_ring_attention_op.register_fake
def _(q, k, v, group_name, kv_sizes, cudnn_backward):
    B, Sq, H, _ = q.shape
    return q.new_empty(B, Sq, H, v.shape[-1]), q.new_empty(B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("cosmos_mv::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, group_name: str, kv_sizes: list[int],
                                cudnn_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _ring_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                           _ring_group(group_name), tuple(kv_sizes), cudnn_backward)
    return tuple(g.contiguous() for g in grads)


@_ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, group_name, kv_sizes, cudnn_backward):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ring_attention_setup(ctx, inputs, output):
    q, k, v, group_name, kv_sizes, cudnn_backward = inputs
    ctx.save_for_backward(q, k, v, *output)  # the global out and lse: the backward recomputes nothing
    ctx.group_name, ctx.kv_sizes = group_name, list(kv_sizes)  # the name, not the group: tracing copies ctx
    ctx.cudnn_backward = cudnn_backward


def _ring_attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_attention_backward_op(dout, q, k, v, out, lse, ctx.group_name, ctx.kv_sizes,
                                             ctx.cudnn_backward)
    return dq, dk, dv, None, None, None


_ring_attention_op.register_autograd(_ring_attention_backward, setup_context=_ring_attention_setup)


def ring_attention_with_lse(q, k, v, group=None, kv_sizes=None, cudnn_backward=None):
    """Attention of local queries over the K/V of all ranks; returns (out [B,Sq,H,D], lse [B,H,Sq] fp32).

    q, k, v are this rank's chunks. kv_sizes, the K/V sequence length of every rank in group order,
    saves one all-gather (and a host sync) per call when the caller knows it (compiled callers must
    pass it). The lse is not differentiable. With group None or of size 1 this is plain attention
    through the primitives. The forward always runs our kernels (the merge needs each chunk's LSE);
    the backward of every chunk runs cuDNN's kernel when cudnn_backward is set, by default unless the
    attention backend resolves to our kernels both ways (`triton`; `auto` on Hopper for chunks that fill
    the GPU) or the kernels cannot run here.
    """
    _check_qkv(q, k, v)
    if cudnn_backward is None:
        cudnn_backward = resolve_backend(q, k=k) != "triton" and q.is_cuda and _use_kernels(q)
    if kv_sizes is None:
        kv_sizes = _exchange_kv_sizes(k, group)
    kv_sizes = tuple(int(s) for s in kv_sizes)
    # get_rank / get_world_size only: torch.compile folds them to constants (the ring's neighbours are
    # looked up inside the op)
    rank, P = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    if len(kv_sizes) != P or kv_sizes[rank] != k.shape[1] or min(kv_sizes) < 1:
        raise ValueError(f"ring_attention: kv_sizes {list(kv_sizes)} do not fit a ring of {P} ranks "
                         f"in which rank {rank} holds {k.shape[1]} keys (and every rank at least one)")
    if P == 1:
        out, lse = _flash_attention_op(q, k, v, cudnn_backward)
    else:
        if not torch.compiler.is_compiling():  # a registry write would break the graph: done eagerly only
            register_ring_group(group)
        out, lse = _ring_attention_op(q, k, v, group.group_name, list(kv_sizes), cudnn_backward)
    return out, lse.detach()  # the lse is not differentiable


def ring_attention(q, k, v, group=None, kv_sizes=None, cudnn_backward=None):
    """Context-parallel attention over a process group; returns this rank's out [B, Sq, H, D]."""
    return ring_attention_with_lse(q, k, v, group, kv_sizes, cudnn_backward)[0]


# Sequence sharding for the multiview layout. The model's time axis is view-major "(V T)" (all T
# latent frames of view 0, then view 1, ...). Rank r of cp keeps latent frames [r*T/cp, (r+1)*T/cp)
# of every view, so each rank holds whole frames of every view: per-frame AdaLN and per-view
# cross-attention stay local, and only self-attention (the ring above) talks to other ranks.


def _views_frames(x, n_views, cp, dim, who):
    """Split the size of axis `dim` into (V, T) and check that T divides into cp chunks."""
    n = x.shape[dim]
    if n_views < 1 or n % n_views:
        raise ValueError(f"{who}: axis {dim} of shape {tuple(x.shape)} holds {n} frames, "
                         f"not a multiple of n_views={n_views}")
    frames = n // n_views
    if cp < 1 or frames % cp:
        raise ValueError(f"{who}: {frames} latent frames per view do not split evenly over cp={cp} "
                         f"ranks; choose cp among the divisors of {frames}")
    return frames


def shard_views(x, n_views, rank, cp, dim=2):
    """Rank `rank`'s share of a view-major "(V T)" axis: frames [r*T/cp, (r+1)*T/cp) of every view."""
    dim = dim % x.ndim
    frames = _views_frames(x, n_views, cp, dim, "shard_views")
    if not 0 <= rank < cp:
        raise ValueError(f"shard_views: rank {rank} outside 0..{cp - 1}")
    local = frames // cp
    x_V_T = x.unflatten(dim, (n_views, frames))
    return x_V_T.narrow(dim + 1, rank * local, local).flatten(dim, dim + 1)  # [..., V*T/cp, ...]


def gather_views(chunks, n_views, dim=2):
    """Inverse of shard_views: the cp rank chunks (in rank order) back to the full "(V T)" axis."""
    dim = dim % chunks[0].ndim
    if any(c.shape != chunks[0].shape for c in chunks):
        raise ValueError(f"gather_views: chunks differ in shape: {[tuple(c.shape) for c in chunks]}")
    _views_frames(chunks[0], n_views, 1, dim, "gather_views")
    parts = [c.unflatten(dim, (n_views, c.shape[dim] // n_views)) for c in chunks]
    return torch.cat(parts, dim=dim + 1).flatten(dim, dim + 1)  # [..., V*T, ...]


def all_gather_views(x, n_views, group, dim=2):
    """All-gather every rank's shard_views chunk into the full "(V T)" axis (no gradient)."""
    chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, x.contiguous(), group=group)
    return gather_views(chunks, n_views, dim)


# Whole views spread over a group (the VAE, which is causal in time, cannot work on a frame range):
# rank r takes views r, r + cp, ..., in slots 0, 1, ... of a [ceil(V / cp), ...] buffer.


def all_gather_spread_views(mine, n_views, group):
    """Every rank's slots of whole views -> all n_views [V, ...] in view order (view v: rank v % cp)."""
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine.contiguous(), group=group)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n_views]  # slot-major, rank-minor = view order
