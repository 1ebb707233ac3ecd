"""Shared helpers for the fused kernels: interpreter mode, dtypes, block sizes, op registration.

Kernels are written once for two worlds:
- a GPU, where ops are `torch.library.triton_op`s that torch.compile traces into and a CUDA graph
  captures;
- Triton's CPU interpreter (TRITON_INTERPRET=1, set before this package loads), used by the
  parity tests. There `wrap_triton` returns the raw kernel, which fake tensors cannot run, so ops
  are opaque `torch.library.custom_op`s with a registered fake implementation instead.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Prologue modes: how a GEMM operand is transformed while it is loaded (see operands.py).
PRO_NONE, PRO_ACT, PRO_NORM_ACT, PRO_DY_TANH, PRO_DY_STATS = 0, 1, 2, 3, 4
# Activations.
ACT_NONE, ACT_RELU, ACT_LEAKY = 0, 1, 2
ACTS = {None: ACT_NONE, "relu": ACT_RELU, "leaky_relu": ACT_LEAKY}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise TypeError(f"fused kernels compute in float32, bfloat16 or float16, not {dtype}")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


# None: heuristic. Tests set True/False to exercise both K-loop structures.
FORCE_FLAT_K = None


def flat_k(channels: int) -> bool:
    """Walk K = (tap, channel) as one flat index (per-element gathers) instead of a loop over the
    taps with contiguous channel blocks inside. Flat wins where channels < 16 (a tap loop would
    pad each 16-wide K block: 13/16 waste for RGB) and in the interpreter (one K step instead of
    16 taps: ~10x fewer interpreted ops); the tap loop's contiguous loads win on wide layers."""
    if FORCE_FLAT_K is not None:
        return FORCE_FLAT_K
    return INTERPRET or channels < 16


def gemm_blocks(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tile sizes for an implicit GEMM with m rows, n columns and k per K step (channels, or
    taps * channels with flat K), operands in dtype.

    tl.dot needs every side >= 16. In the interpreter each program costs ~1 ms of Python, so
    tiles are as large as the problem allows there. On a GPU, K steps of 64 for 2-byte operands
    and 32 for fp32 (tf32) keep the same bytes per stage: at 64, fp32 dgrad kernels need 258 KiB
    of shared memory for 3 stages, over Hopper's 227 KiB (bench/sm90.py).
    """
    if INTERPRET:
        return dict(BLOCK_M=clamp_pow2(m, 16, 512), BLOCK_N=clamp_pow2(n, 16, 128),
                    BLOCK_K=clamp_pow2(k, 16, 512), num_warps=4, num_stages=1)
    bm = clamp_pow2(m, 16, 128)
    bn = clamp_pow2(n, 16, 128)
    bk = clamp_pow2(k, 16, 128 // dtype.itemsize)
    # A 128x64 tile on 4 warps spills its prologue (bench/sm90.py: 255 registers and 24-160 bytes
    # of stack); on 8 it builds in 150-210 registers, the same 8 warps per SM.
    warps = 8 if bm * bn >= 128 * 64 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3)


def channels_last_empty(shape, dtype, device) -> torch.Tensor:
    """(N, C, H, W) with NHWC memory: the K (channel) dimension of the next GEMM is contiguous."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def pack_weight(weight: torch.Tensor, k_dim: int, dtype: torch.dtype, cols_after_taps: bool = True) -> torch.Tensor:
    """The weight [A, B, 4, 4] as a GEMM operand: one copy in the compute dtype with the column
    dimension (1 - k_dim) contiguous, returned as a view with the original shape, so a kernel
    indexes it through its strides as before.

    A parameter's own layout ([out, in, kh, kw] or [in, out, kh, kw], fp32) puts 16 elements
    between neighbouring K entries and CIN*16 between columns: every element of a B tile is a
    separate 4-byte load and 64-bit address. Packed [kh, kw, K, cols] (or [K, kh, kw, cols] when
    the columns run over (tap, channel): cols_after_taps=False), a tile row is one contiguous run
    of the compute dtype, half the bytes for bf16 (bench/sm90.py shows the effect on the build).
    The rounding is the one the kernel's to_dot applied to the fp32 weight before."""
    cols = 1 - k_dim
    order = (2, 3, k_dim, cols) if cols_after_taps else (k_dim, 2, 3, cols)
    packed = weight.detach().permute(*order).to(dtype, memory_format=torch.contiguous_format)
    return packed.permute(*[order.index(d) for d in range(4)])


def empty_like_layout(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A new tensor with t's shape and strides (t must be dense, as all our tensors are)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)


def dense(t: torch.Tensor) -> torch.Tensor:
    """t itself if its memory is dense and non-overlapping (so strides address it), else a copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def nothing(ref: torch.Tensor) -> torch.Tensor:
    """The empty tensor ops return where an output does not apply."""
    return ref.new_empty(0, dtype=torch.float32)


def triton_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def launch(kernel):
    """`kernel[grid](...)` that torch.compile can trace (wrap_triton) on a GPU."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


def register_op(name: str, fake):
    """Decorator: a functional torch.library op (triton_op on GPU, custom_op + fake when interpreted)."""
    def wrap(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
        else:
            from torch.library import triton_op
            op = triton_op(name, mutates_args=())(fn)
        return op
    return wrap


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# ---------------------------------------------------------------------------------------------
# What a GEMM launch fuses around itself (see operands.py for the math).

from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402


@dataclass
class Prologue:
    """Applied to the GEMM's input operand as it is loaded."""
    mode: int = PRO_NONE
    act: int = ACT_NONE
    slope: float = 0.0
    vecs: tuple = (None, None, None, None)   # fp32 per-channel vectors, see operands.py
    aux: Optional[torch.Tensor] = None       # PRO_DY_*: the layer's output y (same strides as the operand)
    inv_count: float = 0.0                   # PRO_DY_STATS: 1 / (elements per channel in the statistics)

    def args(self, dummy: torch.Tensor) -> list:
        return [v if v is not None else dummy for v in (self.aux, *self.vecs)]


@dataclass
class Epilogue:
    """Forward (bias, tanh, BN statistics) or, with dact, the dgrad epilogue (activation
    derivative, BN-backward reductions) for the prologue `pro` the forward applied to `ex`."""
    dact: bool = False
    bias: Optional[torch.Tensor] = None
    tanh: bool = False
    stats: bool = False
    shift: Optional[torch.Tensor] = None     # stats: per-channel shift (the running mean) or None
    ex: Optional[torch.Tensor] = None        # dact: forward input, same strides as the output
    pro: Prologue = field(default_factory=Prologue)

    def needs_partials(self) -> bool:
        return self.stats if not self.dact else self.pro.mode == PRO_NORM_ACT

    def args(self, dummy: torch.Tensor) -> list:
        if self.dact:
            return [self.ex if self.ex is not None else dummy, *self.pro.args(dummy)[1:]]
        return [dummy, self.bias if self.bias is not None else dummy,
                self.shift if self.shift is not None else dummy, dummy, dummy]

    def constexprs(self) -> dict:
        return dict(DACT=self.dact, HAS_BIAS=self.bias is not None, TANH=self.tanh, STATS=self.stats,
                    EPRO=self.pro.mode, EACT=self.pro.act)


def partials(rows: int, channels: int, atomic: bool, device) -> torch.Tensor:
    """[rows, 2, C] fp32 per-tile sums; with atomics one zeroed row that every tile adds into."""
    if atomic:
        return torch.zeros((1, 2, channels), dtype=torch.float32, device=device)
    return torch.empty((rows, 2, channels), dtype=torch.float32, device=device)


def dot_config(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """GEMM input dtype and fp32 precision (IEEE unless tf32 is allowed; always IEEE when interpreted)."""
    check_dtype(dtype)
    return dict(DOT_DTYPE=triton_dtype(dtype), PRECISION="tf32" if allow_tf32 and not INTERPRET else "ieee",
                INTERPRET=INTERPRET)
