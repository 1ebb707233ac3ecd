"""The triton backend of fastgan.models.Generator / Discriminator.

The same modules, parameters and buffers as the torch backend, run through one fused op per layer
(fastgan.kernels.layer): each layer's BatchNorm and activation are applied by the *next* layer's
GEMM as it loads its input, so the network stores only raw GEMM outputs. Training mode normalises
with batch statistics and updates running_mean / running_var / num_batches_tracked exactly as
nn.BatchNorm2d does; eval mode normalises with the running statistics and updates nothing.

Compute dtype: the autocast dtype when autocast is on for the input's device (bf16/fp16 storage,
fp32 accumulation and statistics), else the input's dtype. fp32 GEMMs use tf32 exactly when
torch.backends.cudnn.allow_tf32 would let the reference convolutions use it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgan.kernels.layer import NORM  # (importing layer registers torch.ops.fastgan.*)
from fastgan.kernels.utils import DTYPES


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype in DTYPES else torch.float32


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run net.blocks() (ConvModules) through the fused layer op."""
    dtype = compute_dtype(x)
    allow_tf32 = x.device.type == "cuda" and torch.backends.cudnn.allow_tf32
    norm = dict.fromkeys(NORM)           # the previous layer's BN, applied in this layer's prologue
    act, slope = None, 0.0               # the previous layer's activation, likewise
    buffers, updates, counters = [], [], []
    blocks = net.blocks()
    for i, blk in enumerate(blocks):
        conv, bn = blk.conv, blk.bn
        if i == len(blocks) - 1 and (bn is not None or blk.act not in (None, "tanh")):
            raise NotImplementedError("the fused backend ends a network with a GEMM epilogue (bias, tanh)")
        batch_stats = bn is not None and (net.training or not bn.track_running_stats)
        track = batch_stats and bn.track_running_stats
        if track and bn.momentum is None:
            raise NotImplementedError("BatchNorm with momentum=None (cumulative average) is not fused")
        y, mean, invstd, new_rm, new_rv = torch.ops.fastgan.conv_layer(
            x, conv.weight, conv.bias, **norm,
            running_mean=bn.running_mean if track else None, running_var=bn.running_var if track else None,
            transposed=blk.transposed, stride=blk.stride, padding=blk.padding, in_act=act, slope=slope,
            stats=batch_stats, tanh=blk.act == "tanh", momentum=bn.momentum if track else 0.0,
            eps=bn.eps if bn is not None else 0.0, deterministic=net.deterministic, dtype=dtype,
            allow_tf32=allow_tf32)
        if bn is None:
            norm = dict.fromkeys(NORM)
        elif batch_stats:
            norm = dict(zip(NORM, (mean, invstd, bn.weight, bn.bias)))
        else:
            norm = dict(zip(NORM, (bn.running_mean, torch.rsqrt(bn.running_var + bn.eps), bn.weight, bn.bias)))
        if track:
            buffers += [bn.running_mean, bn.running_var]
            updates += [new_rm, new_rv]
            counters.append(bn.num_batches_tracked)
        act, slope = blk.act, blk.slope
        x = y
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(buffers, updates)
            torch._foreach_add_(counters, 1)
    return x.flatten(1) if x.shape[2:] == (1, 1) else x
