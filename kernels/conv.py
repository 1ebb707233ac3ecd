"""Implicit-GEMM convolution, kernel 4, stride 1 or 2, padding 0 or 1, with fused prologue and
epilogue (operands.py). Serves D's forward (conv -> BN stats | bias) and G's dgrad (the input
gradient of a stride-s conv-transpose is a stride-s conv with the same weight tensor).

GEMM: rows = output positions (n, oh, ow), columns = output channels, K = (kh, kw, ci): for each
of the 16 taps, the input row (n, oh*S - P + kh, ow*S - P + kw) is loaded channel block by
channel block (or, with FLAT_K, K runs as one index over taps and channels: utils.flat_k), with
the prologue applied and zero padding outside the image. No im2col buffer.
"""

import torch
import triton
import triton.language as tl

from .fusion import Epilogue, Prologue, partials
from .operands import epilogue, load_operand, to_dot
from .utils import cdiv, dot_config, flat_k, gemm_blocks, launch, pack_weight


@triton.jit
def _conv_kernel(
    x_ptr, aux_ptr, pv0, pv1, pv2, pv3,      # input (N, CIN, H, W) strided; prologue aux/vectors over CIN
    w_ptr,                                   # weight viewed as [COUT, CIN, 4, 4] through its strides
    out_ptr, e0, e1, e2, e3, e4, part_ptr,   # output (N, COUT, HO, WO) strided; epilogue args; [T, 2, COUT]
    N, H, W, CIN, HO, WO, COUT,
    sxn, sxc, sxh, sxw,                      # strides of x (and aux)
    swo, swi, swh, sww,                      # strides of the weight: out channel, in channel, kh, kw
    son, soc, soh, sow,                      # strides of out (and the dact epilogue's ex)
    inv_count, slope, eslope,
    STRIDE: tl.constexpr, PAD: tl.constexpr, FLAT_K: tl.constexpr, PRO: tl.constexpr, ACT: tl.constexpr,
    DACT: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr, STATS: tl.constexpr,
    EPRO: tl.constexpr, EACT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N * HO * WO
    n = rows // (HO * WO)
    ohw = rows % (HO * WO)
    oh = ohw // WO
    ow = ohw % WO
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < COUT
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        for k0 in range(0, 16 * CIN, BLOCK_K):      # k = (kh * 4 + kw) * CIN + ci
            k = k0 + kk
            kmask = k < 16 * CIN
            ci = k % CIN
            kh = k // CIN // 4
            kw = k // CIN % 4
            ih = oh[:, None] * STRIDE - PAD + kh[None, :]
            iw = ow[:, None] * STRIDE - PAD + kw[None, :]
            valid = rmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = load_operand(x_ptr, aux_ptr, n[:, None] * sxn + ih * sxh + iw * sxw + ci[None, :] * sxc,
                             valid, ci, kmask, pv0, pv1, pv2, pv3, inv_count, slope, PRO, ACT)
            b = tl.load(w_ptr + (ci * swi + kh * swh + kw * sww)[:, None] + cols[None, :] * swo,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(to_dot(a, DOT_DTYPE, INTERPRET), to_dot(b, DOT_DTYPE, INTERPRET), acc,
                         input_precision=PRECISION)
    else:
        for kh in range(4):
            ih = oh * STRIDE - PAD + kh
            for kw in range(4):
                iw = ow * STRIDE - PAD + kw
                valid = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = n * sxn + ih * sxh + iw * sxw
                w_tap = w_ptr + kh * swh + kw * sww
                for c0 in range(0, CIN, BLOCK_K):
                    ci = c0 + kk
                    kmask = ci < CIN
                    a = load_operand(x_ptr, aux_ptr, x_row[:, None] + ci[None, :] * sxc,
                                     valid[:, None] & kmask[None, :], ci, kmask, pv0, pv1, pv2, pv3,
                                     inv_count, slope, PRO, ACT)
                    b = tl.load(w_tap + ci[:, None] * swi + cols[None, :] * swo,
                                mask=kmask[:, None] & nmask[None, :], other=0.0)
                    acc = tl.dot(to_dot(a, DOT_DTYPE, INTERPRET), to_dot(b, DOT_DTYPE, INTERPRET), acc,
                                 input_precision=PRECISION)

    offs = (n * son + oh * soh + ow * sow)[:, None] + cols[None, :] * soc
    part_row = 0 if ATOMIC else pid_m
    epilogue(acc, out_ptr, offs, rmask[:, None] & nmask[None, :], cols, nmask, e0, e1, e2, e3, e4,
             part_ptr, part_row, COUT, eslope, DACT, HAS_BIAS, TANH, STATS, EPRO, EACT, ATOMIC,
             INTERPRET)


def conv_out_size(h: int, stride: int, padding: int) -> int:
    return (h + 2 * padding - 4) // stride + 1


def conv2d(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, stride: int, padding: int,
           pro: Prologue, epi: Epilogue, dtype: torch.dtype, allow_tf32: bool = False,
           atomic: bool = False):
    """out <- epi(conv2d(pro(x), weight)); weight[o, i, kh, kw] (any strides). Returns the [T, 2, COUT]
    partial sums when the epilogue makes them (BN statistics or BN-backward reductions), else None."""
    N, CIN, H, W = x.shape
    COUT, HO, WO = out.shape[1:]
    if weight.shape != (COUT, CIN, 4, 4) or (HO, WO) != (conv_out_size(H, stride, padding),) * 2:
        raise ValueError(f"conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)} "
                         f"do not fit kernel 4, stride {stride}, padding {padding}")
    if pro.aux is not None and pro.aux.stride() != x.stride():
        raise ValueError("conv2d: the prologue's aux tensor must share x's strides")
    weight = pack_weight(weight, 1, dtype)             # [o, i, kh, kw] viewed; o contiguous
    flat = flat_k(CIN)
    cfg = gemm_blocks(N * HO * WO, COUT, 16 * CIN if flat else CIN, dtype)
    grid = (cdiv(N * HO * WO, cfg["BLOCK_M"]), cdiv(COUT, cfg["BLOCK_N"]))
    part = partials(grid[0], COUT, atomic, x.device) if epi.needs_partials() else None
    launch(_conv_kernel)[grid](
        x, *pro.args(x), weight, out, *epi.args(x), part if part is not None else x,
        N, H, W, CIN, HO, WO, COUT, *x.stride(), *weight.stride(), *out.stride(),
        pro.inv_count, pro.slope, epi.pro.slope,
        STRIDE=stride, PAD=padding, FLAT_K=flat, PRO=pro.mode, ACT=pro.act, ATOMIC=atomic,
        **epi.constexprs(), **dot_config(dtype, allow_tf32), **cfg)
    return part
