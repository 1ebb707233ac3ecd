"""Parity of the implicit-GEMM conv-transpose (kernels/conv_transpose.py: 4-phase stride 2, and
the 1x1 -> 4x4 noise layer) and of G-style blocks built on it (conv-transpose -> BatchNorm ->
ReLU, conv-transpose + bias -> tanh) against nn.ConvTranspose2d / nn.BatchNorm2d / ReLU / tanh.
Tolerances: tests/parity.py."""

import pytest
import torch
import torch.nn.functional as F

from fastgan.kernels.conv_transpose import conv_transpose2d, conv_transpose_out_size
from fastgan.kernels.fusion import Epilogue
from fastgan.kernels.utils import channels_last_empty
from fastgan.models import ConvModule
from parity import (DEVICE, TOL, apply_prologue, assert_close, check_chain, check_layer_op, generator,
                    random_prologue)

pytestmark = pytest.mark.usefixtures("on_device")


@pytest.mark.parametrize("stride, padding, size", [(2, 1, 4), (1, 0, 1)])
@pytest.mark.parametrize("mode", ["none", "act", "norm_act"])
@pytest.mark.parametrize("epilogue", ["plain", "stats", "bias_tanh"])
def test_conv_transpose2d_forward(stride, padding, size, mode, epilogue, k_loop):
    gen = generator(hash((stride, mode, epilogue, "t")) % 2**31)
    n, cin, cout = 3, 5, 7
    x = torch.randn(n, cin, size, size, generator=gen)
    w = torch.randn(cin, cout, 4, 4, generator=gen) * 0.2
    pro = random_prologue(mode, cin, gen)
    bias = torch.randn(cout, generator=gen) if epilogue == "bias_tanh" else None
    shift = torch.randn(cout, generator=gen) if epilogue == "stats" else None
    ho = conv_transpose_out_size(size, stride, padding)
    out = channels_last_empty((n, cout, ho, ho), torch.float32, DEVICE)
    part = conv_transpose2d(x, w, out, stride=stride, padding=padding, pro=pro,
                            epi=Epilogue(bias=bias, tanh=bias is not None, stats=epilogue == "stats", shift=shift),
                            dtype=torch.float32)
    ref = F.conv_transpose2d(apply_prologue(x, pro), w, bias, stride=stride, padding=padding)
    if epilogue == "bias_tanh":
        ref = torch.tanh(ref)
    assert_close(out, ref, TOL[torch.float32], "output")
    if epilogue == "stats":
        d = ref - shift[None, :, None, None]
        assert_close(part.sum(0)[0], d.sum((0, 2, 3)), TOL[torch.float32], "sum of y - shift")
        assert_close(part.sum(0)[1], (d * d).sum((0, 2, 3)), TOL[torch.float32], "sum of (y - shift)^2")


def test_tanh_epilogue_is_accurate_near_zero_and_saturates():
    """tanh is computed as -e / (2 + e), e = expm1(-2|x|) (no libdevice in the interpreter): check
    its relative accuracy where naive formulas lose it, and the tails."""
    x = torch.tensor([0.0, 1e-7, -3e-5, 1e-3, 0.3, -2.0, 9.0, -30.0, 80.0]).reshape(1, 9, 1, 1)
    w = torch.zeros(9, 9, 4, 4)
    w[torch.arange(9), torch.arange(9), 0, 0] = 1.0                   # out[c, 0, 0] = x[c]
    out = channels_last_empty((1, 9, 4, 4), torch.float32, DEVICE)
    conv_transpose2d(x, w, out, stride=1, padding=0, pro=random_prologue("none", 9, None),
                     epi=Epilogue(bias=torch.zeros(9), tanh=True), dtype=torch.float32)
    got, want = out[0, :, 0, 0], torch.tanh(x.flatten())
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30))
    assert (rel <= 4e-7).all(), f"tanh relative error {rel.max():.2e}"


def g_chain(noise, width, image_channels, size, bias):
    """noise2feat (1x1 -> 4x4, BN, ReLU) -> BN blocks up to size/2 -> to_rgb (+ bias, tanh)."""
    blocks = [ConvModule(noise, width, transposed=True, stride=1, padding=0, bias=False, norm=True, act="relu")]
    s = 4
    while s < size // 2:
        blocks.append(ConvModule(width, width // 2 + 1, transposed=True, stride=2, padding=1, bias=False,
                                 norm=True, act="relu"))
        width, s = width // 2 + 1, s * 2
    blocks.append(ConvModule(width, image_channels, transposed=True, stride=2, padding=1, bias=bias,
                             norm=False, act="tanh"))
    return blocks


@pytest.mark.parametrize("batch, noise, width, image_channels, size, bias", [
    (1, 9, 7, 3, 8, True),          # batch 1: noise2feat's BN sees 16 positions
    (2, 10, 8, 1, 16, False),       # grayscale, no output bias (pytorch/examples)
    (3, 6, 12, 3, 32, True),        # 32x32 output: two BN blocks after noise2feat
])
def test_generator_blocks_fp32(batch, noise, width, image_channels, size, bias):
    z = torch.randn(batch, noise, 1, 1)
    check_chain(g_chain(noise, width, image_channels, size, bias), z, torch.float32, seed=batch + 100)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_generator_blocks_half(dtype, k_loop):
    check_chain(g_chain(8, 9, 3, 16, True), torch.randn(2, 8, 1, 1), dtype, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch, size, stride, padding, norm, bias, tanh, stats", [
    (2, 1, 1, 0, False, False, False, True),    # noise2feat: z (1x1) -> 4x4, BN statistics out
    (1, 4, 2, 1, True, False, False, True),     # BN -> ReLU -> conv-transpose -> BN statistics
    (3, 4, 2, 1, True, True, True, False),      # to_rgb: BN -> ReLU -> conv-transpose + bias -> tanh
], ids=["noise2feat", "upsample", "to_rgb"])
def test_conv_transpose_layer_op(batch, size, stride, padding, norm, bias, tanh, stats, dtype):
    """The fused op, forward and backward, in every dtype, on identical inputs (tests/parity.py)."""
    check_layer_op((batch, 6, size, size), (6, 7, 4, 4), transposed=True, stride=stride, padding=padding,
                   norm=norm, act="relu" if norm else None, slope=0.0, bias=bias, stats=stats, tanh=tanh,
                   dtype=dtype, seed=batch * 10 + size)
