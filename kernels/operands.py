"""@triton.jit helpers shared by the GEMM kernels: activations and operand prologues.

A GEMM operand tile is always [rows, channels]. While it is loaded, a prologue turns the stored
tensor into the value the GEMM needs, so that value is never written to memory. The kinds, and
the math of each, are named in fusion.py. PRO_DY_TANH and PRO_DY_STATS are the backward of the
forward epilogues: BN backward is affine in (g, y) per channel, so dL/dy is formed on load too.
Padding positions (mask False) are zero after the prologue, as zero padding of the operand is.

Vectors v0..v3 are fp32 per-channel: (mean, invstd, gamma, beta) for PRO_NORM_ACT and
(mean, invstd, dmean, dinvstd) for PRO_DY_STATS.
"""

import triton
import triton.language as tl

from .fusion import ACT_LEAKY, ACT_RELU, PRO_ACT, PRO_DY_STATS, PRO_DY_TANH, PRO_NONE, PRO_NORM_ACT


@triton.jit
def act_fwd(z, ACT: tl.constexpr, slope):
    if ACT == ACT_RELU:
        z = tl.maximum(z, 0.0)
    elif ACT == ACT_LEAKY:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr, slope):
    """d act / dz, with torch's convention at z == 0 (relu: 0, leaky: slope)."""
    d = tl.full(z.shape, 1.0, tl.float32)
    if ACT == ACT_RELU:
        d = tl.where(z > 0, d, 0.0)
    elif ACT == ACT_LEAKY:
        d = tl.where(z > 0, d, slope)
    return d


@triton.jit
def load_operand(ptr, aux_ptr, offs, mask, chan, cmask, v0, v1, v2, v3, inv_count, slope,
                 PRO: tl.constexpr, ACT: tl.constexpr):
    """Tile at ptr + offs ([rows, channels]) in fp32 with the prologue applied; 0 where ~mask."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PRO == PRO_ACT:
        x = act_fwd(x, ACT, slope)
    elif PRO == PRO_NORM_ACT:
        m = tl.load(v0 + chan, mask=cmask, other=0.0)
        s = tl.load(v1 + chan, mask=cmask, other=0.0) * tl.load(v2 + chan, mask=cmask, other=0.0)
        b = tl.load(v3 + chan, mask=cmask, other=0.0)
        x = act_fwd((x - m[None, :]) * s[None, :] + b[None, :], ACT, slope)
    elif PRO == PRO_DY_TANH:
        y = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x * (1.0 - y * y)
    elif PRO == PRO_DY_STATS:
        y = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(v0 + chan, mask=cmask, other=0.0)
        i = tl.load(v1 + chan, mask=cmask, other=0.0)
        c1 = tl.load(v2 + chan, mask=cmask, other=0.0) * inv_count
        c2 = -tl.load(v3 + chan, mask=cmask, other=0.0) * i * i * i * inv_count
        x = x + c1[None, :] + c2[None, :] * (y - m[None, :])
    return tl.where(mask, x, 0.0)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: torch's rounding, bit for bit."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dot(x, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Round an fp32 tile to the GEMM input dtype. The interpreter computes bf16/fp16 arithmetic
    wrongly (and truncates fp32 -> bf16 casts), so there the rounded value stays in fp32 and the
    dot runs in fp32: the products a tensor core forms exactly, summed in fp32."""
    if INTERPRET:
        x = x.to(tl.float32)              # exact from a packed bf16/fp16 weight
        if DOT_DTYPE == tl.bfloat16:
            x = round_bf16(x)
        else:
            x = x.to(DOT_DTYPE).to(tl.float32)
    else:
        x = x.to(DOT_DTYPE)
    return x


@triton.jit
def to_store(x, ptr, INTERPRET: tl.constexpr):
    """An fp32 tile converted, rounding to nearest even, to the element type behind ptr."""
    if INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = round_bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def tanh(x):
    """tanh to a few ulps (libdevice's is unavailable in the interpreter): sign(x) * -e / (2 + e)
    with e = expm1(-2|x|) by Kahan's trick (w - 1) * u / log(w), accurate near 0 where
    1 - 2 / (exp(2x) + 1) loses all relative precision."""
    u = -2.0 * tl.minimum(tl.abs(x), 20.0)      # tanh(20) rounds to 1 in fp32
    w = tl.exp(u)
    e = tl.where(w == 1.0, u, (w - 1.0) * u / tl.log(tl.where(w == 1.0, 0.5, w)))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def store_partials(part_ptr, row, C, chan, cmask, s1, s2, ATOMIC: tl.constexpr):
    """Per-channel sums of one tile into part[row, 0, :] and part[row, 1, :] of a [T, 2, C] fp32
    buffer: one row per tile (deterministic; the finalize kernel adds them in order) or, with
    ATOMIC, all tiles into row 0."""
    p = part_ptr + row * 2 * C + chan
    if ATOMIC:
        tl.atomic_add(p, s1, mask=cmask)
        tl.atomic_add(p + C, s2, mask=cmask)
    else:
        tl.store(p, s1, mask=cmask)
        tl.store(p + C, s2, mask=cmask)


@triton.jit
def epilogue_forward(acc, y_ptr, y_offs, mask, chan, cmask, bias_ptr, shift_ptr, part_ptr,
                     part_row, C, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
                     TANH: tl.constexpr, ATOMIC: tl.constexpr, INTERPRET: tl.constexpr):
    """Forward epilogue of a [rows, channels] fp32 tile: + bias, tanh, store; BN statistics.

    Statistics are taken on y as stored (rounded to its dtype: what the next prologue reads), as
    sums of d = y - shift and d^2 with shift the running mean, close to the batch mean, so that
    the variance E[d^2] - E[d]^2 does not cancel.
    """
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + chan, mask=cmask, other=0.0)[None, :]
    if TANH:
        acc = tanh(acc)
    out = to_store(acc, y_ptr, INTERPRET)
    tl.store(y_ptr + y_offs, out, mask=mask)
    if STATS:
        k = tl.load(shift_ptr + chan, mask=cmask, other=0.0)
        d = tl.where(mask, out.to(tl.float32) - k[None, :], 0.0)
        store_partials(part_ptr, part_row, C, chan, cmask, tl.sum(d, axis=0), tl.sum(d * d, axis=0), ATOMIC)


@triton.jit
def epilogue_dact(acc, gx_ptr, x_ptr, offs, mask, chan, cmask, v0, v1, v2, v3, part_ptr,
                  part_row, C, slope, PRO: tl.constexpr, ACT: tl.constexpr, ATOMIC: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """Backward epilogue of a dgrad tile. acc = dL/da for a = act(norm(x)) (the prologue the
    forward applied to x). Recomputes z from the stored x, forms dz = acc * act'(z), stores
    dL/dx = dz * gamma * invstd (or dz without norm) and, for a BN prologue, adds per channel
    S1 = sum dz and S2 = sum dz * (x - mean): the reductions BN backward needs."""
    if PRO == PRO_NONE:
        tl.store(gx_ptr + offs, to_store(acc, gx_ptr, INTERPRET), mask=mask)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PRO == PRO_ACT:
            dz = acc * act_grad(x, ACT, slope)
            tl.store(gx_ptr + offs, to_store(dz, gx_ptr, INTERPRET), mask=mask)
        else:
            m = tl.load(v0 + chan, mask=cmask, other=0.0)
            s = tl.load(v1 + chan, mask=cmask, other=0.0) * tl.load(v2 + chan, mask=cmask, other=0.0)
            b = tl.load(v3 + chan, mask=cmask, other=0.0)
            xc = x - m[None, :]
            dz = tl.where(mask, acc * act_grad(xc * s[None, :] + b[None, :], ACT, slope), 0.0)
            tl.store(gx_ptr + offs, to_store(dz * s[None, :], gx_ptr, INTERPRET), mask=mask)
            store_partials(part_ptr, part_row, C, chan, cmask, tl.sum(dz, axis=0),
                           tl.sum(dz * xc, axis=0), ATOMIC)


@triton.jit
def epilogue(acc, out_ptr, offs, mask, chan, cmask, e0, e1, e2, e3, e4, part_ptr, part_row, C,
             eslope, DACT: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
             STATS: tl.constexpr, EPRO: tl.constexpr, EACT: tl.constexpr, ATOMIC: tl.constexpr,
             INTERPRET: tl.constexpr):
    """e0..e4 (fusion.Epilogue.args): (ex, mean, invstd, gamma, beta) with DACT, else
    (unused, bias, shift, unused, unused)."""
    if DACT:
        epilogue_dact(acc, out_ptr, e0, offs, mask, chan, cmask, e1, e2, e3, e4, part_ptr, part_row,
                      C, eslope, EPRO, EACT, ATOMIC, INTERPRET)
    else:
        epilogue_forward(acc, out_ptr, offs, mask, chan, cmask, e1, e2, part_ptr, part_row, C,
                         HAS_BIAS, STATS, TANH, ATOMIC, INTERPRET)
