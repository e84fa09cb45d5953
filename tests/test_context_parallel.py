"""The DiT under context parallelism (ring attention over 2 gloo processes) equals the 1-rank model.

Each rank holds latent frames [r*T/cp, (r+1)*T/cp) of every view (shard_views); the stitched outputs
and the summed parameter gradients must equal the unsharded forward/backward.
"""

import torch
import torch.distributed as dist
from _dist import run_gloo

from attention import gather_views, shard_views
from model import build_dit

V, T, H, W = 3, 4, 8, 8  # 3 views x 4 latent frames, 8x8 latent


def _inputs():
    g = torch.Generator().manual_seed(0)
    ctx = torch.zeros(1, V * 512, 64)
    ctx[:, 512:512 + 9] = torch.randn(1, 9, 64, generator=g)
    mask = torch.zeros(1, 1, V * T, H, W)
    mask[:, :, ::T] = 1
    return dict(x=torch.randn(1, 16, V * T, H, W, generator=g), t=torch.rand(1, V * T, generator=g),
                ctx=ctx, mask=mask, views=torch.tensor([4, 5, 0]).repeat_interleave(T)[None],
                grad_out=torch.randn(1, 16, V * T, H, W, generator=g))


def _model():
    torch.manual_seed(0)
    model = build_dit("tiny", dtype=torch.float32, n_cameras_emb=7)
    for p in model.parameters():  # non-trivial AdaLN (the official init zeroes it)
        torch.nn.init.normal_(p, std=0.05)
    return model


def _forward_backward(model, inp, rank=0, cp=1):
    sh = lambda x, dim: shard_views(x, V, rank, cp, dim=dim)  # noqa: E731
    out = model(sh(inp["x"], 2), sh(inp["t"], 1), inp["ctx"], sh(inp["mask"], 2), fps=torch.tensor([10.0]),
                view_indices_B_T=sh(inp["views"], 1))
    (out * sh(inp["grad_out"], 2)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, path):
    model = _model()
    model.enable_context_parallel(dist.group.WORLD)
    out, grads = _forward_backward(model, _inputs(), rank, world)
    for g in grads.values():
        dist.all_reduce(g)  # each rank's gradient covers its own tokens: the sum is the full gradient
    torch.save({"out": out, "grads": grads}, f"{path}.{rank}")


def test_dit_cp2_equals_cp1(tmp_path):
    ref_out, ref_grads = _forward_backward(_model(), _inputs())
    run_gloo(_worker, 2, str(tmp_path / "res"))
    results = [torch.load(tmp_path / f"res.{r}", weights_only=True) for r in range(2)]
    out = gather_views([r["out"] for r in results], V, dim=2)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref_out) < 1e-5
    for name, ref in ref_grads.items():
        assert rel(results[0]["grads"][name], ref) < 1e-5, name


def _checkpoint_worker(rank, world, path):
    import attention
    import train

    calls = []
    ring_forward = attention._ring_forward

    def counting(*args):
        calls.append(1)
        return ring_forward(*args)

    attention._ring_forward = counting
    model = _model()
    model.enable_context_parallel(dist.group.WORLD)
    train.apply_activation_checkpointing(model, "save_attention")
    out, grads = _forward_backward(model, _inputs(), rank, world)
    for g in grads.values():
        dist.all_reduce(g)
    torch.save({"out": out, "grads": grads, "ring_forwards": len(calls)}, f"{path}.{rank}")


def test_selective_checkpointing_keeps_the_ring_output(tmp_path):
    """Under save_attention the ring runs once per block (not again in backward), same result."""
    ref_out, ref_grads = _forward_backward(_model(), _inputs())
    run_gloo(_checkpoint_worker, 2, str(tmp_path / "res"))
    results = [torch.load(tmp_path / f"res.{r}", weights_only=True) for r in range(2)]
    assert [r["ring_forwards"] for r in results] == [len(_model().blocks)] * 2
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(gather_views([r["out"] for r in results], V, dim=2), ref_out) < 1e-5
    for name, ref in ref_grads.items():
        assert rel(results[0]["grads"][name], ref) < 1e-5, name
