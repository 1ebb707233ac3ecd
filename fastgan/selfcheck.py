"""Before a CUDA run trains on the fused kernels, it checks them on its own GPU and shapes.

A user's first GPU run is the first time fastgan's kernels meet that GPU, driver and Triton build.
So train.py calls `settle` before training whenever the triton backend would run on CUDA. On copies
of the run's models (the run's weights, BatchNorm statistics and random streams stay untouched):

1. parity: one training iteration (D step, then G step: the run's recipe, amp, batch and image size)
   on the triton backend and on the torch backend from the same weights and inputs, and G's eval-mode
   sampling (the sample grids' path). Both are judged against the torch backend in exact fp32
   (TF32 off): the triton backend may miss it by at most `bound(mode, own)`, where `own` is how far
   the torch backend in the run's own precision misses it. Compared: the losses, every gradient
   (max over tensors) and the samples, each as |a - b|_2 / |b|_2; everything must be finite.
   Parity that misses its bound is drawn again from other inputs, and fails only if that draw
   misses too: a LeakyReLU or ReLU input within rounding of 0 takes slope 1 on one side and 0.2
   or 0 on the other, and moves the whole gradient from there back by far more than rounding (6%
   of a tiny test model's G grads on the CPU, for one of 231 weight draws tried). Another draw
   does not land on such a point again; a kernel that is wrong misses on every draw.
2. the step: the step the run will use (fastgan.cuda_graph.build_step's choice: the CUDA graph, and
   torch.compile when configured) runs its warm-up, capture and a replay on copies: no exception,
   finite losses.

backend=auto: a failed parity (or a kernel that raises) trains on the torch backend; a failed step
alone trains on the eager step (no CUDA graph, no compile). Either way the log says why in one line.
backend=triton: a failure raises SelfCheckError, one line for the user, no traceback.
Running out of GPU memory is no verdict on the kernels: torch.OutOfMemoryError goes up as itself,
and train.py says what to try.
Under torchrun every rank checks its own GPU and all ranks take the most cautious outcome.
A kernel that corrupts the CUDA context (an illegal address) cannot be recovered from in-process:
the run then stops with CUDA's error, as it would have in its first iteration.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from fastgan.errors import UserError, first_line

# Bounds on |a - b|_2 / |b|_2 against exact fp32, per precision of the run. Floors:
# - fp32 1e-3: tests/parity.py holds one fused op to 1e-5 of fp64 (max-norm); a whole iteration
#   runs ten layers forward and back, BatchNorm divides by batch standard deviations and a logit sums
#   thousands of terms, so bench/throughput.py holds a whole step to 1e-3 in this same measure.
# - tf32 1e-2: tf32 keeps fp16's 10 mantissa bits; tests/parity.py's fp16 tolerance, which its
#   test_tf32 applies to tf32.
# - bf16 3e-2, fp16 1e-2: tests/parity.py's half-precision tolerances.
# Above the floor: twice the torch backend's own error in the same precision from the same state
# (tests/parity.py's rule for half precision, bench/throughput.py's for a whole step). A whole
# bf16 iteration's gradients are far from fp32 for torch's own autocast too (ReLU / LeakyReLU
# derivatives flip where a pre-activation lies within rounding of 0: 0.24 measured at full size,
# bench/NOTES.md); the bound is capped at 1, the error of an all-zero answer.
FLOORS = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 3e-2, "fp16": 1e-2}
SEEDS = (0x5E1F, 0x5E20)   # the check's own inputs (a second draw after a miss); never the run's generators


class SelfCheckError(UserError, RuntimeError):
    """backend=triton and the check failed: one line for the user."""


def precision(amp: str, device: torch.device) -> str:
    """How the run's GEMMs round: the autocast dtype, else tf32 where cuDNN may use it, else fp32."""
    if amp != "fp32":
        return amp
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def bound(mode: str, own: float) -> float:
    return min(1.0, max(FLOORS[mode], 2 * own))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|a - b|_2 / |b|_2 in float64; inf where `actual` is not finite."""
    a, b = actual.detach().double(), expected.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@dataclass
class Item:
    """One compared quantity: the triton backend's error, the torch backend's own, and the bound."""
    mode: str
    err: float
    own: float

    @property
    def bound(self) -> float:
        return bound(self.mode, self.own)

    @property
    def ok(self) -> bool:
        return self.err <= self.bound


@dataclass
class Report:
    """What check() found. `failed` is None when everything passed, else why (one line) and
    which part failed: "parity" (the fused kernels) or "step" (graph capture / compile)."""
    items: dict
    failed: str | None = None
    why: str | None = None
    step: str = ""
    seconds: float = 0.0
    redrawn: str | None = None     # what the first draw missed by, when a second one passed

    def summary(self) -> str:
        said = ", ".join(f"{k} {v.err:.1e} (bound {v.bound:.1e})" for k, v in self.items.items())
        return said + (f" (on a second draw: the first missed, {self.redrawn})" if self.redrawn else "")


@contextmanager
def exact_fp32():
    """References run without TF32 in cuDNN convolutions and cuBLAS matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _copies(G, D, backend: str):
    Gc, Dc = copy.deepcopy(G), copy.deepcopy(D)
    Gc.backend = Dc.backend = backend
    return Gc, Dc


def _iteration(cfg, G, D, device, backend: str, amp: str, real, z, z_sample, exact: bool = False) -> dict:
    """One eager TrainStep iteration and one eval-mode sampling call on copies of G and D."""
    from fastgan.step import TrainStep
    Gc, Dc = _copies(G, D, backend)
    with exact_fp32() if exact else nullcontext():
        Gc.eval()
        with torch.no_grad():            # as train.py's sample grids: eval mode, no autocast
            sample = Gc(z_sample)
        Gc.train()
        step = TrainStep(dataclasses.replace(cfg, amp=amp, compile=False), Gc, Dc, device)
        losses = step.step(real, z)
    grads = [p.grad for net in (Gc, Dc) for p in net.parameters()]
    if any(g is None for g in grads):
        raise RuntimeError("a parameter got no gradient")
    return {"losses": losses, "grads": grads, "sample": sample}


def _compare(out: dict, ref: dict, own: dict | None, mode: str, sample_mode: str) -> dict:
    def worst(key, a):
        if key == "grads":
            return max(rel_err(x, y) for x, y in zip(a[key], ref[key]))
        return rel_err(a[key], ref[key])
    return {key: Item(sample_mode if key == "sample" else mode, worst(key, out),
                      worst(key, own) if own is not None else 0.0)
            for key in ("losses", "grads", "sample")}


def _inputs(cfg, G, device, seed: int = SEEDS[0]):
    """A real batch, z as TrainStep.noise shapes it, and the sample grid's z: from the check's own seed."""
    gen = torch.Generator(device).manual_seed(seed)
    res, n = cfg.model.resolution, cfg.batch_size
    from fastgan.step import num_noise
    real = torch.rand(n, cfg.model.channels, res, res, device=device, generator=gen) * 2 - 1
    z = torch.randn(num_noise(cfg.recipe), n, G.noise_size, device=device, generator=gen)
    z_sample = torch.randn(cfg.num_samples, G.noise_size, device=device, generator=gen)
    return real, z, z_sample


def parity(cfg, G, D, device, seed: int = SEEDS[0]) -> dict:
    """The triton backend's iteration and sampling against exact fp32, with torch's own error."""
    real, z, z_sample = _inputs(cfg, G, device, seed)
    mode, sample_mode = precision(cfg.amp, device), precision("fp32", device)
    ref = _iteration(cfg, G, D, device, "torch", "fp32", real, z, z_sample, exact=True)
    # torch in the run's own precision; in exact fp32 it is the reference itself
    own = None if mode == sample_mode == "fp32" else _iteration(cfg, G, D, device, "torch", cfg.amp, real, z, z_sample)
    fused = _iteration(cfg, G, D, device, "triton", cfg.amp, real, z, z_sample)
    return _compare(fused, ref, own, mode, sample_mode)


def run_step(cfg, G, D, device, graph: bool | None = None) -> str:
    """The step the run will use, on copies: warm-up, capture and a replay (CUDA graph), or one
    compiled iteration; raises on any failure. Returns what ran, for the log."""
    from fastgan.cuda_graph import GraphedStep, why_not
    from fastgan.step import TrainStep
    graph = why_not(cfg, device) is None if graph is None else graph
    if not graph and not cfg.compile:
        return "eager step"              # exactly what parity() ran
    Gc, Dc = _copies(G, D, G.backend)
    step = GraphedStep(cfg, Gc, Dc, device) if graph else TrainStep(cfg, Gc, Dc, device)
    real, z, _ = _inputs(cfg, G, device)
    iters = step.warmup + 2 if graph and step.capture else 1
    losses = [step.step(real, z) for _ in range(iters)]
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError(f"non-finite losses from the {'graphed' if graph else 'compiled'} step")
    what = ("CUDA graph captured" if graph and step.capture else "graph step ran uncaptured" if graph
            else "compiled step")
    return what + (" (compiled)" if cfg.compile else "")


def check(cfg, G, D, device, graph: bool | None = None) -> Report:
    """parity(), then run_step() with the triton backend; the run's models and RNG untouched."""
    t0 = time.perf_counter()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        report = Report({})
        try:
            for seed in SEEDS:           # a miss is drawn again (module docstring); both must miss
                report.items = parity(cfg, G, D, device, seed)
                bad = [k for k, v in report.items.items() if not v.ok]
                if not bad:
                    break
                missed = ", ".join(f"{k} {report.items[k].err:.2e} > {report.items[k].bound:.1e}" for k in bad)
                report.why = f"{report.why} and {missed}" if report.why else missed
        except torch.OutOfMemoryError:   # the batch does not fit: train.py says so, with what to try
            raise
        except Exception as e:   # a kernel that fails to build or launch: reported, not raised
            report.failed, report.why = "parity", f"the fused kernels raised {first_line(e, name=True)}"
        else:
            if bad:
                report.failed = "parity"
                report.why = f"the fused kernels differ from torch on {len(SEEDS)} draws: {report.why}"
            elif report.why:
                report.redrawn = report.why
                report.why = None
        if report.failed is None:
            try:
                report.step = run_step(cfg, G, D, device, graph)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                report.failed, report.why = "step", f"the training step failed ({first_line(e, name=True)})"
        release(device)
    report.seconds = time.perf_counter() - t0
    return report


def release(device) -> None:
    """Memory the check's copies held goes back (the GPU's cache too)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def settle(cfg, d, G, D, log=print, graph: bool | None = None):
    """Run check() (every rank) and return (cfg, backend) for the run: unchanged when it passed;
    with backend=auto the torch backend after a parity failure, or cuda_graph and compile off
    after a step failure; backend=triton raises SelfCheckError instead."""
    from fastgan import distrib
    report = check(cfg, G, D, d.device, graph)
    seen = distrib.gather_objects(d, (report.failed, report.why))
    failed = [(r, f, w) for r, (f, w) in enumerate(seen) if f]
    if not failed:
        log(f"self-check passed in {report.seconds:.1f} s: {report.summary()}; {report.step}")
        return cfg, "triton"
    rank, part, why = next((x for x in failed if x[1] == "parity"), failed[0])
    where = f" on rank {rank}" if d.enabled else ""
    if cfg.backend == "triton":
        hint = "--backend=torch" if part == "parity" else "--cuda_graph=false --compile=false"
        raise SelfCheckError(f"self-check of the triton backend failed{where}: {why}. "
                             f"Run with {hint}, or --backend=auto to fall back by itself")
    if part == "parity":
        G.backend = D.backend = "torch"
        log(f"self-check{where}: {why}; training on the torch backend")
        return dataclasses.replace(cfg, backend="torch"), "torch"
    log(f"self-check{where}: {why}; training on the eager step (no CUDA graph, no compile)")
    return dataclasses.replace(cfg, cuda_graph=False, compile=False), "triton"
