"""Weight and bias gradients with the forward's prologues recomputed on load.

A k4 conv and a k4 conv-transpose have the same weight-gradient GEMM with roles swapped:

  dW[p, q, kh, kw] = sum over rows (n, r, s) of  B[n, p, r, s] * G[n, q, r*S - P + kh, s*S - P + kw]

  conv           (W[cout, cin]):  B = dy at output positions, G = a = act(norm(x)) at input positions
  conv-transpose (W[cin, cout]):  B = a at input positions,   G = dy at output positions

B and G each get their own prologue, so neither the activation a nor the BN-backward dy is ever
stored: a is recomputed from the stored raw x, dy from (incoming gradient, y) per operands.py.
The reduction over rows is long (N*H*W) and the weight small for the outer layers, so rows split
across programs (split-K): deterministic partials summed afterwards, or fp32 atomics. A program
handles one tap and a block of q, or (FLAT, utils.flat_k) a block of flattened (tap, q) columns.
"""

import functools

import torch
import triton
import triton.language as tl

from .fusion import Prologue
from .operands import load_operand, to_dot
from .utils import INTERPRET, cdiv, clamp_pow2, dot_config, flat_k, launch


@triton.jit
def _wgrad_kernel(
    b_ptr, b_aux, bv0, bv1, bv2, bv3,        # B (N, P, R, S) strided; its prologue aux/vectors
    g_ptr, g_aux, gv0, gv1, gv2, gv3,        # G (N, Q, GH, GW) strided; its prologue aux/vectors
    dw_ptr,                                  # [SPLITS, P, Q, 4, 4] fp32; dW itself with one split or atomics
    N, R, S, P, GH, GW, Q,
    sbn, sbc, sbh, sbw, sgn, sgc, sgh, sgw,
    rows_per_split, b_inv_count, b_slope, g_inv_count, g_slope,
    STRIDE: tl.constexpr, PAD: tl.constexpr, FLAT: tl.constexpr,
    BPRO: tl.constexpr, BACT: tl.constexpr, GPRO: tl.constexpr, GACT: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_p = tl.program_id(0)
    split = tl.program_id(2)
    if FLAT:        # columns are (tap, q) flattened, c = tap * Q + q: all 16 taps in one program
        c = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = c < 16 * Q
        tap = c // Q
        q = c % Q
    else:           # one tap per program, a block of q
        tap = tl.program_id(1) % 16
        q = tl.program_id(1) // 16 * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < Q
    kh = tap // 4
    kw = tap % 4
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    start = split * rows_per_split
    end = tl.minimum(N * R * S, start + rows_per_split)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        n = rows // (R * S)
        rs = rows % (R * S)
        r = rs // S
        s = rs % S
        bt = load_operand(b_ptr, b_aux, (n * sbn + r * sbh + s * sbw)[:, None] + p[None, :] * sbc,
                          rmask[:, None] & pmask[None, :], p, pmask, bv0, bv1, bv2, bv3,
                          b_inv_count, b_slope, BPRO, BACT)
        gh = r[:, None] * STRIDE - PAD + kh      # [BLOCK_R, BLOCK_Q] with FLAT, else [BLOCK_R, 1]
        gw = s[:, None] * STRIDE - PAD + kw
        gvalid = rmask[:, None] & qmask[None, :] & (gh >= 0) & (gh < GH) & (gw >= 0) & (gw < GW)
        gt = load_operand(g_ptr, g_aux, n[:, None] * sgn + gh * sgh + gw * sgw + q[None, :] * sgc,
                          gvalid, q, qmask, gv0, gv1, gv2, gv3, g_inv_count, g_slope, GPRO, GACT)
        acc = tl.dot(tl.trans(to_dot(bt, DOT_DTYPE, INTERPRET)), to_dot(gt, DOT_DTYPE, INTERPRET),
                     acc, input_precision=PRECISION)

    offs = (p[:, None] * Q + q[None, :]) * 16 + kh * 4 + kw
    mask = pmask[:, None] & qmask[None, :]
    if not ATOMIC:
        offs += split * P * Q * 16       # one slice per split, summed afterwards
    if ATOMIC:
        tl.atomic_add(dw_ptr + offs, acc, mask=mask)
    else:
        tl.store(dw_ptr + offs, acc, mask=mask)


@triton.jit
def _channel_sum_kernel(
    x_ptr, aux_ptr, v0, v1, v2, v3,          # (N, C, H, W) strided with its prologue
    out_ptr,                                 # [programs along rows, C] fp32 partial sums
    N, C, H, W, sxn, sxc, sxh, sxw, rows_per_prog, inv_count, slope,
    PRO: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    start = pid_r * rows_per_prog
    end = tl.minimum(N * H * W, start + rows_per_prog)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        n = rows // (H * W)
        hw = rows % (H * W)
        t = load_operand(x_ptr, aux_ptr, (n * sxn + (hw // W) * sxh + (hw % W) * sxw)[:, None] + c[None, :] * sxc,
                         rmask[:, None] & cmask[None, :], c, cmask, v0, v1, v2, v3, inv_count, slope, PRO, ACT)
        acc += tl.sum(t, axis=0)
    tl.store(out_ptr + pid_r * C + c, acc, mask=cmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    return 1 if device.type != "cuda" or INTERPRET else 2 * _num_sms(device.index or 0)


def split_rows(rows: int, block: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split): enough programs for ~2 waves, each reducing >= 4 row blocks."""
    splits = max(1, min(_target_programs(device) // tiles, cdiv(rows, 4 * block)))
    per_split = cdiv(cdiv(rows, splits), block) * block
    return cdiv(rows, per_split), per_split


def wgrad(base: torch.Tensor, base_pro: Prologue, gathered: torch.Tensor, gathered_pro: Prologue, *,
          stride: int, padding: int, dtype: torch.dtype, allow_tf32: bool = False,
          deterministic: bool = False) -> torch.Tensor:
    """dW [P, Q, 4, 4] fp32 (contiguous) from B (N, P, R, S) and G (N, Q, GH, GW); see the module doc."""
    N, P, R, S = base.shape
    _, Q, GH, GW = gathered.shape
    M = N * R * S
    flat = flat_k(Q)
    bp = clamp_pow2(P, 16, 64)
    bq = clamp_pow2(16 * Q, 16, 512 if INTERPRET else 64) if flat else clamp_pow2(Q, 16, 64)
    br = clamp_pow2(M, 16, 1024 if INTERPRET else 64)   # the interpreter pays per op, not per element
    col_tiles = cdiv(16 * Q, bq) if flat else cdiv(Q, bq) * 16
    splits, rows_per_split = split_rows(M, br, cdiv(P, bp) * col_tiles, base.device)
    atomic = splits > 1 and not deterministic
    if splits == 1 or atomic:
        dw = (torch.zeros if atomic else torch.empty)((P, Q, 4, 4), dtype=torch.float32, device=base.device)
    else:
        dw = torch.empty((splits, P, Q, 4, 4), dtype=torch.float32, device=base.device)
    launch(_wgrad_kernel)[(cdiv(P, bp), col_tiles, splits)](
        base, *base_pro.args(base), gathered, *gathered_pro.args(gathered), dw,
        N, R, S, P, GH, GW, Q, *base.stride(), *gathered.stride(),
        rows_per_split, base_pro.inv_count, base_pro.slope, gathered_pro.inv_count, gathered_pro.slope,
        STRIDE=stride, PAD=padding, FLAT=flat, BPRO=base_pro.mode, BACT=base_pro.act, GPRO=gathered_pro.mode,
        GACT=gathered_pro.act, ATOMIC=atomic, **dot_config(dtype, allow_tf32),
        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=br, num_warps=4, num_stages=1 if INTERPRET else 3)
    return dw if dw.dim() == 4 else dw.sum(0)


def channel_sum(x: torch.Tensor, pro: Prologue) -> torch.Tensor:
    """sum over (n, h, w) of pro(x), per channel, fp32: bias gradients. Deterministic."""
    N, C, H, W = x.shape
    bc = clamp_pow2(C, 16, 128)
    br = clamp_pow2(N * H * W, 16, 1024 if INTERPRET else 128)
    progs, rows_per_prog = split_rows(N * H * W, br, cdiv(C, bc), x.device)
    out = torch.empty((progs, C), dtype=torch.float32, device=x.device)
    launch(_channel_sum_kernel)[(progs, cdiv(C, bc))](
        x, *pro.args(x), out, N, C, H, W, *x.stride(), rows_per_prog, pro.inv_count, pro.slope,
        PRO=pro.mode, ACT=pro.act, BLOCK_R=br, BLOCK_C=bc)
    return out.sum(0)
