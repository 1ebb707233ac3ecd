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
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .batchnorm import bn_grad, bn_stats
from .conv import conv2d, conv_out_size
from .conv_transpose import conv_transpose2d, conv_transpose_out_size
from .utils import (ACT_NONE, PRO_ACT, PRO_DY_STATS, PRO_DY_TANH, PRO_NORM_ACT, Epilogue, Prologue,
                    channels_last_empty, dense, empty_like_layout, nothing, register_op)
from .wgrad import channel_sum, wgrad


def _out_shape(x: Tensor, weight: Tensor, transposed: bool, stride: int, padding: int):
    n, _, h, w = x.shape
    if transposed:
        return n, weight.shape[1], conv_transpose_out_size(h, stride, padding), conv_transpose_out_size(w, stride, padding)
    return n, weight.shape[0], conv_out_size(h, stride, padding), conv_out_size(w, stride, padding)


def _input_prologue(in_mean, in_invstd, in_gamma, in_beta, in_act: int, slope: float) -> Prologue:
    if in_mean is not None:
        return Prologue(PRO_NORM_ACT, in_act, slope, (in_mean, in_invstd, in_gamma, in_beta))
    if in_act != ACT_NONE:
        return Prologue(PRO_ACT, in_act, slope)
    return Prologue()


def _vec(ref: Tensor, n: int) -> Tensor:
    return ref.new_empty(n, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# forward

def _conv_layer_fake(x, weight, bias, in_mean, in_invstd, in_gamma, in_beta, running_mean, running_var,
                     transposed, stride, padding, in_act, slope, stats, tanh, momentum, eps,
                     deterministic, dtype, allow_tf32):
    shape = _out_shape(x, weight, transposed, stride, padding)
    y = channels_last_empty(shape, dtype, x.device)
    c = shape[1] if stats else 0
    r = c if running_mean is not None else 0
    return y, _vec(x, c), _vec(x, c), _vec(x, r), _vec(x, r)


@register_op("fastgan::conv_layer", fake=_conv_layer_fake)
def conv_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_mean: Optional[Tensor],
               in_invstd: Optional[Tensor], in_gamma: Optional[Tensor], in_beta: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], transposed: bool,
               stride: int, padding: int, in_act: int, slope: float, stats: bool, tanh: bool,
               momentum: float, eps: float, deterministic: bool, dtype: torch.dtype,
               allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = dense(x)
    shape = _out_shape(x, weight, transposed, stride, padding)
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

def _conv_layer_backward_fake(grad_y, grad_mean, grad_invstd, x, weight, bias, in_mean, in_invstd,
                              in_gamma, in_beta, y, mean, invstd, transposed, stride, padding, in_act,
                              slope, stats, tanh, deterministic, dtype, allow_tf32, need_x, need_w,
                              need_b, need_in):
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
                        invstd: Optional[Tensor], transposed: bool, stride: int, padding: int,
                        in_act: int, slope: float, stats: bool, tanh: bool, deterministic: bool,
                        dtype: torch.dtype, allow_tf32: bool, need_x: bool, need_w: bool,
                        need_b: bool, need_in: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = dense(x)
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

def _setup_context(ctx, inputs, output):
    (x, weight, bias, in_mean, in_invstd, in_gamma, in_beta, _rm, _rv, transposed, stride, padding,
     in_act, slope, stats, tanh, _momentum, _eps, deterministic, dtype, allow_tf32) = inputs
    y, mean, invstd = output[:3]
    ctx.save_for_backward(x, weight, bias, in_mean, in_invstd, in_gamma, in_beta,
                          y if (stats or tanh) else None, mean if stats else None, invstd if stats else None)
    ctx.config = (transposed, stride, padding, in_act, slope, stats, tanh, deterministic, dtype, allow_tf32)
    # Unused outputs (the running statistics always; mean/invstd outside BN chains) get None, not a
    # zero-filled tensor each: ~50 fewer kernel launches per MMGen iteration (bench/NOTES.md).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_mean, grad_invstd, _grad_rm, _grad_rv):
    need = ctx.needs_input_grad
    need_x, need_w, need_b, need_in = need[0], need[1], need[2], any(need[3:7])
    nones = (None,) * 14
    if not (need_x or need_w or need_b or need_in):
        return (None,) * 7 + nones
    x, weight, bias, in_mean, in_invstd, in_gamma, in_beta, y, mean, invstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros(_out_shape(x, weight, ctx.config[0], ctx.config[1], ctx.config[2]),
                             dtype=ctx.config[8], device=x.device)
    gx, gw, gb, gm, gi, gg, gbeta = torch.ops.fastgan.conv_layer_backward(
        grad_y, grad_mean, grad_invstd, x, weight, bias, in_mean, in_invstd, in_gamma, in_beta,
        y, mean, invstd, *ctx.config, need_x, need_w, need_b, need_in)
    pick = lambda flag, g, like: (g.to(like.dtype) if g.dtype != like.dtype else g) if flag else None  # noqa: E731
    return (pick(need_x, gx, x), pick(need_w, gw, weight), pick(need_b, gb, bias) if bias is not None else None,
            pick(need[3], gm, in_mean) if in_mean is not None else None,
            pick(need[4], gi, in_invstd) if in_invstd is not None else None,
            pick(need[5], gg, in_gamma) if in_gamma is not None else None,
            pick(need[6], gbeta, in_beta) if in_beta is not None else None) + nones


torch.library.register_autograd("fastgan::conv_layer", _backward, setup_context=_setup_context)
