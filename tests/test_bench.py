"""bench.py: the --tiny CPU run end to end, its FLOP model against PyTorch's FLOP counter, offload exactness."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attention
import bench
import model
import train
from _dist import run_gloo
from test_train import demo_dit_inputs
from model import build_dit, dit_config


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    md = out.with_suffix(".md")
    res = bench.main(["--tiny", "--out", str(out), "--md", str(md)])
    return res, json.loads(out.read_text()), md.read_text()


def test_tiny_run_reports_sane_numbers(tiny_report):
    res, saved, md = tiny_report
    assert saved["training"] == json.loads(json.dumps(res["training"], default=str))  # the file is the report
    assert not res.get("errors")
    assert res["gemm"]["tflops"] > 0
    assert {r["backend"] for r in res["training"]} == {"sdpa", "reference"}
    for r in res["training"]:
        m = r["median"]
        assert all(m[k] >= 0 for k in ("data", "vae", "forward_backward", "optimizer"))
        assert m["total"] > 0 and m["forward_backward"] > 0 and m["vae"] > 0
        for it in r["iterations"]:  # the phases tile the iteration
            parts = it["data"] + it["vae"] + it["forward_backward"] + it["optimizer"]
            assert parts <= it["total"] * 1.05 + 1e-3 and parts >= it["total"] * 0.8
            assert math.isfinite(it["loss"]) and it["loss"] > 0
        assert r["iters"] == 2 and r["warmup"] == 1 and len(r["iterations"]) == 3
        assert r["model_flops"] == pytest.approx(3 * r["forward_flops"]["total"])
        assert r["hardware_flops"] > 0.5 * r["model_flops"]  # tiny: the skipped cross-attention is a large share
        assert 0 < r["attention_share"] < 1 and r["peak_mem_gib"] > 0
    # same seeds, same data: the two attention backends train the same numbers
    a, b = res["training"]
    assert [it["loss"] for it in a["iterations"]] == pytest.approx([it["loss"] for it in b["iterations"]], rel=1e-4)
    for row in res["kernels"]:
        assert all(row[i]["fwd_tflops"] > 0 and row[i]["bwd_tflops"] > 0 for i in ("sdpa", "reference"))
    assert res["vae"]["encode"]["seconds"] > 0 and res["vae"]["decode"]["seconds"] > 0
    assert res["sampling"]["per_step_s"] > 0
    assert res["sampling"]["sampling_s_projected"] == pytest.approx(36 * res["sampling"]["per_step_s"])
    assert "| tiny | sdpa |" in md and "Attention kernels" in md


def test_flop_model_equals_pytorch_flop_counter():
    """Every matmul of one forward pass, counted by torch's FlopCounterMode on the tiny model."""
    attention.set_backend("reference")  # einsum -> bmm, which the counter sees (SDPA on CPU it may not)
    try:
        V, frames, H, W = 2, 5, 64, 96
        net = build_dit("demo", dtype=torch.float32)
        net.skip_empty_text = False  # training computes every view's cross-attention
        t = 1 + (frames - 1) // 4
        x = torch.randn(1, 16, V * t, H // 8, W // 8)
        inputs = (x, torch.rand(1, V * t), torch.randn(1, V * 512, 64), torch.zeros(1, 1, V * t, H // 8, W // 8))
        with FlopCounterMode(display=False) as counter:
            net(*inputs, fps=torch.tensor([10.0]))
        net.skip_empty_text = True  # what training runs: only view 0 has a caption, view 1's slot is zeros
        inputs[2][:, 512:] = 0
        with FlopCounterMode(display=False) as counter_one_view:
            net(*inputs, fps=torch.tensor([10.0]))
    finally:
        attention.set_backend("auto")
    f = bench.forward_flops(dit_config("demo"), V, frames, H, W)
    assert f["total"] == counter.get_total_flops()
    skipped = bench.iteration_flops(dit_config("demo"), V, frames, H, W, text_views=1)["skipped_forward"]
    assert skipped > 0 and f["total"] - skipped == counter_one_view.get_total_flops()
    # and the parts by hand for this shape: N = 2 views * 2 frames * (4 * 6) patches = 96 tokens
    D, L = 128, 4
    N = 96
    assert bench.tokens(dit_config("demo"), V, frames, H, W) == (N, V * t)
    assert f["self_attn"] == 4 * L * N * N * D
    assert f["linear"] == 2 * N * L * 14 * D * D


def test_flop_model_matches_the_spec_table():
    """perf.md section 1.2: model FLOPs 28.76 / 15.08 / 3.44 PF; attention 93 / 90.5 / 81 % of the forward."""
    cfg = dit_config("2b")
    for (V, H, W), pf, share in (((7, 704, 1280), 28.76, 0.93), ((5, 704, 1280), 15.08, 0.905),
                                 ((5, 480, 848), 3.44, 0.81)):
        fl = bench.iteration_flops(cfg, V, 29, H, W)
        assert fl["model"] / 1e15 == pytest.approx(pf, rel=0.01)
        assert fl["attention_share"] == pytest.approx(share, abs=0.01)
    assert bench.tokens(cfg, 7, 29, 704, 1280)[0] == 197_120


def test_offloaded_ema_is_the_same_math():
    """train.EMA with offload (CPU shadow, background thread) equals the on-device EMA, and checkpoints alike."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    named = [("a", params[0]), ("b", params[1])]
    plain, off = train.EMA(named), train.EMA(named, offload=True)
    for it in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        beta = train.ema_beta(it, 0.1)
        plain.update(beta)
        off.update(beta)
    sd_plain, sd_off = plain.full_state_dict(), off.full_state_dict()
    assert all(torch.equal(sd_plain[k], sd_off[k]) for k in sd_plain)
    with off.swapped_in(torch.nn.ParameterList(params)):
        assert torch.equal(params[0].detach(), sd_plain["a"])
    off.load_full_state_dict({k: v * 2 for k, v in sd_plain.items()})
    assert torch.equal(off.full_state_dict()["b"], 2 * sd_plain["b"])


def test_attention_recomputed_flag_matches_what_checkpointing_does():
    """The report's 'attn recomputed' flag against a count of attention forwards in forward + backward."""
    calls = {"n": 0}
    forward = attention.attention_forward

    def counting(q, k, v):
        calls["n"] += 1
        return forward(q, k, v)

    V = 2
    inputs = demo_dit_inputs(1, V)
    attention.attention_forward = counting
    attention.set_backend("triton")  # on the CPU the Triton wrapper runs the reference math inside
    try:
        counts = {}
        for mode in ("none", "full", "save_attention"):
            calls["n"] = 0
            net = build_dit("demo", dtype=torch.float32)
            net.skip_empty_text = False
            train.apply_activation_checkpointing(net, mode)
            net(*inputs, fps=torch.tensor([10.0])).square().mean().backward()
            counts[mode] = calls["n"]
    finally:
        attention.attention_forward = forward
        attention.set_backend("auto")
    assert counts["none"] > 0 and counts["full"] == 2 * counts["none"]
    for mode in ("none", "full", "save_attention"):
        assert (counts[mode] == 2 * counts["none"]) == bench.attention_recomputed(mode, "triton"), mode
    assert bench.attention_recomputed("full", "sdpa-cudnn")
    assert not bench.attention_recomputed("save_attention", "sdpa-cudnn")


def test_tiny_compiled_run_with_a_partial_plan(tmp_path):
    """--runs ...:compile and --plan SETUP=AC:OFFLOAD:BLOCKS reach train.py; compiled trains like eager."""
    torch.set_num_threads(2)
    res = bench.main(["--tiny", "--skip", "gemm", "kernels", "vae", "sampling", "--out", str(tmp_path / "b.json"),
                      "--runs", "tiny:sdpa:1:1", "tiny:sdpa:1:1:compile", "--plan", "tiny=save_attention:none:2"])
    eager, compiled = res["training"]
    assert (eager["compile"], compiled["compile"]) == (False, True)
    for r in (eager, compiled):
        plan = (r["activation_checkpointing"], r["offload"], r["saved_attention_blocks"])
        assert plan == ("save_attention", "none", 2)
        assert r["attention_recomputed"] == 0.5 and r["num_blocks"] == 4  # 2 of the demo DiT's 4 blocks
    assert compiled["compiled"]["graph_breaks"] == 0
    assert [it["loss"] for it in compiled["iterations"]] == pytest.approx([it["loss"] for it in eager["iterations"]],
                                                                          rel=1e-5)
    md = bench.markdown(res)
    assert "| tiny | sdpa, compiled | save_attention (2 blocks) / none (attn recomputed in 2 of 4 blocks) |" in md
    assert "tiny sdpa compiled: first iteration" in md


def test_plan_and_run_arguments_are_checked():
    for argv in (["--plan", "tiny=save_attention:none:x"], ["--plan", "tiny=sometimes:none"],
                 ["--plan", "huge=full:none"], ["--runs", "tiny:sdpa:1"], ["--runs", "tiny:sdpa:1:2:fast"]):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", "--skip", "gemm", "kernels", "vae", "training", "sampling", *argv])
        assert not torch.distributed.is_initialized()  # refused without leaving a process group behind


def test_partial_attention_saving_in_the_flop_model():
    """Hardware FLOPs interpolate between keeping every attention output and recomputing every one."""
    cfg = dit_config("2b")
    kept, again = (bench.iteration_flops(cfg, 5, 29, 704, 1280, checkpointing=True, recomputed_attention=s)
                   for s in (0.0, 1.0))
    half = bench.iteration_flops(cfg, 5, 29, 704, 1280, checkpointing=True,
                                 recomputed_attention=bench.attention_recomputed("save_attention", "sdpa", 14, 28))
    assert half["hardware"] == pytest.approx((kept["hardware"] + again["hardware"]) / 2)
    f = kept["forward"]
    assert again["hardware"] - kept["hardware"] == pytest.approx(f["self_attn"] + f["cross_attn"])
    assert half["model"] == kept["model"] == 3 * f["total"]
    assert bench.attention_recomputed("save_attention", "sdpa", -1, 28) == 0.0
    assert bench.attention_recomputed("save_attention", "sdpa", 28, 28) == 0.0
    assert bench.attention_recomputed("full", "sdpa", 14, 28) == 1.0
    # uncheckpointed_blocks: the last blocks recompute nothing
    assert bench.attention_recomputed("full", "sdpa", -1, 28, uncheckpointed=7) == 0.75
    assert bench.attention_recomputed("save_attention", "sdpa", 14, 28, uncheckpointed=7) == 0.25
    assert bench.attention_recomputed("save_attention", "sdpa", 14, 28, uncheckpointed=20) == 0.0
    plain = bench.iteration_flops(cfg, 5, 29, 704, 1280, checkpointing=bench.checkpointed_share("save_attention", 28, 28))
    none = bench.iteration_flops(cfg, 5, 29, 704, 1280, checkpointing=False)
    assert plain["hardware"] == none["hardware"]
    quarter = bench.iteration_flops(cfg, 5, 29, 704, 1280, checkpointing=bench.checkpointed_share("full", 28, 21))
    assert quarter["hardware"] - none["hardware"] == pytest.approx(0.25 * (f["total"] - f["self_attn"] - f["cross_attn"]))


def _cp_bench_worker(rank, world, out_dir):
    """bench.py --tiny in a 2-process gloo group: first cp=2 (one sample split over both), then dp=2.

    Also records the query lengths that reach model.py's ring attention (none without context parallelism).
    """
    ring = model.ring_attention
    seen = []

    def probe(q, k, v, **kw):
        seen.append(q.shape[1])
        return ring(q, k, v, **kw)

    model.ring_attention = probe
    lengths = {}
    try:
        for cp in (2, 1):
            seen.clear()
            bench.main(["--tiny", "--cp", str(cp), "--skip", "gemm", "kernels", "vae", "sampling",
                        "--runs", "tiny:sdpa:1:1", "--out", f"{out_dir}/cp{cp}.json"])  # rank 0 writes it
            lengths[cp] = sorted(set(seen))
    finally:
        model.ring_attention = ring
    Path(f"{out_dir}/ring{rank}.json").write_text(json.dumps(lengths))


def test_tiny_context_parallel_run_trains_like_one_process(tmp_path):
    """--cp 2 on 2 ranks runs train.py's ring on one sample: the losses of one process, 2 GPU-s per sample."""
    torch.set_num_threads(1)
    one = bench.main(["--tiny", "--skip", "gemm", "kernels", "vae", "sampling", "--runs", "tiny:sdpa:1:1",
                      "--out", str(tmp_path / "one.json")])["training"][0]
    run_gloo(_cp_bench_worker, 2, str(tmp_path))
    cp2, dp2 = (json.loads((tmp_path / f"cp{cp}.json").read_text()) for cp in (2, 1))
    r = cp2["training"][0]
    assert (cp2["world"], cp2["cp"], r["world"], r["cp"], r["dp"], r["samples_per_iter"]) == (2, 2, 2, 2, 1, 1)
    assert r["gpu_s_per_sample"] == pytest.approx(2 * r["median"]["total"])
    assert r["model_flops"] == pytest.approx(one["model_flops"])  # one sample per iteration, as one process
    # the same sample, weights and draws: the ring (and the VAE views spread over the group) is exact up to rounding
    losses = [it["loss"] for it in r["iterations"]]
    assert losses == pytest.approx([it["loss"] for it in one["iterations"]], rel=1e-5)
    assert [it["grad_norm"] for it in r["iterations"]] == pytest.approx(
        [it["grad_norm"] for it in one["iterations"]], rel=1e-4)
    for rank in range(2):  # each rank's self-attention: its half of the sample's tokens, in the ring
        assert json.loads((tmp_path / f"ring{rank}.json").read_text()) == {"2": [r["tokens"] // 2], "1": []}
    md = bench.markdown(cp2)
    assert "world size 2 = data-parallel 1 x cp 2." in md and "| tiny, cp=2 | sdpa |" in md
    # cp=1 on the same 2 ranks is data parallel: two samples per iteration, seeded by dp rank
    d = dp2["training"][0]
    assert (d["cp"], d["dp"], d["samples_per_iter"]) == (1, 2, 2)
    assert d["gpu_s_per_sample"] == pytest.approx(d["median"]["total"])
    assert d["model_flops"] == pytest.approx(2 * one["model_flops"])
    assert d["iterations"][0]["loss"] != pytest.approx(losses[0], rel=1e-3)  # rank 1's sample joins the mean
    assert "| tiny | sdpa |" in bench.markdown(dp2)


def test_context_parallel_options_are_checked():
    for argv, message in ((["--set", "cp=2"], "use --cp|as --cp"), (["--cp", "2"], "does not divide the 1 ranks"),
                          (["--cp", "3"], "choose cp in")):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", "--skip", "gemm", "kernels", "vae", "sampling", "--runs", "tiny:sdpa:1:1", *argv])
        assert not torch.distributed.is_initialized()


def test_report_of_runs_saved_before_cp_is_unchanged(tmp_path):
    """A saved data-parallel run without cp fields renders as the same run recorded with cp=1, dp=world."""
    old = json.loads((Path(bench.__file__).parent / "bench_results" / "bench_2xh100_dp2.json").read_text())
    r = old["training"][0]
    assert "cp" not in r and r["world"] == 2  # its FLOPs were those of one rank
    new = json.loads(json.dumps(old))
    n = new["training"][0]
    n.update(cp=1, dp=2, samples_per_iter=2, model_flops=2 * r["model_flops"], hardware_flops=2 * r["hardware_flops"])
    row = lambda res: [ln for ln in bench.markdown(res).splitlines() if ln.startswith("| 480p-5v")]  # noqa: E731
    assert row(old) == row(new) and len(row(old)) == 1
    mfu = r["model_flops"] / r["median"]["total"] / (old["gemm"]["tflops"] * 1e12)
    assert f"| {100 * mfu:.0f}% |" in row(old)[0]


def test_kernel_families_sort_real_kernel_names():
    """Names as the profiler shows them (cuDNN, FlashAttention, cuBLAS, inductor, ours) land in their family."""
    cases = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_128x128x128": "attention forward",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128": "attention backward",
        "_gl_attn_fwd_kernel": "attention forward", "_attn_bwd_kernel": "attention backward",
        "_attn_bwd_prep_kernel": "attention backward",
        "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention backward",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kndhwc_tilesize128x96": "VAE convolutions",
        "nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT": "GEMMs (linear layers)",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "GEMMs (linear layers)",
        "triton_per_fused__to_copy_add_mul_native_layer_norm_0": "elementwise, norms, reductions",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer + EMA",
        "Memcpy HtoD (Pinned -> Device)": "copies (offload, layout)",
        "ncclDevKernel_AllGather_RING_LL": "communication",
        "aten::addmm": "GEMMs (linear layers)", "aten::mul": "elementwise, norms, reductions",
        "some_unknown_kernel": "other",
    }
    for name, family in cases.items():
        assert bench.kernel_family(name) == family, name


def test_tiny_profile_splits_the_iteration(tmp_path):
    """--profile adds one untimed iteration whose op time is split by family and rendered as a table."""
    torch.set_num_threads(2)
    res = bench.main(["--tiny", "--skip", "gemm", "kernels", "vae", "sampling", "--out", str(tmp_path / "b.json"),
                      "--runs", "tiny:sdpa:0:1", "--profile"])
    (r,) = res["training"]
    assert len(r["iterations"]) == 1  # the profiled iteration is not one of the timed ones
    prof = r["profile"]
    fams = prof["families"]
    assert prof["kernel_s"] == pytest.approx(sum(fams.values())) and 0 < prof["kernel_s"]
    assert fams["GEMMs (linear layers)"] > 0 and fams["VAE convolutions"] > 0 and fams["attention forward"] > 0
    assert prof["top"] and all(t["family"] in fams for t in prof["top"])
    assert "Profile of one more tiny sdpa iteration" in bench.markdown(res)


def test_default_runs_put_ours_compiled_beside_sdpa():
    setups = ["480p-5v", "720p-5v", "720p-7v", "lora-720p-5v"]
    runs = bench.default_runs(setups, None, False, 1, 2, False, kernels=True)
    assert runs == [("480p-5v", "sdpa", 1, 2, False), ("480p-5v", "auto", 1, 2, True),
                    ("720p-5v", "sdpa", 1, 2, False), ("720p-5v", "auto", 1, 2, True),
                    ("720p-7v", "sdpa", 1, 2, False), ("720p-7v", "auto", 1, 2, True),
                    ("lora-720p-5v", "auto", 1, 2, True)]
    # no kernels (other GPUs): SDPA alone, eager; --backends: as given, compiled only with --compile
    assert bench.default_runs(["480p-5v"], None, False, 1, 2, False, kernels=False) == [("480p-5v", "sdpa", 1, 2, False)]
    assert bench.default_runs(["lora-720p-5v"], ["triton", "sdpa"], False, 0, 1, True, kernels=True) == [
        ("lora-720p-5v", "sdpa", 0, 1, True)]
    assert bench.default_runs(["720p-7v"], ["triton"], False, 0, 1, False, kernels=True) == [
        ("720p-7v", "triton", 0, 1, False)]
    assert bench.default_runs(["tiny"], None, True, 1, 2, False, kernels=False) == [
        ("tiny", "sdpa", 1, 2, False), ("tiny", "reference", 1, 2, False)]


def test_dev_bench_attention_captures_a_training_steps_self_attention():
    """dev/bench_attention.py --in-model: the tensors come from the last block's self-attention backward of a
    real bench.py step (tiny setup: 2 views x 2 latent frames x 4 x 6 tokens), and the wrapper is removed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "dev" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("dev_bench_attention", path)
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    backward = attention.attention_backward
    q, k, v, do = dev.capture_training_inputs("tiny", min_keys=1, backend="triton")  # CPU: reference kernels
    assert attention.attention_backward is backward
    assert q.shape == k.shape == v.shape == do.shape == (1, 96, 2, 64)
    assert do.abs().max() > 0 and not torch.equal(q, k)
    # q and k went through the per-head RMSNorm (weight 1 at init), then RoPE, which keeps the norm
    torch.testing.assert_close(q.float().square().mean(-1), torch.ones(1, 96, 2), rtol=1e-3, atol=1e-3)


def test_clock_summary_counts_busy_samples_and_throttle_reasons():
    """summarize_clocks: idle samples (0x1) and unparsable lines are left out; reasons become shares."""
    lines = ["345, 76.9, 53, 0x0000000000000001",  # idle
             "1980, 376.9, 62, 0x0000000000000000",
             "1575, 699.4, 76, 0x0000000000000004",  # power cap
             "1365, 667.2, 79, 0x0000000000000020",  # software thermal slowdown
             "1275, 671.4, 83, 0x0000000000000024",  # both
             "[N/A], [N/A], 80, 0x0",  # unreadable
             "1470, 62"]  # cut by the monitor's stop
    c = bench.summarize_clocks(lines)
    assert c["samples"] == 4
    assert c["sm_mhz"] == (1365 + 1575) / 2 and c["power_w"] == (667.2 + 671.4) / 2 and c["max_temp_c"] == 83
    assert (c["power_cap"], c["thermal"], c["hw_slowdown"], c["power_brake"]) == (0.5, 0.5, 0.0, 0.0)
    assert bench.summarize_clocks(lines[:1]) is None
    monitor = bench.ClockMonitor(torch.device("cpu"))  # no GPU: a no-op that reports nothing
    monitor.start()
    assert monitor.stop() is None


def test_ring_model_takes_each_backends_kernels_and_the_right_vae():
    """The 8-GPU ring model reads the run backend's own kernel columns (auto: ours; triton-cudnn: our
    forward, cuDNN's backward) and a one-view VAE time only when it was measured at the setup's size."""
    rates = {"ours (triton)": (600.0, 550.0), "sdpa cudnn": (500.0, 450.0), "sdpa default": (520.0, 470.0)}
    kernels = [dict(shape=f"S{S}", Sq=S, Sk=S, heads=16, **{name: dict(fwd_tflops=f, bwd_tflops=b)
                                                            for name, (f, b) in rates.items()})
               for S in (7_950, 63_600)]
    run = dict(setup="480p-5v", tokens=63_600, num_blocks=28, attention_recomputed=0.0,
               forward_flops=dict(self_attn=9.0e14), median=dict(forward_backward=7.5, vae=0.8, optimizer=0.06))
    for backend, (fwd_impl, bwd_impl) in (("auto", ("ours (triton)",) * 2),
                                          ("triton-cudnn", ("ours (triton)", "sdpa cudnn"))):
        m = bench.ring_model(dict(run, backend=backend), kernels, None, "ours (triton)")
        want = 9.0e14 * (1 / rates[fwd_impl][0] + 2.5 / rates[bwd_impl][1]) / 1e12
        assert m is not None and math.isclose(m["attention_1gpu_est_s"], want, rel_tol=1e-12)
        assert math.isclose(m["vae_s"], 0.8 / 5)  # no VAE section: the run's VAE phase over its 5 views
    vae_720p = dict(height=704, width=1280, encode=dict(seconds=0.7))
    assert math.isclose(bench.ring_model(dict(run, backend="auto"), kernels, vae_720p, "sdpa cudnn")["vae_s"], 0.16)
    vae_480p = dict(vae_720p, height=480, width=848)
    assert bench.ring_model(dict(run, backend="auto"), kernels, vae_480p, "sdpa cudnn")["vae_s"] == 0.7
    res = dict(kernels=kernels, training=[dict(run, backend="auto", cp=1, median=dict(run["median"], total=8.4))])
    assert set(bench.finish(res)["ring"]) == {"480p-5v / ours (triton)", "480p-5v / sdpa cudnn",
                                              "480p-5v / sdpa default"}
