"""Ring attention over NCCL on 2 GPUs (skipped with fewer): the kernels and the P2P ring as training runs them.

The gloo tests (test_ring_attention.py) check the ring's math on the CPU with the reference primitives;
here each rank runs attention.py's GPU kernels (the Gluon forward on Hopper, the Triton backward) in bf16 on its chunk of a ragged sequence (or cuDNN's backward per chunk, as `auto` picks), the chunks travel by NCCL send/recv, and the stitched output,
LSE and gradients are compared with float64 attention on the whole sequence, against the error that
PyTorch's SDPA makes in bf16 on the same inputs (x 1.5, as the kernel tests).
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attention  # noqa: E402
from _dist import run_nccl  # noqa: E402
from test_ring_attention import _reference, _rel_err  # noqa: E402  (float64 attention by autograd)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2 or not attention.triton_available(),
                                reason="needs 2 CUDA GPUs with the Triton kernels")

B, H, D = 1, 4, 128
SIZES = [1500, 2013]  # ragged chunks: neither a multiple of the 128-row tiles


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, sum(SIZES), H, D, generator=g) for _ in range(4))
    return q, k, v, dout


def _worker(rank, world, out_dir, cudnn_backward):
    dev = torch.device("cuda", rank)
    q, k, v, dout = (x.split(SIZES, dim=1)[rank].to(dev, torch.bfloat16).contiguous() for x in _inputs())
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = attention.ring_attention_with_lse(q, k, v, dist.group.WORLD, cudnn_backward=cudnn_backward)
    out.backward(dout)
    torch.save({"out": out.detach().cpu(), "lse": lse.cpu(), "dq": q.grad.cpu(), "dk": k.grad.cpu(),
                "dv": v.grad.cpu()}, Path(out_dir) / f"rank{rank}.pt")


def _sdpa_errors(q, k, v, dout, ref):
    """Relative errors of PyTorch's SDPA in bf16 on one GPU (what a user would otherwise run)."""
    q, k, v = (x.cuda().bfloat16().transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(dout.cuda().bfloat16().transpose(1, 2))
    got = {"out": out.transpose(1, 2), "dq": q.grad.transpose(1, 2), "dk": k.grad.transpose(1, 2),
           "dv": v.grad.transpose(1, 2)}
    return {key: _rel_err(got[key].cpu(), ref[key]) for key in got}


@pytest.mark.parametrize("cudnn_backward", [False, True])  # chunks' backward: ours, or cuDNN's (auto)
def test_ring_over_nccl_matches_float64(cudnn_backward, tmp_path):
    run_nccl(_worker, 2, str(tmp_path), cudnn_backward)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    q, k, v, dout = (x.bfloat16().float() for x in _inputs())  # the bf16 values the ranks saw
    ref = _reference(q, k, v, dout)
    sdpa = _sdpa_errors(q, k, v, dout, ref)
    for key in ("out", "dq", "dk", "dv"):
        got = torch.cat([r[key] for r in ranks], dim=1)
        assert got.shape == ref[key].shape and got.dtype == torch.bfloat16
        err = _rel_err(got, ref[key])
        assert err <= 1.5 * sdpa[key], f"cudnn_backward={cudnn_backward} {key}: {err:.2e} vs SDPA {sdpa[key]:.2e}"
    lse = torch.cat([r["lse"] for r in ranks], dim=2)
    assert (lse.double() - ref["lse"]).abs().max() < 1e-2  # fp32 LSE of bf16 inputs
