"""The training objective, LR schedule and EMA of train.py against float64 formulas and the goldens."""

import math
import os

import numpy as np
import pytest
import torch

import train
from model import SIGMA_CONDITIONAL

GOLDEN = torch.load(os.path.join(os.path.dirname(__file__), "golden", "sampler.pt"), weights_only=True)
CONFIG = train.resolve_config("waymo5views")


class StubNet(torch.nn.Module):
    """A fixed nonlinear function of everything the DiT sees; records its inputs."""

    def __init__(self, C=16):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.mix = torch.randn(C, C, generator=g) / C ** 0.5
        self.seen = {}

    def forward(self, x, timesteps_B_T, context, mask, fps=None, view_indices_B_T=None):
        self.seen = dict(x=x, t=timesteps_B_T, context=context, mask=mask, views=view_indices_B_T, fps=fps)
        out = torch.einsum("dc,bcthw->bdthw", self.mix, x).tanh()
        out = out * (1 + timesteps_B_T[:, None, :, None, None]) + context.mean((1, 2))[:, None, None, None, None]
        return out + mask


def make_batch(B=3, V=2, T=3, H=4, W=6, D=8):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 16, V * T, H, W, generator=g)
    context = torch.randn(B, V * 512, D, generator=g)
    views = torch.tensor([4, 0]).repeat_interleave(T)[None].expand(B, -1)
    noise = dict(sigma=torch.tensor([0.03, 2.5, 3e4]), eps=torch.randn(B, 16, V * T, H, W, generator=g),
                 n_cond=torch.tensor([1, 0, 1]), keep=torch.tensor([True, False, True]))
    return x0, context, views, torch.full((B,), 10.0), noise, V


def test_loss_equals_official_x0_form_in_float64():
    """10 * mean((F - (eps - x0))^2 (1 - mask)) == 10 * mean(w(sigma) (x0 - x0_pred)^2), w = (1+s)^2/s^2."""
    x0, context, views, fps, noise, V = make_batch()
    net = StubNet()
    loss = train.diffusion_loss(net, x0, context, views, fps, noise, V, loss_scale=10.0)
    seen = net.seen
    F = net(seen["x"], seen["t"], seen["context"], seen["mask"], fps=fps).double()  # what the net returned

    # the official computation, written out in float64
    B, C, T, H, W = x0.shape
    x0d, eps = x0.double(), noise["eps"].double()
    sigma = noise["sigma"].double().view(B, 1, 1, 1, 1)
    mask = torch.zeros(B, 1, T, H, W, dtype=torch.float64)
    for b in range(B):
        for v in range(V):
            mask[b, :, v * (T // V): v * (T // V) + int(noise["n_cond"][b])] = 1
    t = sigma / (1 + sigma)
    c_skip, c_out = 1 - t, -t
    xt = x0d + sigma * eps
    x0_pred = c_skip * xt + c_out * F
    x0_pred = x0d * mask + x0_pred * (1 - mask)  # frame replacement
    w = (1 + sigma) ** 2 / sigma ** 2
    ref = 10.0 * (w * (x0d - x0_pred) ** 2).mean()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 2e-6 * ref.item()


def test_net_inputs_follow_preconditioning_and_frame_conditioning():
    """Clean latents on conditional frames at t(1e-4); (1-t) xt elsewhere at t(sigma); views, fps passed."""
    x0, context, views, fps, noise, V = make_batch()
    net = StubNet()
    train.diffusion_loss(net, x0, context, views, fps, noise, V, loss_scale=10.0)
    B, C, T, H, W = x0.shape
    sigma = noise["sigma"].double()
    t_noisy = sigma / (1 + sigma)
    t_cond = SIGMA_CONDITIONAL / (1 + SIGMA_CONDITIONAL)
    for b in range(B):
        for f in range(T):
            cond = f % (T // V) < int(noise["n_cond"][b])
            want_x = x0[b, :, f].double() if cond else \
                (x0[b, :, f].double() + sigma[b] * noise["eps"][b, :, f].double()) * (1 - t_noisy[b])
            # c_in = 1 - t in float32 (as the reference computes it) cancels: relative error ~ 6e-8 (1 + sigma)
            tol = 1e-6 + 1.2e-7 * (1 + sigma[b].item())
            assert torch.allclose(net.seen["x"][b, :, f].double(), want_x, rtol=tol, atol=tol)
            assert net.seen["mask"][b, 0, f].eq(float(cond)).all()
            assert abs(net.seen["t"][b, f].item() - (t_cond if cond else t_noisy[b].item())) < 1e-6
    assert torch.equal(net.seen["views"], views) and torch.equal(net.seen["fps"], fps)


def test_text_dropout_zeroes_the_whole_caption_of_dropped_samples_only():
    x0, context, views, fps, noise, V = make_batch()
    net = StubNet()
    train.diffusion_loss(net, x0, context, views, fps, noise, V, loss_scale=10.0)
    for b, keep in enumerate(noise["keep"].tolist()):
        assert torch.equal(net.seen["context"][b], context[b] if keep else torch.zeros_like(context[b]))


def test_conditional_frames_do_not_contribute_but_count_in_the_mean():
    """Changing the prediction on conditional frames leaves the loss unchanged; the mean spans all elements."""
    x0, context, views, fps, noise, V = make_batch()
    noise["n_cond"] = torch.tensor([1, 1, 1])

    class Shifted(StubNet):
        def forward(self, x, t, context, mask, **kw):
            return super().forward(x, t, context, mask, **kw) + 100.0 * mask

    base = train.diffusion_loss(StubNet(), x0, context, views, fps, noise, V, loss_scale=10.0)
    shifted = train.diffusion_loss(Shifted(), x0, context, views, fps, noise, V, loss_scale=10.0)
    assert torch.equal(base, shifted)
    # a zero net: error is (eps - x0) on the noisy frames only, divided by ALL elements
    zero = lambda x, *a, **k: torch.zeros_like(x)  # noqa: E731
    loss = train.diffusion_loss(zero, x0, context, views, fps, noise, V, loss_scale=10.0)
    mask = train.conditional_mask(noise["n_cond"], V, x0.shape)
    ref = 10.0 * (((noise["eps"] - x0).double() ** 2) * (1 - mask.double())).sum() / x0.numel()
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


def test_conditional_mask_marks_first_frames_of_every_view():
    mask = train.conditional_mask(torch.tensor([0, 1, 2]), 3, (3, 16, 12, 2, 2))
    frames = mask[:, 0, :, 0, 0]
    assert frames.shape == (3, 12)
    assert frames[0].sum() == 0
    assert frames[1].tolist() == [1, 0, 0, 0] * 3
    assert frames[2].tolist() == [1, 1, 0, 0] * 3


def test_sigma_distribution_moments():
    """log sigma ~ N(ln sqrt(8), 1) w.p. 0.95, else U(ln 200, ln 1e5); 0/1 cond frames 50/50; text kept 80%."""
    n = 20000
    d = train.draw_training_noise(CONFIG, (1, 5 * 8, 1, 1), 5, iteration=3, sample_ids=range(n), device="cpu")
    log_s = d["sigma"].double().log()
    high = d["sigma"] >= 200  # the normal part reaches 200 with probability ~1e-5
    p = high.double().mean().item()
    assert abs(p - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    low = log_s[~high]
    se = 1 / math.sqrt(low.numel())
    assert abs(low.mean().item() - math.log(math.sqrt(8))) < 4 * se
    assert abs(low.std().item() - 1.0) < 4 * se * math.sqrt(0.5) + 1e-3
    a, b = math.log(200), math.log(1e5)
    hi = log_s[high]
    assert hi.min() >= a - 1e-6 and hi.max() <= b + 1e-6
    sd = (b - a) / math.sqrt(12)
    assert abs(hi.mean().item() - (a + b) / 2) < 4 * sd / math.sqrt(hi.numel())
    assert abs(hi.std().item() - sd) < 0.1 * sd
    q = d["n_cond"].double()
    assert set(q.unique().tolist()) == {0.0, 1.0} and abs(q.mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)
    assert abs(d["keep"].double().mean().item() - 0.8) < 4 * math.sqrt(0.16 / n)
    e = d["eps"].double()
    assert abs(e.mean().item()) < 4 / math.sqrt(e.numel()) and abs(e.std().item() - 1) < 0.02


def test_draws_depend_on_seed_iteration_and_global_sample_only():
    """The same global sample gets the same draws in any batch composition (1 rank x 2 == 2 ranks x 1)."""
    shape = (16, 6, 2, 2)
    both = train.draw_training_noise(CONFIG, shape, 2, iteration=5, sample_ids=[0, 1], device="cpu")
    second = train.draw_training_noise(CONFIG, shape, 2, iteration=5, sample_ids=[1], device="cpu")
    for key in both:
        assert torch.equal(both[key][1:], second[key])
    other = train.draw_training_noise(CONFIG, shape, 2, iteration=6, sample_ids=[1], device="cpu")
    assert not torch.equal(other["eps"], second["eps"])


def test_lr_schedule_matches_golden_and_holds_past_the_end():
    g = GOLDEN["lr"]
    cfg = g["config"]
    assert CONFIG["lr"] == pytest.approx(g["base_lr"], rel=1e-12)
    assert CONFIG["weight_decay"] == g["weight_decay"]
    assert (CONFIG["warmup_iters"], CONFIG["decay_iters"]) == (cfg["warm_up_steps"][0], cfg["cycle_lengths"][0])
    assert (CONFIG["lr_f_start"], CONFIG["lr_f_max"], CONFIG["lr_f_min"]) == \
        (cfg["f_start"][0], cfg["f_max"][0], cfg["f_min"][0])
    f = lambda n: train.lr_multiplier(n, CONFIG["warmup_iters"], CONFIG["decay_iters"], CONFIG["lr_f_start"],  # noqa
                                      CONFIG["lr_f_max"], CONFIG["lr_f_min"])
    for n, want in zip(g["iterations"], g["multiplier"]):
        assert f(n) == pytest.approx(want, rel=1e-9), n
    assert f(40001) == f(100_000) == cfg["f_min"][0]  # the reference is undefined there: we hold f_min


def test_ema_gamma_and_beta_match_golden():
    g = GOLDEN["ema"]
    assert CONFIG["ema_rate"] == g["rate"] and g["iteration_shift"] == 0
    assert train.ema_gamma(g["rate"]) == pytest.approx(g["gamma"], rel=1e-9)
    for it, want in zip(g["iterations"], g["beta"]):
        got = train.ema_beta(it, g["rate"])
        assert got == want if want == 0 else got == pytest.approx(want, rel=1e-9)


def test_ema_update_is_the_power_average():
    """After steps 0..k with params p_i, the EMA is the float64 recursion with beta(i); step 0 copies."""
    p = torch.nn.Parameter(torch.zeros(5))
    ema = train.EMA([("w", p)])
    ref = np.zeros(5)
    rng = np.random.default_rng(0)
    for it in range(6):
        value = rng.standard_normal(5)
        p.data.copy_(torch.from_numpy(value))
        ema.update(train.ema_beta(it, 0.1))
        b = train.ema_beta(it, 0.1)
        ref = b * ref + (1 - b) * value.astype(np.float32)
    assert np.allclose(ema.full_state_dict()["w"].numpy(), ref, rtol=1e-6, atol=1e-7)
    with ema.swapped_in(torch.nn.ParameterList([p])):
        assert torch.equal(p.data, ema.shadow[0])
    assert torch.equal(p.data, torch.from_numpy(value).float())


def _ema_samples_worker(rank, world):
    from model import build_dit
    from test_train import demo_dit_inputs

    torch.manual_seed(0)
    config = train.resolve_config("demo", ["height=32", "width=48", "num_frames=5"])
    mesh, *_ = train.setup_parallelism(torch.device("cpu"), world, 1)
    net, trainable = train.build_model(config, torch.device("cpu"), mesh, resuming=False)
    params = dict(net.named_parameters())
    ema = train.EMA([(n, params[n]) for n in trainable])
    g = torch.Generator().manual_seed(3)
    for s in ema.shadow:  # an EMA clearly unlike the weights
        train._local(s).add_(0.05 * torch.randn(train._local(s).shape, generator=g))
    x, t, ctx, mask = demo_dit_inputs(1, V=2)
    kw = dict(fps=torch.tensor([10.0]), view_indices_B_T=torch.tensor([[0, 0, 1, 1]]))
    net(x, t, ctx, mask, **kw).square().mean().backward()  # a training step first, as in the loop
    with torch.no_grad():
        reg = net(x, t, ctx, mask, **kw)  # write_samples: the regular weights' samples first
        with ema.swapped_in(net):
            got = net(x, t, ctx, mask, **kw)
        reg_after = net(x, t, ctx, mask, **kw)
    plain = build_dit("demo", dtype=torch.float32)
    plain.skip_empty_text = False
    plain.load_state_dict(ema.full_state_dict())
    with torch.no_grad():
        want = plain(x, t, ctx, mask, **kw)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    assert torch.equal(reg_after, reg)  # the training weights are back, in every module


def test_ema_samples_use_only_ema_weights_under_fsdp():
    """FSDP2 leaves the root and last block gathered after a no-grad forward; the EMA swap must reach them."""
    from _dist import run_gloo

    run_gloo(_ema_samples_worker, 2)


def test_gradient_clipping_zeroes_non_finite_and_scales_to_max_norm(tmp_path):
    """Global norm over all gradients (after zeroing NaN/Inf) and scale min(1, max / (norm + 1e-6))."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        a.grad = torch.tensor([3.0, float("nan"), 0.0])
        b.grad = torch.tensor([float("inf"), 4.0])
        norm = train.clip_gradients([a, b], 1.0, torch.device("cpu"))
        assert norm == pytest.approx(5.0)
        assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)
        assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]), atol=1e-6)
        a.grad, b.grad = torch.tensor([0.3, 0.0, 0.0]), torch.tensor([0.0, 0.4])
        assert train.clip_gradients([a, b], 1.0, torch.device("cpu")) == pytest.approx(0.5)
        assert torch.equal(a.grad, torch.tensor([0.3, 0.0, 0.0]))  # below the limit: untouched
    finally:
        dist.destroy_process_group()
