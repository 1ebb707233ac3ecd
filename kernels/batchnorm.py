"""BatchNorm finalize kernels: the per-channel step between two fused GEMMs.

Training-mode BN needs statistics over the whole batch, so it cannot finish inside the GEMM that
produces its input. That GEMM's epilogue leaves per-tile sums ([T, 2, C] fp32, operands.py);
these kernels reduce them in a fixed order (deterministic for a given launch configuration).

forward:  sums of d = y - k and d^2 (k: the running mean, near the batch mean)
          -> mean = k + E[d], var = E[d^2] - E[d]^2 (biased; used to normalise),
             invstd = 1 / sqrt(var + eps),
             running_mean' = (1 - momentum) running_mean + momentum mean,
             running_var'  = (1 - momentum) running_var + momentum var * n / (n - 1)   (unbiased)
          The next layer's prologue applies (y - mean) * invstd * gamma + beta.
backward: S1 = sum dz, S2 = sum dz (x - mean) from the dgrad epilogue (dz: gradient at the BN
          output before the activation) -> dbeta = S1, dgamma = invstd S2,
          dmean = -gamma invstd S1, dinvstd = gamma S2; the GEMMs of the layer below fold dmean and
          dinvstd into dy as they load it (PRO_DY_STATS).
"""

import torch
import triton
import triton.language as tl

from .utils import cdiv, clamp_pow2, launch


@triton.jit
def _sum_partials(part_ptr, T, C, c, cmask, BLOCK_T: tl.constexpr):
    s1 = tl.zeros(c.shape, dtype=tl.float32)
    s2 = tl.zeros(c.shape, dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t < T)[:, None] & cmask[None, :]
        p = part_ptr + t[:, None] * 2 * C + c[None, :]
        s1 += tl.sum(tl.load(p, mask=m, other=0.0), axis=0)
        s2 += tl.sum(tl.load(p + C, mask=m, other=0.0), axis=0)
    return s1, s2


@triton.jit
def _bn_stats_kernel(
    part_ptr, shift_ptr, rm_ptr, rv_ptr,             # [T, 2, C] sums; shift k; running mean/var (C,)
    mean_ptr, invstd_ptr, new_rm_ptr, new_rv_ptr,    # outputs (C,) fp32
    T, C, count, eps, momentum,
    HAS_SHIFT: tl.constexpr, TRACK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1, s2 = _sum_partials(part_ptr, T, C, c, cmask, BLOCK_T)
    d1 = s1 / count
    var = tl.maximum(s2 / count - d1 * d1, 0.0)
    mean = d1
    if HAS_SHIFT:
        mean += tl.load(shift_ptr + c, mask=cmask, other=0.0)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt_rn(var + eps), mask=cmask)
    if TRACK:
        rm = tl.load(rm_ptr + c, mask=cmask, other=0.0)
        rv = tl.load(rv_ptr + c, mask=cmask, other=0.0)
        tl.store(new_rm_ptr + c, (1.0 - momentum) * rm + momentum * mean, mask=cmask)
        tl.store(new_rv_ptr + c, (1.0 - momentum) * rv + momentum * (var * count / (count - 1.0)), mask=cmask)


@triton.jit
def _bn_grad_kernel(
    part_ptr, invstd_ptr, gamma_ptr,                 # [T, 2, C] sums of dz, dz (x - mean); (C,) each
    dmean_ptr, dinvstd_ptr, dgamma_ptr, dbeta_ptr,   # outputs (C,) fp32
    T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1, s2 = _sum_partials(part_ptr, T, C, c, cmask, BLOCK_T)
    i = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    g = tl.load(gamma_ptr + c, mask=cmask, other=0.0)
    tl.store(dbeta_ptr + c, s1, mask=cmask)
    tl.store(dgamma_ptr + c, i * s2, mask=cmask)
    tl.store(dmean_ptr + c, -g * i * s1, mask=cmask)
    tl.store(dinvstd_ptr + c, g * s2, mask=cmask)


def _blocks(T: int, C: int):
    bc = clamp_pow2(C, 16, 128)
    return (cdiv(C, bc),), dict(BLOCK_T=clamp_pow2(T, 1, 64), BLOCK_C=bc)


def bn_stats(part: torch.Tensor, count: int, shift, running_mean, running_var, eps: float, momentum: float):
    """(mean, invstd, new_running_mean, new_running_var), fp32 (C,); the last two empty when not tracking."""
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
    T, _, C = part.shape
    new = lambda: torch.empty(C, dtype=torch.float32, device=part.device)  # noqa: E731
    mean, invstd = new(), new()
    track = running_mean is not None
    new_rm, new_rv = (new(), new()) if track else (part.new_empty(0), part.new_empty(0))
    grid, blocks = _blocks(T, C)
    launch(_bn_stats_kernel)[grid](
        part, shift if shift is not None else part, running_mean if track else part,
        running_var if track else part, mean, invstd, new_rm if track else part, new_rv if track else part,
        T, C, float(count), eps, momentum, HAS_SHIFT=shift is not None, TRACK=track, **blocks)
    return mean, invstd, new_rm, new_rv


def bn_grad(part: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor):
    """(dmean, dinvstd, dgamma, dbeta), fp32 (C,), for the prologue (x - mean) * invstd * gamma + beta."""
    T, _, C = part.shape
    outs = [torch.empty(C, dtype=torch.float32, device=part.device) for _ in range(4)]
    grid, blocks = _blocks(T, C)
    launch(_bn_grad_kernel)[grid](part, invstd, gamma, *outs, T, C, **blocks)
    return tuple(outs)
