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
