"""Training and sampling throughput, fastgan against the plain PyTorch model, in one table.

Variants (per preset, batch and mode):
  eager_fp32               reference model, eager, fp32 (the speedup baseline)
  eager_bf16               reference model, eager, bf16 autocast
  compile_max_autotune     reference, bf16, torch.compile(mode="max-autotune-no-cudagraphs")
  compile_reduce_overhead  reference, bf16, torch.compile(mode="reduce-overhead") (CUDA graphs)
  fastgan                  fused Triton kernels, bf16; train: fastgan.cuda_graph.GraphedStep (the whole
                           iteration compiled and captured in one CUDA graph), sample: G captured
Modes: `train`, the full iteration of the preset's recipe (fastgan/step.py: D step and G step;
preset mmgen with recipe mmgen, pytorch_examples with its own), and `sample`, G alone (eval, no grad).

Per row: img/s median, min and max over --repeats blocks of iterations after warm-up (CUDA events
around each block; perf_counter on a CPU), ms/iter, MFU against a bf16 matmul peak measured in this
run, FLOPs counted with torch.utils.flop_counter on the reference model, speedup over eager_fp32, and
the parity error of one step: from the variant's state after warm-up, one step of the variant and one
of an fp32 reference (TF32 off) on the same inputs; the max over the losses and every gradient (train)
or the images (sample) of |a - b|_2 / |b|_2. Compile and capture time are excluded from the timing
and reported. A variant that fails (e.g. out of memory at batch 1024) becomes a row with "error".

Without CUDA the same code runs at toy sizes (32x32, base width 8, batch 4), the triton backend
through Triton's interpreter (correctness, not speed), torch.compile with backend aot_eager
(inductor's C++ codegen takes ~100 s per variant on 2 cores: --compile-backend inductor to use it)
and no CUDA graphs; each row says so in "note".

    python bench/throughput.py                                   # everything, JSON to bench/results/
    python bench/throughput.py --presets mmgen --batches 128 --variants eager_fp32 fastgan
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:   # must precede the first @triton.jit definition (fastgan.kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fastgan import errors  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.cuda_graph import GraphedStep  # noqa: E402
from fastgan.models import PRESETS, RESOLUTIONS, build  # noqa: E402
from fastgan import selfcheck  # noqa: E402
from fastgan.selfcheck import exact_fp32, rel_err  # noqa: E402
from fastgan.step import TrainStep  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/report.py, also when imported by path
from report import failed_row, key, slug, table, targets, write_json  # noqa: E402
from timing import GraphedSample, count_kernels, device_name, peak_tflops, sync, time_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET_NAMES = tuple(PRESETS)      # each preset runs its own recipe (Config.recipe = preset)
# The measured settings a table's rows must share (--append refuses a file made with others).
SAME_SETTINGS = ("resolution", "base_channels", "repeats", "warmup", "block_s", "peak_size", "compile_backend",
                 "no_cudnn_benchmark", "threads", "seed")
MODES = ("train", "sample")


@dataclass(frozen=True)
class Variant:
    amp: str
    compile_mode: str | None = None   # torch.compile mode; None: eager
    fused: bool = False               # fastgan: triton backend and CUDA graph


VARIANTS = {
    "eager_fp32": Variant("fp32"),
    "eager_bf16": Variant("bf16"),
    "compile_max_autotune": Variant("bf16", "max-autotune-no-cudagraphs"),
    "compile_reduce_overhead": Variant("bf16", "reduce-overhead"),
    "fastgan": Variant("bf16", fused=True),
}
BASELINE = "eager_fp32"
# Bounds on parity_max_rel_err (see parity()). fp32: the same math in another order (on a GPU,
# TF32 convolutions; the reference runs without), amplified by BN. bf16: at least 3e-2, the
# number tests/parity.py allows bf16 (there on max|a-b| / max|b|; here |a-b|_2 / |b|_2).
PARITY_FP32, PARITY_BF16_FLOOR = 1e-3, 3e-2


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESET_NAMES), choices=PRESET_NAMES)
    p.add_argument("--batches", nargs="+", type=int, default=[128, 1024] if CUDA else [4])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--resolution", type=int, default=64 if CUDA else 32, choices=RESOLUTIONS)
    p.add_argument("--base-channels", type=int, default=None if CUDA else 8,
                   help="width override (default: the preset's on CUDA, 8 on a CPU)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed blocks per row: img/s is their median, with min and max (default 5)")
    p.add_argument("--warmup", type=int, default=10 if CUDA else 0,
                   help="untimed iterations after the first call (GraphedStep captures after 3); then the "
                        "untimed parity step (a compiled step recompiles once Adam's state exists)")
    p.add_argument("--block-s", type=float, default=0.25 if CUDA else 0.0,
                   help="each timed block runs enough iterations to last about this long (at least 1)")
    p.add_argument("--peak-size", type=int, default=8192 if CUDA else 512, help="side of the bf16 peak matmul")
    p.add_argument("--compile-backend", default="inductor" if CUDA else "aot_eager")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off for the reference (default: on)")
    p.add_argument("--no-profile", action="store_true", help="skip counting GPU kernels per iteration")
    p.add_argument("--threads", type=int, default=None if CUDA else 1,
                   help="torch CPU threads (CPU default 1: at toy sizes a busy 2-core machine spent 32 ms "
                        "per conv in OpenMP barriers with 2 threads, 0.19 ms with 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default bench/results/<device>-<YYYY-MM-DD>.json)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out and run only the missing or failed ones: one table "
                        "from several calls under a time limit (rows are saved as each finishes)")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.batches) < 2:
        p.error("--repeats must be >= 1 and every batch >= 2 (BatchNorm needs 2 values per channel)")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# models, steps, FLOPs

def make_cfg(args, preset: str, amp: str = "fp32", backend: str = "torch") -> Config:
    cfg = Config(recipe=preset, amp=amp, backend=backend, seed=args.seed)
    cfg.model.preset, cfg.model.resolution, cfg.model.base_channels = preset, args.resolution, args.base_channels
    return cfg


def sample_fn(G, amp: str, device: torch.device):
    """z -> images, G in eval mode, no grad, under the variant's autocast."""
    G.eval()
    dtype = torch.bfloat16 if amp == "bf16" else None

    def sample(z):
        # no autocast weight cache: it would outlive a CUDA graph capture (torch.cuda.graphs docs)
        amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)
        with torch.no_grad(), amp:
            return G(z)
    return sample


def count_flops(cfg: Config, batch: int, mode: str) -> int:
    """FLOPs of one train iteration / one sampling call of the reference model (fp32, eager),
    counted on the meta device: exact for any batch, no memory, no time."""
    with torch.device("meta"):
        G, D = build(cfg.model, "torch")
    # TrainStep's device only picks autocast (off: fp32) and Adam's implementation.
    step = TrainStep(cfg, G, D, torch.device("cpu"))
    z = torch.empty(step.num_noise, batch, G.noise_size, device="meta")
    res = cfg.model.resolution
    real = torch.empty(batch, cfg.model.channels, res, res, device="meta")
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            step.step(real, z)
        else:
            sample_fn(G, "fp32", torch.device("cpu"))(z[0])
    return counter.get_total_flops()


def build_variant(args, name: str, preset: str, mode: str, device: torch.device):
    """(fn(real, z), step or None, G, D, notes) with weights drawn from args.seed."""
    v = VARIANTS[name]
    cfg = make_cfg(args, preset, v.amp, "triton" if v.fused else "torch")
    torch.manual_seed(args.seed)
    G, D = build(cfg.model, cfg.backend)
    G, D = G.to(device), D.to(device)
    notes, cuda = [], device.type == "cuda"
    compile_kw = dict(backend=args.compile_backend)
    if args.compile_backend == "inductor" and v.compile_mode:
        compile_kw["mode"] = v.compile_mode
    elif v.compile_mode:
        notes.append(f"compiled with backend {args.compile_backend}; mode {v.compile_mode} not applied")
    if v.compile_mode == "reduce-overhead" and not cuda:
        notes.append("no CUDA graphs without CUDA")
    if v.fused and not cuda:
        notes.append("triton kernels in the interpreter: not speed; no CUDA graph")
    if mode == "sample":
        fn = sample_fn(G, v.amp, device)
        if v.compile_mode:
            fn = torch.compile(fn, **compile_kw)
        return (lambda real, z: fn(z[0])), None, G, D, notes, fn
    if v.fused:
        cfg.compile = True
        step = GraphedStep(cfg, G, D, device, compile_backend=args.compile_backend)
        notes.append(f"GraphedStep ({'captured' if step.capture else 'uncaptured'}, compiled)")
    else:
        step = TrainStep(cfg, G, D, device)
    fn = torch.compile(step.step, **compile_kw) if v.compile_mode else step.step
    return fn, step, G, D, notes, None


# ---------------------------------------------------------------------------------------------
# parity

def max_rel_err(actual: list, expected: list) -> float:
    return max(rel_err(a, b) for a, b in zip(actual, expected, strict=True))


def reference_outputs(args, preset, snapshot, amp, mode, real, z, device) -> list:
    """One eager step (train: losses, then every gradient of G and D) or one sampling call of the
    reference model from a snapshot of a variant's state."""
    g_state, d_state, opt_state = snapshot
    G, D = build(make_cfg(args, preset).model, "torch")
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
    G, D = G.to(device), D.to(device)
    with exact_fp32():
        if mode == "sample":
            return [sample_fn(G, amp, device)(z[0])]
        ref = TrainStep(make_cfg(args, preset, amp), G, D, device)
        ref.load_state_dict(copy.deepcopy(opt_state))
        return [ref.step(real, z)] + [p.grad for net in (G, D) for p in net.parameters()]


def parity(args, preset, mode, amp, fn, step, G, D, real, z, device) -> dict:
    """The variant's error against the fp32 reference from the same state and inputs: the max
    over the losses and every gradient (train) or over the images (sample); for train also the
    losses' error alone, the sharper check of the forward pass.

    Bounds: fp32 PARITY_FP32. bf16: twice torch's own bf16 autocast error from the same state,
    at least PARITY_BF16_FLOOR and at most 1 (an all-zero gradient): a bf16 step is no closer to
    fp32 than rounding lets it be; through a whole step ReLU / LeakyReLU derivatives flip wherever
    a pre-activation lies within rounding of 0 (tests/parity.py), which moved torch's own bf16
    gradients by 0.2-0.7 at the toy CPU sizes and by 0.24 at full size (batch 8; bench/NOTES.md).
    """
    snapshot = copy.deepcopy((G.state_dict(), D.state_dict(), step.state_dict() if step else None))
    ref = reference_outputs(args, preset, snapshot, "fp32", mode, real, z, device)
    torch_bf16 = (max_rel_err(reference_outputs(args, preset, snapshot, "bf16", mode, real, z, device), ref)
                  if amp == "bf16" else None)
    out = [fn(real, z).clone()]
    if mode == "train":
        for name, p in [*G.named_parameters(), *D.named_parameters()]:
            if p.grad is None:
                raise RuntimeError(f"no gradient for {name} after the variant's step")
            out.append(p.grad)
    err = max_rel_err(out, ref)
    bound = PARITY_FP32 if amp == "fp32" else min(1.0, max(PARITY_BF16_FLOOR, 2 * torch_bf16))
    return {"parity_max_rel_err": err, "parity_loss_rel_err": rel_err(out[0], ref[0]) if mode == "train" else None,
            "parity_torch_bf16_rel_err": torch_bf16, "parity_bound": bound, "parity_ok": err <= bound}


# ---------------------------------------------------------------------------------------------
# one row

def run_row(args, name, preset, batch, mode, device, flops, peak) -> dict:
    v = VARIANTS[name]
    row = {"variant": name, "preset": preset, "batch": batch, "mode": mode, "amp": v.amp,
           "backend": "triton" if v.fused else "torch", "compile_mode": v.compile_mode,
           "flops_per_iter": flops, "gflop_per_img": flops / batch / 1e9}
    tag = f"{name} {preset} b{batch} {mode}"
    fn, step, G, D, notes, sampler = build_variant(args, name, preset, mode, device)
    cfg = make_cfg(args, preset)
    gen = torch.Generator(device).manual_seed(args.seed + 1)
    res, sets = cfg.model.resolution, 4   # input sets rotated so no block re-reads one buffer
    reals = [torch.rand(batch, cfg.model.channels, res, res, device=device, generator=gen) * 2 - 1 for _ in range(sets)]
    zs = [torch.randn(step.num_noise if step else 1, batch, G.noise_size, device=device, generator=gen)
          for _ in range(sets)]
    if mode == "sample" and v.fused and device.type == "cuda":
        graphed = []   # captured by the first call, so capture time shows in first_call_s

        def fn(real, z):
            if not graphed:
                graphed.append(GraphedSample(sampler, z[0]))
            return graphed[0](z[0])
        notes.append("G captured in a CUDA graph")
    mark = v.compile_mode == "reduce-overhead" and device.type == "cuda"

    def call(i):
        if mark:   # a new iteration for cudagraph trees: outputs of the last one are not kept
            torch.compiler.cudagraph_mark_step_begin()
        return fn(reals[i % sets], zs[i % sets])

    log(f"  {tag}: first call{' (compiles)' if v.compile_mode or v.fused else ''}...")
    t = time.perf_counter()
    call(0)
    sync(device)
    row["first_call_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for i in range(args.warmup):
        call(i + 1)
    sync(device)
    warm_s = time.perf_counter() - t
    log(f"  {tag}: first call {row['first_call_s']:.1f} s, {args.warmup} warm-up iterations {warm_s:.1f} s")

    try:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        row.update(parity(args, preset, mode, v.amp, fn, step, G, D, reals[0], zs[0], device))
    except Exception as e:   # timing still tells something; the row says why parity is missing
        row.update(parity_max_rel_err=None, parity_ok=False, parity_error=f"{type(e).__name__}: {e}")

    iters = 1
    if args.block_s > 0:
        iters = max(1, min(1000, math.ceil(args.block_s / max(time_block(call, 1, device), 1e-6))))
    rates = []
    for r in range(args.repeats):
        secs = time_block(call, iters, device)
        rates.append(batch * iters / secs)
    med = statistics.median(rates)
    row.update(img_per_s=med, img_per_s_min=min(rates), img_per_s_max=max(rates), ms_per_iter=1e3 * batch / med,
               mfu=flops * med / batch / (peak * 1e12), iters_per_repeat=iters, repeats=args.repeats)
    if device.type == "cuda" and not args.no_profile:
        try:
            row.update(count_kernels(call, device))
        except Exception as e:
            notes.append(f"kernel count failed: {type(e).__name__}: {e}")
    row["note"] = "; ".join(notes)
    log(f"  {tag}: {med:,.1f} img/s ({min(rates):,.1f}-{max(rates):,.1f}), {row['ms_per_iter']:.3f} ms/iter, "
        f"parity {row['parity_max_rel_err']}")
    return row


def release(device: torch.device) -> None:
    """Between variants: compiled code, CUDA graphs and their memory pools go."""
    torch._dynamo.reset()
    selfcheck.release(device)


# ---------------------------------------------------------------------------------------------
# table, targets, main

def merge(previous: list, rows: list) -> list:
    """Rows of an earlier run (--append) that this run did not redo, and this run's, in table order;
    speedups over eager_fp32 of the same preset, batch and mode, whichever run measured it."""
    new = {key(r) for r in rows}
    order = lambda r: (PRESET_NAMES.index(r["preset"]), r["batch"], MODES.index(r["mode"]),  # noqa: E731
                       list(VARIANTS).index(r["variant"]))
    merged = sorted([r for r in previous if key(r) not in new] + rows, key=order)
    base = {key(r)[1:]: r["img_per_s"] for r in merged if r["variant"] == BASELINE and r.get("img_per_s")}
    for r in merged:
        b = base.get(key(r)[1:])
        r["speedup_vs_eager"] = r["img_per_s"] / b if b and r.get("img_per_s") else None
    return merged


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if CUDA else "cpu")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    name, date = device_name(device), time.strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else ROOT / "bench/results" / f"{slug(name)}-{date}.json"
    previous = []
    if args.append and out.exists():
        old = json.loads(out.read_text())
        if old["device"] != name:
            sys.exit(f"--append: {out} holds rows from {old['device']}, not {name}")
        differ = {k: (old["settings"].get(k), getattr(args, k)) for k in SAME_SETTINGS
                  if old["settings"].get(k) != getattr(args, k)}
        if differ:
            sys.exit(f"--append: {out} was measured with other settings (file, now): {differ}")
        previous = old["rows"]
    log(f"fastgan throughput on {name}: torch {torch.__version__}, triton {triton.__version__}, "
        f"{args.resolution}px, batches {args.batches}, {args.repeats} repeats"
        + ("" if CUDA else " (no CUDA: toy sizes, Triton interpreter)"))
    peak = peak_tflops(device, args.peak_size)
    log(f"bf16 matmul peak, {args.peak_size}^3: {peak:.3f} TFLOP/s")
    head = {"device": name, "date": date, "torch": torch.__version__, "triton": triton.__version__,
            "peak_tflops": peak, "cuda": CUDA, "settings": vars(args)}
    done = {key(r) for r in previous if not r.get("error")}
    jobs = [(p, b, m, v) for p in args.presets for b in args.batches for m in args.modes
            for v in sorted(args.variants, key=lambda v: v != BASELINE) if (v, p, b, m) not in done]
    if done:
        log(f"--append: {len(done)} rows already in {out}; {len(jobs)} to run")
    rows, merged, t0 = [], merge(previous, []), time.perf_counter()
    flops_of = {}      # the variants of one (preset, batch, mode) share its count
    for k, (preset, batch, mode, variant) in enumerate(jobs, 1):
        if (preset, batch, mode) not in flops_of:
            flops_of[preset, batch, mode] = count_flops(make_cfg(args, preset), batch, mode)
        flops = flops_of[preset, batch, mode]
        log(f"[{k}/{len(jobs)}] {variant} {preset} batch {batch} {mode}: {flops / batch / 1e9:.3f} GFLOP/img "
            f"({time.perf_counter() - t0:.0f} s so far)")
        try:
            row = run_row(args, variant, preset, batch, mode, device, flops, peak)
        except Exception as e:   # e.g. out of memory at batch 1024: the run goes on
            log(f"  failed: {type(e).__name__}: {e}")
            row = failed_row(variant, preset, batch, mode, flops, e)
        release(device)
        rows.append(row | {"peak_tflops": peak})
        merged = merge(previous, rows)
        write_json(out, head | {"targets": targets(merged), "rows": merged})   # a killed run keeps its rows

    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}, bf16 peak {peak:.1f} TFLOP/s\n")
    print(table(merged))
    for g in targets(merged):
        print(f"{'met   ' if g['met'] else 'MISSED'} {g['target']}: {g['value']} (goal >= {g['goal']})")
    fast = next((r for r in merged if key(r) == ("fastgan", "mmgen", 128, "train") and r.get("ms_per_iter")), None)
    if fast:
        print(f"MMGen recipe, 300k iterations at {fast['ms_per_iter']:.3f} ms/iter: "
              f"{300_000 * fast['ms_per_iter'] / 60e3:.1f} min")
    log(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    errors.main(main)       # a user's mistake: one line, no traceback
