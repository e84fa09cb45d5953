"""train.py's speed knobs: saved_attention_blocks (partial save_attention) and compile=True (torch.compile per block).

The attention forwards that backward re-runs are counted, eagerly with a dispatch mode and compiled with
the profiler (compiled code runs no Python per op), against the exact number the plan implies. The compiled
training step runs the bench's tiny setup through train.build_model (FSDP2) and train.train_step, against
the same steps run eagerly.
"""

import collections
import contextlib

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile

import attention
import bench
import train
from model import build_dit
from test_train import CountOps, demo_dit_inputs

SDPA_FWD = "aten::_scaled_dot_product_flash_attention_for_cpu"  # what F.scaled_dot_product_attention runs on CPU


def test_saved_attention_blocks_recompute_exactly_the_other_blocks():
    V = 3
    inputs = demo_dit_inputs(1, V)
    grads, calls = {}, {}
    for mode, saved in (("none", -1), ("save_attention", 0), ("save_attention", 1), ("save_attention", 3),
                        ("save_attention", -1)):
        torch.manual_seed(0)
        net = build_dit("demo", dtype=torch.float32)
        net.skip_empty_text = False
        train.apply_activation_checkpointing(net, mode, saved)
        with CountOps() as ops:
            net(*inputs, fps=torch.tensor([10.0])).square().mean().backward()
        grads[saved if mode != "none" else "none"] = [p.grad for p in net.parameters()]
        calls[saved if mode != "none" else "none"] = sum(
            n for k, n in ops.counts.items() if "attention" in k and "backward" not in k)
    L, per_block = len(net.blocks), 1 + V  # self-attention and one cross-attention per view
    assert L == 4
    # forward: every block once; backward: the blocks past the first N run all their attention again,
    # the first N only their cross-attentions (cheap, and as large as self-attention's output to keep)
    recompute = lambda n: (L - n) * per_block + n * V  # noqa: E731
    assert calls == {"none": L * per_block, 0: L * per_block + recompute(0), 1: L * per_block + recompute(1),
                     3: L * per_block + recompute(3), -1: L * per_block + recompute(L)}
    for saved in (0, 1, 3, -1):
        assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads[saved])), saved


def test_compile_and_partial_saving_settings_are_checked():
    c = train.resolve_config("waymo5views", ["saved_attention_blocks=14", "compile=True"])
    assert c["saved_attention_blocks"] == 14 and c["compile"] is True
    assert train.resolve_config("demo", ["activation_checkpointing=save_attention", "saved_attention_blocks=4"])
    for overrides, message in ((["activation_checkpointing=save_attention", "saved_attention_blocks=5"],
                                r"0\.\.4 \(model 'demo' has 4 blocks\)"),
                               (["activation_checkpointing=full", "saved_attention_blocks=2"],
                                "needs activation_checkpointing=save_attention"),
                               (["saved_attention_blocks=-2"], "-1 \\(all\\)")):
        with pytest.raises(ValueError, match=message):
            train.resolve_config("demo", overrides)


def _train_tiny(compile_, saved, steps=2, profile_last=False):
    """Steps of the bench's tiny setup through train.py (FSDP2 over one gloo rank); (losses, norms, weights, events)."""
    attention.set_backend("sdpa")
    config = bench.training_config("tiny", "save_attention", "none", "sdpa", saved_blocks=saved, compile=compile_)
    device = torch.device("cpu")
    net, trainable = train.build_model(config, device, init_device_mesh("cpu", (1,)), resuming=False)
    params = dict(net.named_parameters())
    trainable_params = [params[n] for n in trainable]
    ema = train.EMA([(n, params[n]) for n in trainable])
    optimizer, scheduler = train.build_optimizer(config, trainable_params)
    vae = bench.random_vae(config, device, torch.float32)
    losses, norms, events = [], [], None
    for it in range(steps):
        batch = bench.synthetic_batch(config, bench.SETUPS["tiny"]["n_views"], seed=it, device=device)
        last = profile_last and it == steps - 1
        with profile(activities=[ProfilerActivity.CPU]) if last else contextlib.nullcontext() as prof:
            loss, norm = train.train_step(net, vae, batch, optimizer, scheduler, ema, it, config, trainable_params,
                                          device, 0)
        if last:
            events = collections.Counter(e.name for e in prof.events())
        losses.append(loss)
        norms.append(norm)
    weights = {n: train._local(p.detach()).clone() for n, p in net.named_parameters()}  # one rank: whole
    return losses, norms, weights, events, len(net.blocks)


def test_compiled_training_step_equals_eager_and_keeps_the_attention_outputs():
    torch.set_num_threads(2)
    rank, world, device, created = train.setup_distributed()
    try:
        torch._dynamo.reset()  # compile here, whatever an earlier test compiled in this process
        eager = _train_tiny(False, saved=2)
        compiled = _train_tiny(True, saved=2, profile_last=True)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    (l_e, n_e, w_e, _, L), (l_c, n_c, w_c, events, _) = eager, compiled
    assert l_c == pytest.approx(l_e, rel=1e-5) and n_c == pytest.approx(n_e, rel=1e-4)
    assert w_c.keys() == w_e.keys()
    for k in w_e:  # after two AdamW steps (the second one from compiled gradients of updated weights)
        assert torch.allclose(w_c[k], w_e[k], rtol=1e-5, atol=1e-6), k
    # Every block ran compiled, forward and backward, as two graphs (save_attention and full blocks).
    assert events["CompiledFunction"] == L and events["CompiledFunctionBackward"] == L
    assert len([k for k in events if k.startswith("Torch-Compiled Region")]) == 2
    # Attention forwards: every block once, then again in the L - 2 fully checkpointed blocks, and the
    # cross-attentions (not kept) of the 2 save_attention blocks. Cross-attention runs for one view: the
    # caption's (the others have all-zero slots), or the same view when text dropout empties it.
    assert bench.SETUPS["tiny"]["n_views"] > 1
    assert events[SDPA_FWD] == (L + L - 2) * (1 + 1) + 2 * 1
    assert events[SDPA_FWD + "_backward"] == L * (1 + 1)


def test_compiled_blocks_keep_our_attention_op_and_never_trace_its_kernels(monkeypatch):
    """triton-cudnn backend (on the CPU: the custom ops around the reference math), compiled vs eager.

    The primitives must only ever see real tensors: torch.compile has to treat the forward and the backward
    as opaque ops (a kernel launch cannot run on the fake tensors of tracing). Counted calls: self-attention
    once each way, so save_attention keeps the op's output in the compiled blocks too.
    """
    calls = collections.Counter()
    forward, backward = attention.attention_forward, attention.attention_backward

    def counting(kind, fn):
        def wrapped(*tensors):
            calls[kind, type(tensors[0]) is torch.Tensor] += 1
            return fn(*tensors)
        return wrapped

    monkeypatch.setattr(attention, "attention_forward", counting("forward", forward))
    monkeypatch.setattr(attention, "attention_backward", counting("backward", backward))
    attention.set_backend("triton-cudnn")
    V = 2
    inputs = demo_dit_inputs(1, V)
    grads, counts = {}, {}
    try:
        for compiled in (False, True):
            torch.manual_seed(0)
            net = build_dit("demo", dtype=torch.float32)
            net.skip_empty_text = False
            train.apply_activation_checkpointing(net, "save_attention")
            if compiled:
                train.compile_blocks(net)
            calls.clear()
            net(*inputs, fps=torch.tensor([10.0])).square().mean().backward()
            grads[compiled], counts[compiled] = [p.grad for p in net.parameters()], dict(calls)
    finally:
        attention.set_backend("auto")
    L, per_block = len(net.blocks), 1 + V
    # forward: each attention once, plus the cross-attentions again in backward (save_attention keeps only
    # self-attention); backward: each once
    want = {("forward", True): L * per_block + L * V, ("backward", True): L * per_block}
    assert counts == {False: want, True: want}  # and never a call on a traced (fake) tensor
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
