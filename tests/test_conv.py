"""Parity of the implicit-GEMM convolution (kernels/conv.py) and of D-style blocks built on it
(conv -> BatchNorm -> LeakyReLU, conv + bias -> LeakyReLU, the 4x4 -> 1x1 decision conv) against
nn.Conv2d / nn.BatchNorm2d / LeakyReLU. Tolerances: tests/parity.py."""

import pytest
import torch
import torch.nn.functional as F

from fastgan.kernels.conv import conv2d, conv_out_size
from fastgan.kernels.fusion import Epilogue, Prologue
from fastgan.kernels.utils import channels_last_empty
from fastgan.models import ConvModule
from parity import (DEVICE, TOL, apply_prologue, assert_close, check_chain, check_layer_op, generator,
                    random_prologue)

pytestmark = pytest.mark.usefixtures("on_device")


@pytest.mark.parametrize("stride, padding, size", [(2, 1, 8), (1, 0, 4)])
@pytest.mark.parametrize("mode", ["none", "act", "norm_act"])
@pytest.mark.parametrize("epilogue", ["plain", "bias", "stats"])
def test_conv2d_forward(stride, padding, size, mode, epilogue, k_loop):
    gen = generator(hash((stride, mode, epilogue)) % 2**31)
    n, cin, cout = 3, 5, 7                                    # odd channel counts
    x = torch.randn(n, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, 4, 4, generator=gen) * 0.2
    pro = random_prologue(mode, cin, gen)
    bias = torch.randn(cout, generator=gen) if epilogue == "bias" else None
    shift = torch.randn(cout, generator=gen) if epilogue == "stats" else None
    ho = conv_out_size(size, stride, padding)
    out = channels_last_empty((n, cout, ho, ho), torch.float32, DEVICE)
    part = conv2d(x, w, out, stride=stride, padding=padding, pro=pro,
                  epi=Epilogue(bias=bias, stats=epilogue == "stats", shift=shift), dtype=torch.float32)
    ref = F.conv2d(apply_prologue(x, pro), w, bias, stride=stride, padding=padding)
    assert_close(out, ref, TOL[torch.float32], "output")
    if epilogue == "stats":
        d = ref - shift[None, :, None, None]
        assert_close(part.sum(0)[0], d.sum((0, 2, 3)), TOL[torch.float32], "sum of y - shift")
        assert_close(part.sum(0)[1], (d * d).sum((0, 2, 3)), TOL[torch.float32], "sum of (y - shift)^2")
    else:
        assert part is None


def test_conv2d_rejects_bad_geometry():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="do not fit"):
        conv2d(x, torch.randn(4, 3, 3, 3), torch.empty(1, 4, 4, 4), stride=2, padding=1,
               pro=Prologue(), epi=Epilogue(), dtype=torch.float32)


def d_chain(image_channels, width, size, slope, bias):
    """img2feat (conv s2 + bias, LeakyReLU) -> BN blocks down to 4x4 -> decision (4x4 -> 1x1)."""
    blocks = [ConvModule(image_channels, width, transposed=False, stride=2, padding=1, bias=bias,
                         norm=False, act="leaky_relu", slope=slope)]
    size //= 2
    while size > 4:
        blocks.append(ConvModule(width, width * 2 + 1, transposed=False, stride=2, padding=1, bias=False,
                                 norm=True, act="leaky_relu", slope=slope))
        width, size = width * 2 + 1, size // 2
    blocks.append(ConvModule(width, 1, transposed=False, stride=1, padding=0, bias=bias, norm=False, act=None))
    return blocks


@pytest.mark.parametrize("batch, image_channels, width, size, slope, bias", [
    (1, 3, 5, 16, 0.01, True),      # batch 1: BN statistics over 4x4 positions only; MMGen slope
    (2, 1, 4, 16, 0.2, False),      # grayscale, pytorch/examples slope, no biases
    (3, 3, 3, 32, 0.01, True),      # 32x32 input, two BN blocks
])
def test_discriminator_blocks_fp32(batch, image_channels, width, size, slope, bias):
    x = torch.randn(batch, image_channels, size, size)
    check_chain(d_chain(image_channels, width, size, slope, bias), x, torch.float32, seed=batch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_discriminator_blocks_half(dtype):
    x = torch.randn(2, 3, 16, 16)
    check_chain(d_chain(3, 6, 16, 0.01, True), x, dtype, seed=7)


def test_bn_block_to_bn_block(k_loop):
    """conv -> BN -> LeakyReLU -> conv -> BN -> LeakyReLU -> decision: the BN backward affine and
    the dgrad epilogue's reductions both run between two BN layers."""
    blocks = [ConvModule(5, 6, transposed=False, stride=2, padding=1, bias=False, norm=True,
                         act="leaky_relu", slope=0.01),
              ConvModule(6, 9, transposed=False, stride=2, padding=1, bias=False, norm=True,
                         act="leaky_relu", slope=0.01),
              ConvModule(9, 1, transposed=False, stride=1, padding=0, bias=True, norm=False, act=None)]
    check_chain(blocks, torch.randn(2, 5, 16, 16), torch.float32, seed=11)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch, size, stride, padding, norm, act, bias, stats", [
    (2, 8, 2, 1, False, None, True, False),             # img2feat: the raw image in, + bias
    (1, 8, 2, 1, False, "leaky_relu", False, True),     # after img2feat: LeakyReLU only; BN statistics out
    (3, 8, 2, 1, True, "leaky_relu", False, True),      # BN -> LeakyReLU -> conv -> BN statistics
    (3, 4, 1, 0, True, "leaky_relu", True, False),      # decision: 4x4 -> 1x1 + bias
], ids=["img2feat", "act_stats", "bn_stats", "decision"])
def test_conv_layer_op(batch, size, stride, padding, norm, act, bias, stats, dtype):
    """The fused op, forward and backward, in every dtype, on identical inputs (tests/parity.py)."""
    check_layer_op((batch, 5, size, size), (7, 5, 4, 4), transposed=False, stride=stride, padding=padding,
                   norm=norm, act=act, slope=0.2, bias=bias, stats=stats, tanh=False, dtype=dtype,
                   seed=batch * 10 + size)
