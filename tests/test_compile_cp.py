"""train.py compile=True with context parallelism: the compiled cp=2 training step equals the eager one.

Two gloo processes form one cp=2 group (dp=1) and run the bench's tiny setup (demo DiT, fp32, save_attention
with 2 of its 4 blocks keeping attention) through train.build_model (FSDP2) and train.train_step, first eagerly,
then with every block compiled. The ring's forward and backward are custom ops, so torch.compile must treat
them as opaque: no graph break, and the ring primitives (point-to-point exchanges) only ever see real tensors.
"""

import collections

import pytest
import torch

import attention
import bench
import train
from _dist import run_gloo

SAVED = 2  # blocks 0, 1 keep their attention outputs, blocks 2, 3 run the ring again in backward


def _steps(compile_, device, parallel, calls, steps=2):
    """Training steps on one cp rank; (losses, grad norms, local gradient shards of every step)."""
    mesh, cp_group, dp_rank, _ = parallel
    config = bench.training_config("tiny", "save_attention", "none", "sdpa", saved_blocks=SAVED, compile=compile_,
                                   cp=2)
    net, trainable = train.build_model(config, device, mesh, resuming=False)
    net.enable_context_parallel(cp_group)
    params = dict(net.named_parameters())
    trainable_params = [params[n] for n in trainable]
    ema = train.EMA([(n, params[n]) for n in trainable])
    optimizer, scheduler = train.build_optimizer(config, trainable_params)
    grads = []  # the gradients the optimizer is about to apply (train_step frees them afterwards)
    optimizer.register_step_pre_hook(
        lambda *_: grads.append([train._local(p.grad).clone() for p in trainable_params]))
    vae = bench.random_vae(config, device, torch.float32)
    losses, norms = [], []
    calls.clear()
    for it in range(steps):
        batch = bench.synthetic_batch(config, bench.SETUPS["tiny"]["n_views"], seed=it, device=device)
        loss, norm = train.train_step(net, vae, batch, optimizer, scheduler, ema, it, config, trainable_params,
                                      device, dp_rank)
        losses.append(loss)
        norms.append(norm)
    return dict(losses=losses, norms=norms, grads=grads, calls=dict(calls), blocks=len(net.blocks))


def _worker(rank, world, path):
    calls = collections.Counter()  # (primitive, called on a plain tensor rather than a traced one)
    forward, backward = attention._ring_forward, attention._ring_backward

    def counting(kind, fn):
        def wrapped(*args):
            calls[kind, all(type(t) is torch.Tensor for t in args if isinstance(t, torch.Tensor))] += 1
            return fn(*args)
        return wrapped

    attention._ring_forward, attention._ring_backward = counting("forward", forward), counting("backward", backward)
    attention.set_backend("sdpa")  # cross-attention; self-attention is the ring
    device = torch.device("cpu")
    parallel = train.setup_parallelism(device, world, cp=2)
    torch._dynamo.reset()
    eager = _steps(False, device, parallel, calls)
    before = bench.compile_stats()
    compiled = _steps(True, device, parallel, calls)
    after = bench.compile_stats()
    compiled["compile_stats"] = {k: after[k] - before[k] for k in after}
    torch.save(dict(eager=eager, compiled=compiled), f"{path}.{rank}")


def test_compile_with_cp_is_accepted():
    c = train.resolve_config("demo", ["compile=True", "num_frames=5", "cp=2"])
    assert c["compile"] is True and c["cp"] == 2


def test_compiled_cp2_training_step_equals_eager(tmp_path):
    run_gloo(_worker, 2, str(tmp_path / "r"))
    for rank in range(2):
        res = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        eager, compiled = res["eager"], res["compiled"]
        # One graph per checkpointing kind (save_attention and full blocks), nothing split by a graph break.
        assert compiled["compile_stats"] == {"graphs": 2, "graph_breaks": 0}
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
        assert compiled["norms"] == pytest.approx(eager["norms"], rel=1e-5)
        assert len(eager["grads"]) == len(compiled["grads"]) == 2
        for step_e, step_c in zip(eager["grads"], compiled["grads"]):
            assert len(step_e) == len(step_c) > 0
            assert any(g.abs().sum() > 0 for g in step_e)
            for g_e, g_c in zip(step_e, step_c):
                assert torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-6)
        # Per step: the ring forward once per block plus again in the fully checkpointed blocks' backward,
        # the ring backward once per block; all on real tensors, compiled as eagerly.
        L = eager["blocks"]
        want = {("forward", True): 2 * (L + L - SAVED), ("backward", True): 2 * L}
        assert eager["calls"] == want and compiled["calls"] == want, rank
