"""The fused layer ops (kernels/layer.py) as torch sees them: schema, fake implementation and
autograd registration agree with the kernels (torch.library.opcheck), and every option is
passed by name. Their numerics: test_conv.py and test_conv_transpose.py (check_layer_op)."""

from typing import Optional

import pytest
import torch
from torch import Tensor

import fastgan.kernels.layer  # noqa: F401  (registers torch.ops.fastgan.*)
from fastgan.kernels.utils import register_op
from parity import generator

pytestmark = pytest.mark.usefixtures("on_device")

OPS = [torch.ops.fastgan.conv_layer, torch.ops.fastgan.conv_layer_backward]
OPTIONS = dict(stride=2, padding=1, slope=0.2, eps=1e-5, momentum=0.1, deterministic=True,
               dtype=torch.float32, allow_tf32=False)


def layer_inputs(transposed: bool, gen):
    """(tensors, options) of a conv_layer call: a BN + LeakyReLU prologue and statistics for a
    conv, a ReLU prologue and bias + tanh for a conv-transpose; x and the BN affine need grads."""
    cin, cout = 3, 5
    x = torch.randn(2, cin, 4 if transposed else 8, 4 if transposed else 8, generator=gen)
    w = torch.randn((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4), generator=gen) * 0.3
    if transposed:
        tensors = dict(x=x, weight=w, bias=torch.randn(cout, generator=gen), in_mean=None, in_invstd=None,
                       in_gamma=None, in_beta=None, running_mean=None, running_var=None)
        options = dict(OPTIONS, transposed=True, in_act="relu", stats=False, tanh=True)
    else:
        tensors = dict(x=x, weight=w, bias=None, in_mean=torch.randn(cin, generator=gen),
                       in_invstd=torch.rand(cin, generator=gen) + 0.5, in_gamma=torch.randn(cin, generator=gen),
                       in_beta=torch.randn(cin, generator=gen), running_mean=torch.randn(cout, generator=gen),
                       running_var=torch.rand(cout, generator=gen) + 0.5)
        options = dict(OPTIONS, transposed=False, in_act="leaky_relu", stats=True, tanh=False)
    for name in ("x", "weight", "bias", "in_gamma", "in_beta"):
        if tensors[name] is not None:
            tensors[name].requires_grad_()
    return tensors, options


@pytest.mark.parametrize("transposed", [False, True], ids=["conv_bn_stats", "convT_bias_tanh"])
def test_conv_layer_opcheck(transposed):
    """Schema, fake tensors, autograd registration, and forward and backward under AOTAutograd
    equal to eager. Its loss sums |sum(output)| over all five outputs, so the gradients of mean and
    invstd arrive expanded (stride 0): the kernels once read them as ptr + c, i.e. other memory."""
    tensors, options = layer_inputs(transposed, generator(1 + transposed))
    torch.library.opcheck(torch.ops.fastgan.conv_layer, tuple(tensors.values()), options)


def test_conv_layer_backward_opcheck():
    tensors, options = layer_inputs(False, generator(3))
    tensors = {k: v.detach() if v is not None else None for k, v in tensors.items()}
    y, mean, invstd, _, _ = torch.ops.fastgan.conv_layer(*tensors.values(), **options)
    gen = generator(4)
    backward = dict(grad_y=torch.randn(y.shape, generator=gen), grad_mean=torch.randn(mean.shape, generator=gen),
                    grad_invstd=torch.randn(invstd.shape, generator=gen),
                    **{k: v for k, v in tensors.items() if not k.startswith("running")}, y=y, mean=mean, invstd=invstd)
    options = {k: v for k, v in options.items() if k not in ("momentum", "eps")}
    options.update(need_x=True, need_w=True, need_b=False, need_in=True)
    torch.library.opcheck(torch.ops.fastgan.conv_layer_backward, tuple(backward.values()), options)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_options_are_keyword_only(op):
    """Tensors are positional (autograd differentiates only those); every other argument is
    keyword-only, so two adjacent booleans cannot trade places unnoticed."""
    for arg in op.default._schema.arguments:
        is_tensor = isinstance(arg.type, torch.TensorType) or (
            isinstance(arg.type, torch.OptionalType) and isinstance(arg.type.getElementType(), torch.TensorType))
        assert arg.kwarg_only != is_tensor, f"{arg.name}: {arg.type}, kwarg_only={arg.kwarg_only}"


def test_positional_options_are_refused():
    tensors, options = layer_inputs(False, generator(5))
    with pytest.raises((RuntimeError, TypeError)):
        torch.ops.fastgan.conv_layer(*tensors.values(), *options.values())


def test_register_op_refuses_a_positional_option():
    with pytest.raises(TypeError, match="keyword-only"):
        @register_op("fastgan_test::loose", fake=None)
        def loose(x: Tensor, scale: Optional[Tensor], flag: bool) -> Tensor:
            return x
