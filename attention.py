"""Attention for the multiview DiT: one entry point, a float64 reference, Triton kernels, ring attention.

Layout everywhere is the model's own: q, k, v are [B, S, H, D] (no transposes around the call).
The softmax scale is 1/sqrt(D) and there is never a mask (the DiT attends to every token).

Sections, in reading order:
  1. entry point      attention(q, k, v): what model.py calls
  2. reference        plain PyTorch math returning (out, lse), and its backward; float64 in tests
  3. triton kernels   flash-attention forward/backward for CUDA (Hopper-tuned)
  4. ring attention   context parallelism over a process group, merging partials through the LSE
"""

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# 1. Entry point
# ---------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "sdpa", "triton", "reference")
_backend = "auto"  # 'auto': Triton kernels on CUDA when available, SDPA otherwise


def set_backend(name):
    """Choose the attention implementation globally ('auto', 'sdpa', 'triton', 'reference')."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def attention(q, k, v, backend=None):
    """Non-causal softmax attention on [B, S, H, D] tensors; returns [B, S_q, H, D]."""
    backend = backend or _backend
    if backend == "auto":
        backend = "triton" if (q.is_cuda and triton_available()) else "sdpa"
    if backend == "sdpa":
        # SDPA wants [B, H, S, D]; the transposes are views, SDPA handles the strides.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "triton":
        return flash_attention(q, k, v)
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
# 3. Triton kernels (filled in by the kernel work; until then the reference math stands in)
# ---------------------------------------------------------------------------------------------------


def triton_available():
    """True when the Triton flash-attention kernels can run here."""
    return False


def attention_forward(q, k, v):
    """Forward primitive used by ring attention: (out, lse) with lse [B, H, Sq] in fp32."""
    out, lse = reference_attention(q, k, v)
    return out, lse.float()


def attention_backward(dout, q, k, v, out, lse):
    """Backward primitive used by ring attention: (dq, dk, dv) in the inputs' dtype."""
    return reference_attention_backward(dout, q, k, v, out, lse.to(q.dtype))


def flash_attention(q, k, v):
    """Autograd-aware attention through the primitives above."""
    return attention_forward(q, k, v)[0]


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
# splits into a plain sum over K/V chunks of the primitive backward, with no renormalisation. dQ
# accumulates locally. The dK/dV of a chunk travel one hop behind it, gaining each rank's
# contribution, and after P hops land at the chunk's owner. All accumulation is fp32, including the
# dK/dV that travel (twice the bytes of bf16, but no rounding at every hop).
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


def _exchange_kv_sizes(q, k, v, group):
    """Sequence length of every rank's K/V chunk, after checking that B, H, D agree across ranks."""
    if k.shape != v.shape or q.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"ring_attention: need q [B,Sq,H,D] and k, v [B,Sk,H,D] of equal B, H, D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if group is None or dist.get_world_size(group) == 1:
        return (k.shape[1],)
    mine = torch.tensor(list(k.shape), dtype=torch.int64, device=k.device)  # [B, Sk, H, D]
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shapes = torch.stack(every).tolist()
    if any((b, h, d) != (shapes[0][0], shapes[0][2], shapes[0][3]) for b, _, h, d in shapes):
        raise ValueError(f"ring_attention: ranks disagree on (B, H, D); their k shapes are {shapes}")
    if any(s < 1 for _, s, _, _ in shapes):
        raise ValueError(f"ring_attention: every rank must hold at least one token; k shapes {shapes}")
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
    """Merge softmax partials over disjoint key sets: out fp32 [B,S,H,D], lse fp32 [B,H,S]."""
    if out is None:
        return out_s.float(), lse_s.float()
    new_lse = torch.logaddexp(lse, lse_s)  # stable: never exponentiates a positive number
    w_old = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1], each in [0, 1]
    w_new = torch.exp(lse_s - new_lse).transpose(1, 2).unsqueeze(-1)
    return out.mul_(w_old).add_(out_s.float() * w_new), new_lse


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


def _ring_backward(dout, q, k, v, out, lse, group, sizes):
    """Backward over the ring: (dq, dk, dv) of this rank's chunks, from the global out and lse."""
    rank, P, nxt, prv = _ring_layout(group)
    if P == 1:
        return attention_backward(dout, q, k, v, out, lse)
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
        dq_s, dk_s, dv_s = attention_backward(dout, q, kv[0], kv[1], out, lse)
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
        # Pass it on; what arrives next is the chunk we hold at the next step (after the last step:
        # our own chunk, complete).
        dkv_in = _kv_view(dkv_bufs[(step + 1) % 2], sizes[(rank - step - 1) % P], k)
        dkv_requests = _ring_step(dkv, dkv_in, nxt, prv, group, tag=2 * step + 1)
        if step < P - 1:
            _wait(kv_requests)
            kv = kv_next
    _wait(dkv_requests)
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Autograd wrapper: saves the global out and lse so the backward needs no recomputation."""

    @staticmethod
    def forward(ctx, q, k, v, group, sizes):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _ring_forward(q, k, v, group, sizes)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.sizes = group, sizes
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.group, ctx.sizes)
        return dq, dk, dv, None, None


def ring_attention_with_lse(q, k, v, group=None, kv_sizes=None):
    """Attention of local queries over the K/V of all ranks; returns (out [B,Sq,H,D], lse [B,H,Sq] fp32).

    q, k, v are this rank's chunks. kv_sizes, the K/V sequence length of every rank in group order,
    saves one all-gather (and a host sync) per call when the caller knows it. The lse is not
    differentiable. With group None or of size 1 this is plain attention through the primitives.
    """
    if kv_sizes is None:
        kv_sizes = _exchange_kv_sizes(q, k, v, group)
    return _RingAttention.apply(q, k, v, group, tuple(int(s) for s in kv_sizes))


def ring_attention(q, k, v, group=None, kv_sizes=None):
    """Context-parallel attention over a process group; returns this rank's out [B, Sq, H, D]."""
    return ring_attention_with_lse(q, k, v, group, kv_sizes)[0]


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
