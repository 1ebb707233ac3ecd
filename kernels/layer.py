"""The fused DCGAN layer as torch.library ops, with autograd.

One op covers a layer of either network:

    y = conv_or_conv_transpose(act(norm(x)), W) [+ bias] [-> tanh],  and (stats) BN statistics of y

where norm(x) = (x - in_mean) * in_invstd * in_gamma + in_beta is the *previous* layer's BatchNorm
(batch statistics in training, running statistics in eval) and act its activation, both applied
while x is loaded. So a stored activation is always a raw GEMM output; BN outputs and activations
are never written. The op returns (y, mean, invstd, new_running_mean, new_running_var); mean and
invstd feed the next layer's prologue, and the caller copies the running statistics into its
buffers (a custom op with autograd must be functional, so it cannot update them itself).

Backward (fastgan::conv_layer_backward), with g = dL/dy from the layer above:
  dy    = g * (1 - y^2) after tanh; g + dmean/n - dinvstd invstd^3 / n * (y - mean) after
          statistics (their gradients arrive as dmean, dinvstd); formed while loading, never stored
  dx    = dgrad(dy, W) * act'(z) * invstd * gamma, with sum dz and sum dz (x - mean) reduced in the
          dgrad epilogue -> d(in_mean, in_invstd, in_gamma, in_beta) (batchnorm.py)
  dW    = wgrad(dy, act(norm(x))) (wgrad.py), dbias = sum dy

Both ops live here rather than in conv.py / conv_transpose.py because each direction's backward
is the other's GEMM (the dgrad of a conv-transpose is a conv and vice versa).

Arguments are defined once, by each op's signature: tensors first and positional (autograd hands
them to setup_context as `inputs` and wants one gradient for each), then, after the `*`, options
that every call must pass by name. setup_context, backward and the fakes look arguments up by name
(utils.tensor_args), so adding one means editing the signature and the code that uses it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .batchnorm import bn_grad, bn_stats
from .conv import conv2d, conv_out_size
from .conv_transpose import conv_transpose2d, conv_transpose_out_size
from .fusion import ACT_NONE, PRO_ACT, PRO_DY_STATS, PRO_DY_TANH, PRO_NORM_ACT, Epilogue, Prologue, activation
from .utils import (channels_last_empty, dense, empty_like_layout, nothing, option_args, register_op,
                    tensor_args)
from .wgrad import channel_sum, wgrad

# The previous layer's BatchNorm, applied in this layer's prologue (arguments of fastgan::conv_layer).
NORM = ("in_mean", "in_invstd", "in_gamma", "in_beta")
# fastgan::conv_layer_backward returns the gradients of these arguments of fastgan::conv_layer, in order.
GRADS = ("x", "weight", "bias", *NORM)


def _out_shape(x: Tensor, weight: Tensor, *, transposed: bool, stride: int, padding: int, **_):
    n, _, h, w = x.shape
    if transposed:
        return n, weight.shape[1], conv_transpose_out_size(h, stride, padding), conv_transpose_out_size(w, stride, padding)
    return n, weight.shape[0], conv_out_size(h, stride, padding), conv_out_size(w, stride, padding)


def _input_prologue(in_mean, in_invstd, in_gamma, in_beta, in_act: Optional[str], slope: float) -> Prologue:
    act = activation(in_act)
    if in_mean is not None:
        return Prologue(PRO_NORM_ACT, act, slope, (in_mean, in_invstd, in_gamma, in_beta))
    if act != ACT_NONE:
        return Prologue(PRO_ACT, act, slope)
    return Prologue()


def _vector(v: Optional[Tensor]) -> Optional[Tensor]:
    """A per-channel vector as the kernels index it, ptr + c: contiguous. (The gradient of a sum
    of mean or invstd arrives expanded, with stride 0; read as ptr + c it was other memory.)"""
    return v.contiguous() if v is not None else None


def _vec(ref: Tensor, n: int) -> Tensor:
    return ref.new_empty(n, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# forward

def _conv_layer_fake(*, x, weight, running_mean, stats, dtype, **options):
    shape = _out_shape(x, weight, **options)
    y = channels_last_empty(shape, dtype, x.device)
    c = shape[1] if stats else 0
    r = c if running_mean is not None else 0
    return y, _vec(x, c), _vec(x, c), _vec(x, r), _vec(x, r)


@register_op("fastgan::conv_layer", fake=_conv_layer_fake)
def conv_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_mean: Optional[Tensor],
               in_invstd: Optional[Tensor], in_gamma: Optional[Tensor], in_beta: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], *, transposed: bool,
               stride: int, padding: int, in_act: Optional[str], slope: float, stats: bool, tanh: bool,
               momentum: float, eps: float, deterministic: bool, dtype: torch.dtype,
               allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """in_act: the previous layer's activation by its name in fastgan.models (None, "relu",
    "leaky_relu" with `slope`), applied after in_mean..in_beta when they are given."""
    x = dense(x)
    bias, in_mean, in_invstd, in_gamma, in_beta, running_mean, running_var = map(
        _vector, (bias, in_mean, in_invstd, in_gamma, in_beta, running_mean, running_var))
    shape = _out_shape(x, weight, transposed=transposed, stride=stride, padding=padding)
    y = channels_last_empty(shape, dtype, x.device)
    gemm = conv_transpose2d if transposed else conv2d
    part = gemm(x, weight, y, stride=stride, padding=padding,
                pro=_input_prologue(in_mean, in_invstd, in_gamma, in_beta, in_act, slope),
                epi=Epilogue(bias=bias, tanh=tanh, stats=stats, shift=running_mean if stats else None),
                dtype=dtype, allow_tf32=allow_tf32, atomic=not deterministic)
    if not stats:
        return y, nothing(x), nothing(x), nothing(x), nothing(x)
    count = shape[0] * shape[2] * shape[3]
    mean, invstd, new_rm, new_rv = bn_stats(part, count, running_mean, running_mean, running_var, eps, momentum)
    return y, mean, invstd, new_rm, new_rv


# ---------------------------------------------------------------------------------------------
# backward

def _conv_layer_backward_fake(*, x, weight, bias, in_mean, need_x, need_w, need_b, need_in, **_):
    gx = empty_like_layout(dense(x)) if need_x else _vec(x, 0)
    gw = torch.empty_like(weight, dtype=torch.float32, memory_format=torch.contiguous_format) if need_w else _vec(x, 0)
    gb = _vec(x, bias.shape[0]) if need_b else _vec(x, 0)
    c = x.shape[1] if (need_in and in_mean is not None) else 0
    return gx, gw, gb, _vec(x, c), _vec(x, c), _vec(x, c), _vec(x, c)


@register_op("fastgan::conv_layer_backward", fake=_conv_layer_backward_fake)
def conv_layer_backward(grad_y: Tensor, grad_mean: Optional[Tensor], grad_invstd: Optional[Tensor],
                        x: Tensor, weight: Tensor, bias: Optional[Tensor], in_mean: Optional[Tensor],
                        in_invstd: Optional[Tensor], in_gamma: Optional[Tensor],
                        in_beta: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor],
                        invstd: Optional[Tensor], *, transposed: bool, stride: int, padding: int,
                        in_act: Optional[str], slope: float, stats: bool, tanh: bool, deterministic: bool,
                        dtype: torch.dtype, allow_tf32: bool, need_x: bool, need_w: bool,
                        need_b: bool, need_in: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of GRADS (empty where not needed) for incoming gradients grad_* of the
    forward's outputs y, mean and invstd; the other arguments are the forward's."""
    x = dense(x)
    grad_mean, grad_invstd, in_mean, in_invstd, in_gamma, in_beta = map(
        _vector, (grad_mean, grad_invstd, in_mean, in_invstd, in_gamma, in_beta))
    if stats:
        if grad_mean is None or grad_invstd is None:
            zeros = torch.zeros_like(mean)
            grad_mean = zeros if grad_mean is None else grad_mean
            grad_invstd = zeros if grad_invstd is None else grad_invstd
        n, _, h, w = y.shape
        dpro = Prologue(PRO_DY_STATS, vecs=(mean, invstd, grad_mean, grad_invstd),
                        aux=y, inv_count=1.0 / (n * h * w))
    elif tanh:
        dpro = Prologue(PRO_DY_TANH, aux=y)
    else:
        dpro = Prologue()
    if dpro.aux is not None and grad_y.stride() != y.stride():
        grad_y = empty_like_layout(y, grad_y.dtype).copy_(grad_y)   # the prologue reads both alike
    grad_y = dense(grad_y)
    pro = _input_prologue(in_mean, in_invstd, in_gamma, in_beta, in_act, slope)
    atomic = not deterministic

    gx, gw, gb = nothing(x), nothing(x), nothing(x)
    g_in = tuple(nothing(x) for _ in range(4))
    norm_grads = need_in and pro.mode == PRO_NORM_ACT
    if need_x or norm_grads:
        gx = empty_like_layout(x)
        dgrad = conv2d if transposed else conv_transpose2d     # each direction's dgrad is the other GEMM
        part = dgrad(grad_y, weight, gx, stride=stride, padding=padding, pro=dpro,
                     epi=Epilogue(dact=True, ex=x, pro=pro), dtype=dtype, allow_tf32=allow_tf32, atomic=atomic)
        if norm_grads:
            g_in = bn_grad(part, in_invstd, in_gamma)
    if need_w:
        if transposed:
            gw = wgrad(x, pro, grad_y, dpro, stride=stride, padding=padding, dtype=dtype,
                       allow_tf32=allow_tf32, deterministic=deterministic)
        else:
            gw = wgrad(grad_y, dpro, x, pro, stride=stride, padding=padding, dtype=dtype,
                       allow_tf32=allow_tf32, deterministic=deterministic)
    if need_b:
        gb = channel_sum(grad_y, dpro)
    return (gx, gw, gb, *g_in)


# ---------------------------------------------------------------------------------------------
# autograd

_INPUTS = tensor_args(torch.ops.fastgan.conv_layer)
# What setup_context keeps for conv_layer_backward: its tensor arguments other than the incoming
# gradients (grad_*), and the forward options it shares.
_SAVED = tuple(n for n in tensor_args(torch.ops.fastgan.conv_layer_backward) if not n.startswith("grad_"))
_SHARED_OPTIONS = tuple(n for n in option_args(torch.ops.fastgan.conv_layer_backward)
                        if n in option_args(torch.ops.fastgan.conv_layer))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    options = keyword_only_inputs
    y, mean, invstd = output[:3]
    stats = options["stats"]
    tensors = dict(zip(_INPUTS, inputs), y=y if (stats or options["tanh"]) else None,
                   mean=mean if stats else None, invstd=invstd if stats else None)
    ctx.save_for_backward(*(tensors[n] for n in _SAVED))
    ctx.options = {n: options[n] for n in _SHARED_OPTIONS}
    # Unused outputs (the running statistics always; mean/invstd outside BN chains) get None, not a
    # zero-filled tensor each: ~50 fewer kernel launches per MMGen iteration (bench/NOTES.md).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_mean, grad_invstd, _grad_rm, _grad_rv):
    need = dict(zip(_INPUTS, ctx.needs_input_grad))
    needs = dict(need_x=need["x"], need_w=need["weight"], need_b=need["bias"],
                 need_in=any(need[n] for n in NORM))
    if not any(needs.values()):
        return (None,) * len(_INPUTS)
    saved = dict(zip(_SAVED, ctx.saved_tensors))
    if grad_y is None:
        grad_y = torch.zeros(_out_shape(saved["x"], saved["weight"], **ctx.options),
                             dtype=ctx.options["dtype"], device=saved["x"].device)
    grads = dict(zip(GRADS, torch.ops.fastgan.conv_layer_backward(
        grad_y, grad_mean, grad_invstd, **saved, **ctx.options, **needs)))

    def grad(name):       # in the input's dtype; None for inputs that need none (or are None)
        g, like = grads.get(name), saved.get(name)
        if not need[name] or like is None:
            return None
        return g.to(like.dtype) if g.dtype != like.dtype else g
    return tuple(grad(n) for n in _INPUTS)


torch.library.register_autograd("fastgan::conv_layer", _backward, setup_context=_setup_context)
