"""A Triton 3x3x3 convolution for the VAE encoder's full-resolution layers, with its reference.

Wan2.1's encoder spends a third of its FLOPs (117 of 299 TFLOP for a 480p-5v batch) in the 96 -> 96
channel 3x3x3 convolutions at full resolution. cuDNN runs those at ~300 TFLOP/s on an H100 (its tiles
suit wider layers: it reaches 460-640 TFLOP/s on the 192- and 384-channel ones); this kernel reaches
~395 (dev/bench_conv.py). So train.py's compiled encoder uses it for the 96-channel layers only, on
Hopper, where it was measured: there it takes 0.02-0.04 s off the VAE phase of a 480p-5v iteration (the
encoder's cuDNN calls run faster inside the compiled graph than alone; BENCH.md, seventh session).

Sections, in reading order:
  1. reference   F.conv3d with the same contract (the tests run it in float64)
  2. kernel      implicit GEMM: output pixels x output channels, summed over 27 taps x input channels
  3. entry point conv3d_3x3x3(x, weight, bias) and the custom op torch.compile sees
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    _HAVE_TRITON = True
except ImportError:  # CPU-only installs without Triton keep the cuDNN / PyTorch path
    _HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (in, out) channel pairs where the kernel beat cuDNN on an H100 (BENCH.md); the rest stay with cuDNN.
FAST_CHANNELS = {(96, 96)}
# COSMOS_MV_TRITON_CONV=0 keeps cuDNN everywhere, e.g. to compare the two or to rule the kernel out.
_TRITON_CONV_ON = os.environ.get("COSMOS_MV_TRITON_CONV", "1") != "0"


# ---------------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------------


def reference_conv3d(x_BCTHW, weight, bias=None):
    """3x3x3 convolution of an already time-padded input: no time padding, 1 pixel of zeros in H and W."""
    return F.conv3d(x_BCTHW, weight, bias, padding=(0, 1, 1))


# ---------------------------------------------------------------------------------------------------
# 2. Kernel
# ---------------------------------------------------------------------------------------------------
# Channels-last activations [B, T, H, W, C] make each output row segment a plain GEMM per tap: the
# BM output pixels (t, h, w0..w0+BM) x BN output channels add up, over the 27 taps (dt, dh, dw) and the
# input channels in chunks of BK, input[t+dt, h+dh-1, w0+dw-1 .., c0..] @ weight[tap, c0.., n0..].
# Every A tile is one TMA box of a 5-D descriptor over the input; boxes that reach past the frame's
# border (h = -1 or H, w < 0 or >= W) come back zero-filled by the TMA unit, which is exactly the
# convolution's spatial zero padding, so the kernel has no masks and no padded copy of the input.
# The time padding (causal: frames before the chunk) is the caller's, as in CausalConv3d.

if _HAVE_TRITON:

    def _conv_configs():
        if _INTERPRET:
            return [triton.Config(dict(BM=16, BN=16, BK=16), num_stages=1, num_warps=4)]
        # BM=256 halves the weight traffic per FLOP against BM=128 (the weights are re-read by every
        # program); the winner for 96 channels on an H100 was 256 x 128 x 32, 8 warps, 4 stages.
        return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_stages=st, num_warps=w)
                for bm, bn, w, st in ((256, 128, 8, 4), (256, 128, 8, 3), (128, 128, 4, 4), (128, 128, 8, 4))
                for bk in (32, 64)]

    def _prune_configs(configs, named_args, **kwargs):
        cin = named_args.get("Cin", kwargs.get("Cin"))
        fits = [c for c in configs if cin % c.kwargs["BK"] == 0]  # a partial chunk would drop channels
        if not fits:
            raise ValueError(f"triton conv3d: no tile config divides {cin} input channels")
        return fits

    def _set_boxes(nargs):
        """TMA box shapes follow the config being tried (the descriptors are made before autotuning)."""
        bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
        nargs["x_desc"].block_shape = [1, 1, 1, bm, bk]
        nargs["w_desc"].block_shape = [bk, bn]
        nargs["out_desc"].block_shape = [1, 1, 1, bm, bn]

    _CONV_CONFIGS = _conv_configs()
    for _c in _CONV_CONFIGS:
        _c.pre_hook = _set_boxes

    @triton.autotune(_CONV_CONFIGS, key=["T_out", "H", "W", "Cin", "Cout"],
                     prune_configs_by=dict(early_config_prune=_prune_configs))
    @triton.jit
    def _conv3d_kernel(x_desc, w_desc, out_desc, Bias, T_out, H, W, Cin: tl.constexpr, Cout,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One program: BM output pixels of one (b, t, h) row x BN output channels."""
        pid = tl.program_id(0)
        w_tiles = tl.cdiv(W, BM)
        w0 = (pid % w_tiles) * BM
        row = pid // w_tiles
        h = row % H
        t = (row // H) % T_out
        b = row // (H * T_out)
        n0 = tl.program_id(1) * BN
        chunks: tl.constexpr = Cin // BK
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in tl.range(0, 27 * chunks):
            tap = i // chunks
            c0 = (i - tap * chunks) * BK
            dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
            a = x_desc.load([b, t + dt, h + dh - 1, w0 + dw - 1, c0]).reshape(BM, BK)  # [BM, BK]
            acc = tl.dot(a, w_desc.load([tap * Cin + c0, n0]), acc)  # [BK, BN] weights of this tap
        if HAS_BIAS:
            cols = n0 + tl.arange(0, BN)
            acc += tl.load(Bias + cols, mask=cols < Cout, other=0.0).to(tl.float32)[None, :]
        out_desc.store([b, t, h, w0, n0], acc.to(out_desc.dtype).reshape(1, 1, 1, BM, BN))


# ---------------------------------------------------------------------------------------------------
# 3. Entry point
# ---------------------------------------------------------------------------------------------------


def triton_conv3d_suits(weight):
    """Use the kernel for this layer? A Hopper GPU (sm_90, where it was measured), 16-bit, 3x3x3, a faster width."""
    if not (_TRITON_CONV_ON and _HAVE_TRITON and weight.is_cuda and not _INTERPRET):
        return False
    return (torch.cuda.get_device_capability(weight.device) == (9, 0) and weight.dtype in (torch.bfloat16, torch.float16)
            and tuple(weight.shape[2:]) == (3, 3, 3) and (weight.shape[1], weight.shape[0]) in FAST_CHANNELS)


def _triton_conv3d(x_BCTHW, weight, bias=None):
    """The kernel behind conv3d_3x3x3: [B, C, T+2, H, W] -> [B, Cout, T, H, W], both channels-last."""
    B, C, Tp, H, W = x_BCTHW.shape
    Cout = weight.shape[0]
    cin_multiple = 16 if _INTERPRET else 32  # the smallest BK among the configs
    if C % cin_multiple or Cout % 8 or Tp < 3:
        raise ValueError(f"triton conv3d needs input channels % {cin_multiple} == 0, output channels % 8 == 0 "
                         f"and >= 3 frames; got {C} -> {Cout} channels, {Tp} frames")
    x = x_BCTHW.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)  # [B, T+2, H, W, C]
    w = weight.to(x.dtype).permute(2, 3, 4, 1, 0).reshape(27 * C, Cout).contiguous()  # [(dt dh dw ci), co]
    out = torch.empty((B, Tp - 2, H, W, Cout), dtype=x.dtype, device=x.device)
    box = [1, 1, 1, 16, 16]  # replaced per config by _set_boxes
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), box)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), box[3:])
    out_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), box)
    grid = lambda meta: (B * (Tp - 2) * H * triton.cdiv(W, meta["BM"]), triton.cdiv(Cout, meta["BN"]))  # noqa: E731
    _conv3d_kernel[grid](x_desc, w_desc, out_desc, bias if bias is not None else w, Tp - 2, H, W, C, Cout,
                         HAS_BIAS=bias is not None)
    return out.permute(0, 4, 1, 2, 3)  # [B, Cout, T, H, W] view, channels-last in memory


# A custom op keeps torch.compile from tracing into the launcher (descriptors, autotuning): the compiled
# encoder sees one opaque call and lays out its channels-last input for it.
@torch.library.custom_op("cosmos_mv::conv3d_3x3x3", mutates_args=())
def _conv3d_op(x_BCTHW: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _triton_conv3d(x_BCTHW, weight, bias)


@_conv3d_op.register_fake
def _(x_BCTHW, weight, bias):
    B, _, Tp, H, W = x_BCTHW.shape
    return x_BCTHW.new_empty((B, weight.shape[0], Tp - 2, H, W)).contiguous(memory_format=torch.channels_last_3d)


def conv3d_3x3x3(x_BCTHW, weight, bias=None):
    """3x3x3 convolution of a time-padded input (zero padding 1 in H, W) with the kernel: channels-last out."""
    return _conv3d_op(x_BCTHW.contiguous(memory_format=torch.channels_last_3d), weight, bias)
