"""Ring attention (attention.py section 4) against full attention on the gathered sequence.

Distributed cases spawn 2 and 4 CPU processes on the gloo backend. Each rank saves its local output,
LSE and gradients; the test process stitches them together and compares them with float64 softmax
attention (autograd for the gradients) written here, independent of attention.py.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attention  # noqa: E402
from _dist import run_gloo  # noqa: E402

# Relative error (Frobenius norm) allowed against the float64 reference. bf16 carries 8 bits of
# mantissa; its bound is there to catch wiring mistakes on the bf16 path (the last dK/dV hop travels
# in the inputs' dtype), not to grade rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
F32, BF16 = torch.float32, torch.bfloat16

# name -> (B, H, D, q chunk sizes, k/v chunk sizes, pass kv_sizes explicitly, dtype)
CASES_2 = {
    "equal": (2, 3, 16, [24, 24], [24, 24], False, F32),
    "ragged": (1, 2, 32, [7, 33], [7, 33], False, F32),
    "ragged_known_sizes": (2, 2, 8, [13, 4], [13, 4], True, F32),
    "q_and_kv_differ": (1, 2, 16, [3, 9], [8, 5], False, F32),
    "bf16": (1, 2, 16, [10, 22], [10, 22], False, BF16),
}
CASES_4 = {
    "equal": (1, 2, 16, [16, 16, 16, 16], [16, 16, 16, 16], False, F32),
    "ragged": (2, 3, 16, [5, 19, 1, 11], [5, 19, 1, 11], False, F32),
}
SUBGROUPS_4 = [[0, 2], [1, 3]]  # two independent rings over a 4-process world
SUBGROUP_CASE = (1, 2, 16, [9, 14], [9, 14], False, F32)


def _inputs(seed, B, H, D, q_sizes, kv_sizes, dtype):
    """Full-sequence q, k, v and an upstream gradient in dtype, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, sum(q_sizes), H, D, generator=g)
    k = torch.randn(B, sum(kv_sizes), H, D, generator=g)
    v = torch.randn(B, sum(kv_sizes), H, D, generator=g)
    dout = torch.randn(B, sum(q_sizes), H, D, generator=g)
    return tuple(x.to(dtype) for x in (q, k, v, dout))


def _local(x, sizes, i):
    """Chunk i of a [B, S, ...] tensor split along S into the given sizes."""
    return x.split(sizes, dim=1)[i].contiguous()


def _run_case(seed, case, group, group_rank):
    """Ring attention on this rank's chunks; returns local out, lse and gradients."""
    B, H, D, q_sizes, kv_sizes, known, dtype = case
    q, k, v, dout = _inputs(seed, B, H, D, q_sizes, kv_sizes, dtype)
    q, k, v = (_local(x, s, group_rank).requires_grad_() for x, s in ((q, q_sizes), (k, kv_sizes), (v, kv_sizes)))
    out, lse = attention.ring_attention_with_lse(q, k, v, group, kv_sizes if known else None)
    out.backward(_local(dout, q_sizes, group_rank))
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _worker(rank, world, out_dir):
    """One process of the gloo job: run every case and save the local results."""
    results = {}
    cases = CASES_2 if world == 2 else CASES_4
    for i, (name, case) in enumerate(cases.items()):
        results[name] = _run_case(i, case, dist.group.WORLD, rank)
    if world == 4:
        groups = [dist.new_group(ranks) for ranks in SUBGROUPS_4]  # every rank creates every group
        mine = next(i for i, ranks in enumerate(SUBGROUPS_4) if rank in ranks)
        results["subgroup"] = _run_case(100 + mine, SUBGROUP_CASE, groups[mine], SUBGROUPS_4[mine].index(rank))
    # shard_views -> all_gather_views round trip on a BCTHW latent with 3 views x 4 frames.
    x = torch.randn(2, 5, 3 * 4, 3, 2, generator=torch.Generator().manual_seed(7))
    results["all_gather_views"] = attention.all_gather_views(
        attention.shard_views(x, 3, rank, world), 3, dist.group.WORLD)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _reference(q, k, v, dout):
    """Float64 softmax attention on the full sequence: out, lse [B,H,S], dq, dk, dv by autograd."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    out.backward(dout.double())
    return {"out": out.detach(), "lse": torch.logsumexp(scores, -1).detach(), "dq": q.grad, "dk": k.grad,
            "dv": v.grad}


def _rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _check(name, seed, case, per_rank):
    """Stitch the ranks' chunks together and compare with the float64 reference."""
    B, H, D, q_sizes, kv_sizes, _, dtype = case
    ref = _reference(*_inputs(seed, B, H, D, q_sizes, kv_sizes, dtype))
    got = {key: torch.cat([r[key] for r in per_rank], dim=2 if key == "lse" else 1) for key in ref}
    for key in ref:
        assert got[key].dtype == (torch.float32 if key == "lse" else dtype), (name, key, got[key].dtype)
        assert got[key].shape == ref[key].shape, (name, key, got[key].shape, ref[key].shape)
        err = _rel_err(got[key], ref[key])
        assert err <= TOL[dtype], f"{name}: {key} relative error {err:.2e} > {TOL[dtype]}"


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_full_attention(world, tmp_path):
    """Output, LSE and gradients of the ring equal full attention on the gathered sequence."""
    run_gloo(_worker, world, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    cases = CASES_2 if world == 2 else CASES_4
    for i, (name, case) in enumerate(cases.items()):
        _check(name, i, case, [r[name] for r in results])
    if world == 4:
        for g, ranks in enumerate(SUBGROUPS_4):
            _check(f"subgroup{g}", 100 + g, SUBGROUP_CASE, [results[r]["subgroup"] for r in ranks])
    x = torch.randn(2, 5, 3 * 4, 3, 2, generator=torch.Generator().manual_seed(7))
    for r in range(world):
        assert torch.equal(results[r]["all_gather_views"], x)


def _cudnn_backward_worker(rank, world, out_dir):
    """The ring with cudnn_backward=True: every chunk's gradients go through attention._cudnn_backward."""
    calls = []
    cudnn = attention._cudnn_backward

    def counting(*args):
        calls.append(args[2].shape[1])  # the key chunk's length
        return cudnn(*args)  # on the CPU: our primitive (cuDNN needs a GPU)

    attention._cudnn_backward = counting
    case = CASES_2["ragged"]
    B, H, D, q_sizes, kv_sizes, _, dtype = case
    q, k, v, dout = _inputs(1, B, H, D, q_sizes, kv_sizes, dtype)
    q, k, v = (_local(x, s, rank).requires_grad_() for x, s in ((q, q_sizes), (k, kv_sizes), (v, kv_sizes)))
    out, lse = attention.ring_attention_with_lse(q, k, v, dist.group.WORLD, cudnn_backward=True)
    out.backward(_local(dout, q_sizes, rank))
    torch.save({"res": {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad},
                "calls": calls}, Path(out_dir) / f"rank{rank}.pt")


def test_ring_backward_can_run_cudnn_per_chunk(tmp_path):
    """With cudnn_backward (what backend triton-cudnn / auto on Hopper selects) each of the P chunks'
    backward goes to the cuDNN path, fed the global out and lse, and the gradients stay exact."""
    run_gloo(_cudnn_backward_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _, _, _, q_sizes, kv_sizes, _, _ = CASES_2["ragged"]
    for r, res in enumerate(results):  # rank r sees its own chunk, then the previous rank's
        assert res["calls"] == [kv_sizes[r], kv_sizes[(r - 1) % 2]], (r, res["calls"])
    _check("ragged via cudnn_backward", 1, CASES_2["ragged"], [res["res"] for res in results])
    assert attention.resolve_backend(torch.zeros(1, 4, 2, 64)) == "sdpa"  # auto on the CPU: no kernels


def test_no_group_is_plain_attention():
    """group=None runs the primitives directly and still matches the reference, gradients included."""
    case = (2, 2, 16, [11], [11], False, F32)
    ref = _reference(*_inputs(3, *case[:5], F32))
    got = _run_case(3, case, None, 0)
    for key in ref:
        assert _rel_err(got[key], ref[key]) <= TOL[F32], key


def test_merge_partials_is_stable_for_far_apart_lse():
    """Merging two halves whose scores differ by ~1e4 gives the softmax over the union, no inf/nan."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 12, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 12, 2, 8, generator=g, dtype=torch.float64)
    k[:, 6:] *= 3000.0  # second half dominates the softmax by a huge margin
    ref_out, ref_lse = attention.reference_attention(q, k, v)
    out, lse = None, None
    for ks, vs in zip(k.split(6, 1), v.split(6, 1)):
        out, lse = attention._merge_partials(out, lse, *attention.attention_forward(q, ks, vs))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel_err(out, ref_out) <= 1e-6 and _rel_err(lse, ref_lse) <= 1e-6  # the merge runs in fp32


def test_shard_views_holds_the_right_frames():
    """Rank r gets frames [r*T/cp, (r+1)*T/cp) of every view, view-major; gather_views inverts it."""
    V, T, cp = 3, 8, 4
    view_id = torch.arange(V).repeat_interleave(T)  # "(V T)" axis: view of each frame
    frame_id = torch.arange(T).repeat(V)  # and the frame index inside its view
    x_BCTHW = torch.stack([view_id, frame_id])[None, :, :, None, None].expand(2, 2, V * T, 3, 4)
    chunks = [attention.shard_views(x_BCTHW, V, r, cp) for r in range(cp)]
    for r, c in enumerate(chunks):
        assert c.shape == (2, 2, V * T // cp, 3, 4)
        want_view = torch.arange(V).repeat_interleave(T // cp)
        want_frame = torch.arange(r * T // cp, (r + 1) * T // cp).repeat(V)
        assert torch.equal(c[0, 0, :, 0, 0], want_view) and torch.equal(c[0, 1, :, 0, 0], want_frame)
    assert torch.equal(attention.gather_views(chunks, V), x_BCTHW)
    # Token layout [B, (V T), h, w, D] shards along dim 1 the same way.
    tokens = torch.randn(1, V * T, 2, 3, 4)
    parts = [attention.shard_views(tokens, V, r, cp, dim=1) for r in range(cp)]
    assert torch.equal(attention.gather_views(parts, V, dim=1), tokens)
    assert torch.equal(parts[1][:, T // cp: 2 * T // cp], tokens[:, T + 2: T + 4])  # view 1, frames 2..3


def test_shard_views_errors():
    """Latent frames that do not divide over cp, or a frame axis not divisible by views, are clear errors."""
    x = torch.zeros(1, 16, 5 * 8, 2, 2)
    with pytest.raises(ValueError, match="8 latent frames per view do not split evenly over cp=3"):
        attention.shard_views(x, 5, 0, 3)
    with pytest.raises(ValueError, match="not a multiple of n_views=3"):
        attention.shard_views(x, 3, 0, 2)
    with pytest.raises(ValueError, match="rank 4 outside"):
        attention.shard_views(x, 5, 4, 4)


def test_ring_attention_shape_errors():
    """Mismatched q/k/v shapes are reported before any communication."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="ring_attention"):
        attention.ring_attention(q, torch.zeros(1, 4, 2, 8), torch.zeros(1, 5, 2, 8))
    with pytest.raises(ValueError, match="ring_attention"):
        attention.ring_attention(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
    with pytest.raises(ValueError, match="dtypes differ"):
        attention.ring_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="kv_sizes"):
        attention.ring_attention(q, q, q, kv_sizes=[5])
