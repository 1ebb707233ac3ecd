"""The fusion vocabulary: what a GEMM applies to an operand as it loads it (the prologue) and to
its output tile before it stores it (the epilogue), named once for the kernels and the launchers.

Prologue kinds (operands.load_operand; g is the incoming gradient of the layer's output y):

  PRO_NONE      a = x
  PRO_ACT       a = act(x)                                   (a bias-only layer before: D.img2feat)
  PRO_NORM_ACT  a = act((x - mean) * invstd * gamma + beta)  (train BN: batch stats; eval: running)
  PRO_DY_TANH   a = g * (1 - y^2)                            (backward through bias + tanh)
  PRO_DY_STATS  a = g + dmean/M - dinvstd * invstd^3 / M * (y - mean)
                                                             (backward through the batch statistics)

Activations: ACT_NONE, ACT_RELU, ACT_LEAKY (leaky ReLU with a runtime slope).

The kinds are Triton constexpr globals, so the @triton.jit helpers compare against the names
(`PRO == PRO_NORM_ACT`). Triton lets a kernel read a global only if it is a `tl.constexpr(...)`
instance; a plain int or a global annotated `: tl.constexpr` is a NameError at compile time
(Triton 3.6 and 3.9 alike). On the host they compare equal to plain ints (`2 == PRO_NORM_ACT`),
but hash differently, and torch.compile writes launch arguments into generated code: so
Prologue keeps plain ints, and `.value` is what a dictionary key or a launch argument takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import triton.language as tl

PRO_NONE = tl.constexpr(0)
PRO_ACT = tl.constexpr(1)
PRO_NORM_ACT = tl.constexpr(2)
PRO_DY_TANH = tl.constexpr(3)
PRO_DY_STATS = tl.constexpr(4)

ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY = tl.constexpr(2)

# The activations a layer may hand to the next layer's prologue, by their names in fastgan.models.
ACTS = {None: ACT_NONE.value, "relu": ACT_RELU.value, "leaky_relu": ACT_LEAKY.value}


def activation(name: Optional[str]) -> int:
    """The ACT_* value of a model's activation name."""
    if name not in ACTS:
        raise ValueError(f"a fused prologue applies one of {list(ACTS)}, not {name!r}")
    return ACTS[name]


def _plain(kind) -> int:
    return kind.value if isinstance(kind, tl.constexpr) else kind


@dataclass
class Prologue:
    """Applied to the GEMM's input operand as it is loaded."""
    mode: int = PRO_NONE.value
    act: int = ACT_NONE.value
    slope: float = 0.0
    vecs: tuple = (None, None, None, None)   # fp32 per-channel vectors, see operands.py
    aux: Optional[torch.Tensor] = None       # PRO_DY_*: the layer's output y (same strides as the operand)
    inv_count: float = 0.0                   # PRO_DY_STATS: 1 / (elements per channel in the statistics)

    def __post_init__(self):
        self.mode, self.act = _plain(self.mode), _plain(self.act)

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
        return self.stats if not self.dact else bool(self.pro.mode == PRO_NORM_ACT)

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
