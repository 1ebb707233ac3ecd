"""Shared helpers for the fused kernels: interpreter mode, dtypes, block sizes, op registration.

Kernels are written once for two worlds:
- a GPU, where ops are `torch.library.triton_op`s that torch.compile traces into and a CUDA graph
  captures;
- Triton's CPU interpreter (TRITON_INTERPRET=1, set before this package loads), used by the
  parity tests. There `wrap_triton` returns the raw kernel, which fake tensors cannot run, so ops
  are opaque `torch.library.custom_op`s with a registered fake implementation instead.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


# Triton 3.6's interpreter turns a loop bound into an int with int(array) (runtime/interpreter.py,
# `__index__`), which numpy 2.5 refuses for 1-element arrays; 3.9 squeezes first. Seen here: the
# parity tests pass on triton 3.6.0 with numpy 2.2 and fail with 2.5.5 ("only 0-dimensional arrays
# can be converted to Python scalars"). A GPU never runs the interpreter.
if INTERPRET and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 5):
    from fastgan.errors import UserError
    raise UserError(f"triton {triton.__version__}'s interpreter (the triton backend on a CPU) fails with numpy "
                    f"{np.__version__}: pip install 'numpy<2.5', or triton>=3.9")

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
    """Decorator: a functional torch.library op (triton_op on GPU, custom_op + fake when interpreted)
    whose schema is the function's signature. Tensors come first: autograd differentiates only
    those. Every other argument must be keyword-only (after a `*`), so that no call can pass two
    options in each other's place. `fake` is called with every argument by name."""
    def wrap(fn):
        signature = inspect.signature(fn)
        loose = [p.name for p in signature.parameters.values()
                 if p.kind is not p.KEYWORD_ONLY and "Tensor" not in str(p.annotation)]
        if loose:
            raise TypeError(f"{name}: {loose} must be keyword-only arguments (after the `*`)")
        if INTERPRET:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(lambda *args, **kwargs: fake(**signature.bind(*args, **kwargs).arguments))
        else:
            from torch.library import triton_op
            op = triton_op(name, mutates_args=())(fn)
        return op
    return wrap


def tensor_args(op) -> tuple:
    """The names of an op's tensor (positional) arguments in schema order: the order of autograd's
    `inputs` and `needs_input_grad`, and of the gradients a backward returns."""
    return tuple(a.name for a in op.default._schema.arguments if not a.kwarg_only)


def option_args(op) -> tuple:
    """The names of an op's keyword-only arguments."""
    return tuple(a.name for a in op.default._schema.arguments if a.kwarg_only)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def dot_config(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """GEMM input dtype and fp32 precision (IEEE unless tf32 is allowed; always IEEE when interpreted)."""
    check_dtype(dtype)
    return dict(DOT_DTYPE=triton_dtype(dtype), PRECISION="tf32" if allow_tf32 and not INTERPRET else "ieee",
                INTERPRET=INTERPRET)
