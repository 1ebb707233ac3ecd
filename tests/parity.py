"""Shared by the kernel parity tests: run chains of fastgan ConvModules through the torch
reference modules and through the fused ops, and compare everything.

Error measure: max |fused - reference| / max |reference| per tensor (a norm-wise relative error:
elementwise relative error is meaningless where the reference crosses zero).

Tolerances, against an fp32 torch reference:
- fp32 1e-5: both sides sum the same products in fp32 in different orders; the rounding error
  grows like sqrt(K) * 6e-8 for K <= 2048 terms per output (<= 3e-6), and BatchNorm's
  normalisation, which divides by a batch standard deviation, amplifies it by at most a few.
- fp16 1e-2: GEMM inputs are rounded to fp16 (relative 2^-11 = 4.9e-4 each) at every layer, in
  forward and backward; three to five layers compound to ~3e-3 (measured 0.9e-3 for a 4-layer G;
  torch's own fp16 autocast gives 1.3e-3 on the same case).
- bf16 3e-2: the same with 2^-8 = 3.9e-3 per rounding (measured 7.9e-3 on a 4-layer G; torch's
  bf16 autocast 9.6e-3). The interpreter cannot do bf16 arithmetic, so the kernels round to bf16
  on the bits and compute in fp32 there (kernels/operands.py): the numerics a tensor core gives.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"


class Chain(nn.Module):
    """ConvModules in sequence, run by either backend (fastgan.fused.forward needs blocks())."""

    def __init__(self, blocks, backend="torch"):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.backend, self.deterministic = backend, True

    def blocks(self):
        return list(self.layers)

    def forward(self, x):
        if self.backend == "triton":
            from fastgan import fused
            return fused.forward(self, x)
        for blk in self.layers:
            x = blk(x)
        return x.flatten(1) if x.shape[2:] == (1, 1) else x


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Fresh random weights, biases, BN affine and running statistics (no 0s and 1s to hide behind)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight.shape[1 if isinstance(m, nn.Conv2d) else 0] * 16
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in / 4))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=gen) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def check_chain(blocks, x: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    """Reference vs fused: output, input grad, every parameter grad, running statistics
    (after the training forward), then the eval-mode output from the updated statistics."""
    gen = torch.Generator().manual_seed(seed)
    ref = Chain(blocks)
    randomize(ref, gen)
    fused = copy.deepcopy(ref)
    fused.backend = "triton"
    tol = TOL[dtype]

    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(x_ref)
    with autocast(dtype):
        out_fused = fused(x_fused)
    assert out_fused.dtype == dtype, f"output dtype {out_fused.dtype}, expected {dtype}"
    assert_close(out_fused, out_ref, tol, "output")
    g = torch.randn(out_ref.shape, generator=gen)
    (out_ref * g).sum().backward()
    (out_fused.float() * g).sum().backward()
    assert_close(x_fused.grad, x_ref.grad, tol, "input grad")
    for (name, p_ref), (_, p_fused) in zip(ref.named_parameters(), fused.named_parameters()):
        assert_close(p_fused.grad, p_ref.grad, tol, f"grad of {name}")
    for (name, b_ref), (_, b_fused) in zip(ref.named_buffers(), fused.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b_fused, b_ref), f"{name}: {b_fused} != {b_ref}"
        else:
            assert_close(b_fused, b_ref, tol, name)

    ref.eval()
    fused.eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with torch.no_grad(), autocast(dtype):
        out_fused = fused(x)
    with torch.no_grad():
        out_ref = ref(x)
    assert_close(out_fused, out_ref, tol, "eval output")
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"eval mode changed {k}"
