"""Implicit-GEMM transposed convolution, kernel 4, with fused prologue and epilogue
(operands.py). Serves G's forward (conv-transpose -> BN stats | bias + tanh) and D's dgrad (the
input gradient of a stride-s conv is a stride-s conv-transpose with the same weight tensor).

Two geometries, both without wasted taps:
- stride 2, padding 1 (H -> 2H): output phase (ph, pw) = (oh % 2, ow % 2) is a stride-1 2x2
  convolution of the input: oh = 2i + ph takes taps kh = 1 - ph + 2t from ih = i + ph - t,
  t in {0, 1}. Grid axis 2 runs the 4 phases; K = 4 * CIN.
- stride 1, padding 0 from a 1x1 input (G.noise2feat; the dgrad of D.decision): one plain GEMM
  z [N, CIN] @ W [CIN, (kh, kw, co)], columns flattened; BN partial sums go to one row per
  (row tile, output pixel).
GEMM rows are input positions (n, i, j); columns are output channels. K walks taps and channel
blocks, or one flat (tap, channel) index (utils.flat_k).
"""

import torch
import triton
import triton.language as tl

from .fusion import Epilogue, Prologue, partials
from .operands import epilogue, load_operand, to_dot
from .utils import cdiv, dot_config, flat_k, gemm_blocks, launch, pack_weight


@triton.jit
def _conv_transpose_kernel(
    x_ptr, aux_ptr, pv0, pv1, pv2, pv3,      # input (N, CIN, H, W) strided; prologue aux/vectors over CIN
    w_ptr,                                   # weight viewed as [CIN, COUT, 4, 4] through its strides
    out_ptr, e0, e1, e2, e3, e4, part_ptr,   # output (N, COUT, HO, WO); epilogue args; [T, 2, COUT]
    N, H, W, CIN, HO, WO, COUT,
    sxn, sxc, sxh, sxw,                      # strides of x (and aux)
    swi, swo, swh, sww,                      # strides of the weight: in channel, out channel, kh, kw
    son, soc, soh, sow,                      # strides of out (and the dact epilogue's ex)
    inv_count, slope, eslope,
    ONE_BY_ONE: tl.constexpr, FLAT_K: tl.constexpr, PRO: tl.constexpr, ACT: tl.constexpr,
    DACT: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr, STATS: tl.constexpr,
    EPRO: tl.constexpr, EACT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N * H * W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if ONE_BY_ONE:
        # rows = n; columns = (kh, kw, co) flattened, co fastest (contiguous in an NHWC output)
        co = cols % COUT
        kh = cols // COUT // 4
        kw = cols // COUT % 4
        nmask = cols < 16 * COUT
        for c0 in range(0, CIN, BLOCK_K):
            ci = c0 + kk
            kmask = ci < CIN
            a = load_operand(x_ptr, aux_ptr, rows[:, None] * sxn + ci[None, :] * sxc,
                             rmask[:, None] & kmask[None, :], ci, kmask, pv0, pv1, pv2, pv3,
                             inv_count, slope, PRO, ACT)
            b = tl.load(w_ptr + ci[:, None] * swi + (co * swo + kh * swh + kw * sww)[None, :],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(to_dot(a, DOT_DTYPE, INTERPRET), to_dot(b, DOT_DTYPE, INTERPRET), acc,
                         input_precision=PRECISION)
        offs = rows[:, None] * son + (co * soc + kh * soh + kw * sow)[None, :]
        part_row = 0 if ATOMIC else pid_m * 16 + kh * 4 + kw     # one partial row per (tile, pixel)
        epilogue(acc, out_ptr, offs, rmask[:, None] & nmask[None, :], co, nmask, e0, e1, e2, e3, e4,
                 part_ptr, part_row, COUT, eslope, DACT, HAS_BIAS, TANH, STATS, EPRO, EACT, ATOMIC,
                 INTERPRET)
    else:
        phase = tl.program_id(2)
        ph = phase // 2
        pw = phase % 2
        n = rows // (H * W)
        ij = rows % (H * W)
        i = ij // W
        j = ij % W
        nmask = cols < COUT
        if FLAT_K:
            for k0 in range(0, 4 * CIN, BLOCK_K):    # k = (th * 2 + tw) * CIN + ci
                k = k0 + kk
                kmask = k < 4 * CIN
                ci = k % CIN
                th = k // CIN // 2
                tw = k // CIN % 2
                ih = i[:, None] + ph - th[None, :]
                iw = j[:, None] + pw - tw[None, :]
                valid = rmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = load_operand(x_ptr, aux_ptr, n[:, None] * sxn + ih * sxh + iw * sxw + ci[None, :] * sxc,
                                 valid, ci, kmask, pv0, pv1, pv2, pv3, inv_count, slope, PRO, ACT)
                b = tl.load(w_ptr + (ci * swi + (1 - ph + 2 * th) * swh + (1 - pw + 2 * tw) * sww)[:, None]
                            + cols[None, :] * swo, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(to_dot(a, DOT_DTYPE, INTERPRET), to_dot(b, DOT_DTYPE, INTERPRET), acc,
                             input_precision=PRECISION)
        else:
            for th in range(2):
                for tw in range(2):
                    ih = i + ph - th
                    iw = j + pw - tw
                    valid = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    x_row = n * sxn + ih * sxh + iw * sxw
                    w_tap = w_ptr + (1 - ph + 2 * th) * swh + (1 - pw + 2 * tw) * sww
                    for c0 in range(0, CIN, BLOCK_K):
                        ci = c0 + kk
                        kmask = ci < CIN
                        a = load_operand(x_ptr, aux_ptr, x_row[:, None] + ci[None, :] * sxc,
                                         valid[:, None] & kmask[None, :], ci, kmask, pv0, pv1, pv2, pv3,
                                         inv_count, slope, PRO, ACT)
                        b = tl.load(w_tap + ci[:, None] * swi + cols[None, :] * swo,
                                    mask=kmask[:, None] & nmask[None, :], other=0.0)
                        acc = tl.dot(to_dot(a, DOT_DTYPE, INTERPRET), to_dot(b, DOT_DTYPE, INTERPRET),
                                     acc, input_precision=PRECISION)
        offs = (n * son + (2 * i + ph) * soh + (2 * j + pw) * sow)[:, None] + cols[None, :] * soc
        part_row = 0 if ATOMIC else phase * tl.num_programs(0) + pid_m
        epilogue(acc, out_ptr, offs, rmask[:, None] & nmask[None, :], cols, nmask, e0, e1, e2, e3, e4,
                 part_ptr, part_row, COUT, eslope, DACT, HAS_BIAS, TANH, STATS, EPRO, EACT, ATOMIC,
                 INTERPRET)


def conv_transpose_out_size(h: int, stride: int, padding: int) -> int:
    return (h - 1) * stride - 2 * padding + 4


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, *, stride: int,
                     padding: int, pro: Prologue, epi: Epilogue, dtype: torch.dtype,
                     allow_tf32: bool = False, atomic: bool = False):
    """out <- epi(conv_transpose2d(pro(x), weight)); weight[i, o, kh, kw] (any strides).
    Returns the [T, 2, COUT] partial sums when the epilogue makes them, else None."""
    N, CIN, H, W = x.shape
    COUT, HO, WO = out.shape[1:]
    one_by_one = (stride, padding, H, W) == (1, 0, 1, 1)
    if not one_by_one and (stride, padding) != (2, 1):
        raise ValueError(f"conv_transpose2d supports stride 2 padding 1, or stride 1 padding 0 from a "
                         f"1x1 input; got stride {stride}, padding {padding}, input {H}x{W}")
    if weight.shape != (CIN, COUT, 4, 4) or (HO, WO) != (conv_transpose_out_size(H, stride, padding),) * 2:
        raise ValueError(f"conv_transpose2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"out {tuple(out.shape)} do not fit kernel 4, stride {stride}, padding {padding}")
    if pro.aux is not None and pro.aux.stride() != x.stride():
        raise ValueError("conv_transpose2d: the prologue's aux tensor must share x's strides")
    weight = pack_weight(weight, 0, dtype, cols_after_taps=not one_by_one)   # [i, o, kh, kw]; o contiguous
    flat = flat_k(CIN) and not one_by_one
    cols, phases = (16 * COUT, 1) if one_by_one else (COUT, 4)
    cfg = gemm_blocks(N * H * W, cols, 4 * CIN if flat else CIN, dtype)
    grid = (cdiv(N * H * W, cfg["BLOCK_M"]), cdiv(cols, cfg["BLOCK_N"]), phases)
    part = partials(grid[0] * 16 if one_by_one else grid[0] * phases, COUT, atomic, x.device) \
        if epi.needs_partials() else None
    launch(_conv_transpose_kernel)[grid](
        x, *pro.args(x), weight, out, *epi.args(x), part if part is not None else x,
        N, H, W, CIN, HO, WO, COUT, *x.stride(), *weight.stride(), *out.stride(),
        pro.inv_count, pro.slope, epi.pro.slope,
        ONE_BY_ONE=one_by_one, FLAT_K=flat, PRO=pro.mode, ACT=pro.act, ATOMIC=atomic,
        **epi.constexprs(), **dot_config(dtype, allow_tf32), **cfg)
    return part
