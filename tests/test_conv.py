"""conv.py's Triton 3x3x3 convolution against float64 math.

CPU: the kernel runs in Triton's interpreter (a subprocess, TRITON_INTERPRET=1 must be set before triton is
imported), fp32 and fp16, on shapes with every border case: a ragged last pixel tile, a partial last
channel tile, several channel chunks, no bias. Then the VAE's CausalConv3d with the kernel switched on is
streamed in chunks (time padding and cache as in the encoder) against the same module on PyTorch's conv.
GPU (skipped without CUDA on Hopper): bf16 error within 1.5x of cuDNN's on the same inputs, at the shape
the encoder uses it for.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import conv  # noqa: E402

INTERPRETER_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import conv, model

torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for B, C, Cout, Tp, H, W, bias in ((1, 32, 24, 5, 5, 21, True), (2, 16, 16, 3, 3, 16, False)):
        x = torch.randn(B, C, Tp, H, W).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(Cout, C, 3, 3, 3) / (27 * C) ** 0.5
        b = torch.randn(Cout) if bias else None
        ref = conv.reference_conv3d(x.double(), w.double(), b.double() if bias else None)
        out = conv._triton_conv3d(x.to(dtype), w.to(dtype), b.to(dtype) if bias else None)
        print(json.dumps(dict(case=f"{dtype} {B}x{C}->{Cout} {Tp}x{H}x{W} bias={bias}",
                              shape_ok=list(out.shape) == list(ref.shape),
                              channels_last=out.is_contiguous(memory_format=torch.channels_last_3d),
                              rel_err=((out.double() - ref).abs().max() / ref.abs().max()).item())))

# The encoder's layer: chunked stream with the causal cache, the kernel against PyTorch's conv.
layer = model.CausalConv3d(16, 16, 3, padding=1)
video = torch.randn(1, 16, 9, 6, 20)
outs = {}
for use_triton in (False, True):
    layer.use_triton = use_triton
    cache = {}
    with torch.no_grad():
        outs[use_triton] = torch.cat([layer(video[:, :, s:e], cache) for s, e in ((0, 1), (1, 5), (5, 9))], 2)
ref = torch.nn.functional.conv3d(torch.cat([video.new_zeros(1, 16, 2, 6, 20), video], 2).double(),
                                 layer.weight.double(), layer.bias.double(), padding=(0, 1, 1))
print(json.dumps(dict(case="CausalConv3d stream", shape_ok=outs[True].shape == ref.shape,
                      rel_err=((outs[True].double() - ref).abs().max() / ref.abs().max()).item(),
                      rel_err_torch=((outs[False].double() - ref).abs().max() / ref.abs().max()).item())))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_kernel_matches_float64_reference_in_interpreter(interpreter_results):
    cases = [r for r in interpreter_results if "bias=" in r["case"]]
    assert len(cases) == 4
    for r in cases:
        assert r["shape_ok"] and r["channels_last"], r
        tol = 1e-5 if "float32" in r["case"] else 2e-3
        assert r["rel_err"] < tol, r


def test_causal_conv_stream_with_kernel_matches_reference(interpreter_results):
    (r,) = [r for r in interpreter_results if r["case"] == "CausalConv3d stream"]
    assert r["shape_ok"], r
    assert r["rel_err"] < 1e-5 and r["rel_err_torch"] < 1e-5, r


def test_kernel_is_used_only_where_measured_faster():
    w96 = torch.empty(96, 96, 3, 3, 3, dtype=torch.bfloat16)
    assert not conv.triton_conv3d_suits(w96)  # CPU tensors never take the kernel
    if torch.cuda.is_available():
        on_hopper = torch.cuda.get_device_capability() == (9, 0) and conv._HAVE_TRITON and conv._TRITON_CONV_ON
        assert conv.triton_conv3d_suits(w96.cuda()) == on_hopper
        assert not conv.triton_conv3d_suits(torch.empty(192, 192, 3, 3, 3, dtype=torch.bfloat16, device="cuda"))
        assert not conv.triton_conv3d_suits(w96.float().cuda())


def test_channel_counts_the_tiles_cannot_cover_are_refused():
    """A channel count no BK divides would lose its last partial chunk: refused, never computed wrongly."""
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="input channels % 32"):
        conv._triton_conv3d(torch.zeros(1, 48, 3, 4, 4), torch.zeros(48, 48, 3, 3, 3))
    assert {c.kwargs["BK"] for c in conv._prune_configs(conv._conv_configs(), {"Cin": 96})} == {32}
    with pytest.raises(ValueError, match="divides 40 input channels"):
        conv._prune_configs(conv._conv_configs(), {"Cin": 40})


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="needs a Hopper GPU")
def test_kernel_bf16_error_within_cudnn_on_gpu():
    torch.manual_seed(0)
    x = torch.randn(1, 96, 6, 64, 200, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(96, 96, 3, 3, 3, device="cuda") / (27 * 96) ** 0.5
    b = torch.randn(96, device="cuda")
    ref = conv.reference_conv3d(x.double(), w.double(), b.double())
    ours = conv.conv3d_3x3x3(x.bfloat16(), w.bfloat16(), b.bfloat16())
    cudnn = conv.reference_conv3d(x.bfloat16(), w.bfloat16().contiguous(memory_format=torch.channels_last_3d),
                                  b.bfloat16())
    err = lambda y: ((y.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    assert err(ours) <= 1.5 * err(cudnn) + 1e-6, (err(ours), err(cudnn))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="needs a Hopper GPU")
def test_compiled_encoder_with_kernel_within_cudnn_error_on_gpu():
    """train.compile_vae puts the 96-channel layers on the kernel; the bf16 latent stays as close to float64."""
    import copy

    import model
    import train

    torch.manual_seed(0)
    reference = model.WanVAE(**model.VAE_PRESETS["wan2.1"]).cuda().double().eval().requires_grad_(False)
    video = torch.randint(0, 256, (1, 3, 5, 64, 96), dtype=torch.uint8, device="cuda")
    ref = reference.encode(video)
    latents = {}
    for use_kernel in (True, False):
        vae = copy.deepcopy(reference).to(torch.bfloat16)
        train.compile_vae(vae)
        convs = [m for m in vae.encoder.modules() if isinstance(m, model.CausalConv3d)]
        expected = 4 if conv.triton_conv3d_suits(convs[1].weight) else 0  # stage 0's 96 -> 96 convs (sm_90)
        assert convs[1].weight.shape[:2] == (96, 96) and sum(m.use_triton for m in convs) == expected
        for m in convs:
            m.use_triton = m.use_triton and use_kernel
        latents[use_kernel] = vae.encode(video)
    err = {k: ((v.double() - ref).abs().max() / ref.abs().max()).item() for k, v in latents.items()}
    assert err[True] <= 1.5 * err[False] + 1e-6, err
