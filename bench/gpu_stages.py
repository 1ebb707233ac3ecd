"""The stages of bench/gpu_check.py that no other script runs; each writes its JSON as results come.

    python bench/gpu_stages.py env --out env.json            # a: GPU, versions, bf16 matmul peak, copy GB/s
    python bench/gpu_stages.py correct --out correct.json    # b: fastgan.selfcheck on the real shapes (both
                                                             #    presets; bf16, tf32, IEEE fp32) and the
                                                             #    CUDA-graph step against the eager step
    python bench/gpu_stages.py profile --out profile.json    # e: top kernels of one graph replay

Without CUDA each runs at toy size on the CPU (the triton backend through the interpreter):
bench/gpu_check.py's dry run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:   # before fastgan.kernels loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from fastgan import selfcheck  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.cuda_graph import GraphedStep  # noqa: E402
from fastgan.models import PRESETS, build  # noqa: E402
from fastgan.step import TrainStep  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402
from timing import device_name, peak_tflops, sync  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
# The real shapes on a GPU (MMGen's 64x64 at batch 128, the presets' widths). On a CPU toy ones, fp32
# (bf16 in the interpreter is slow) and one case each: every fused iteration there takes seconds.
SHAPE = dict(resolution=64, base_channels=None, batch=128) if CUDA else dict(resolution=32, base_channels=4, batch=2)
AMP = "bf16" if CUDA else "fp32"
CASES = ([(p, m) for p in PRESETS for m in ("bf16", "tf32", "ieee")] if CUDA
         else [("mmgen", "ieee")])


def log(msg: str) -> None:
    print(msg, flush=True)


def config(preset: str, amp: str) -> Config:
    cfg = Config(recipe=preset, amp=amp, batch_size=SHAPE["batch"], num_samples=16)
    cfg.model.preset = preset
    cfg.model.resolution, cfg.model.base_channels = SHAPE["resolution"], SHAPE["base_channels"]
    return cfg


# ---------------------------------------------------------------------------------------------
# a: environment

def env(out: Path) -> None:
    info = {"device": device_name(DEVICE), "cuda": CUDA, "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "cpus": os.cpu_count()}
    if CUDA:
        p = torch.cuda.get_device_properties(DEVICE)
        info.update(sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    write_json(out, info)
    info["peak_bf16_tflops"] = round(peak_tflops(DEVICE, 8192 if CUDA else 256), 3)
    write_json(out, info)
    info["copy_gb_s"] = round(_copy_gb_s(2**30 if CUDA else 2**24), 1)
    write_json(out, info)
    log(json.dumps(info))


def _driver() -> str:
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"


def _copy_gb_s(nbytes: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes), median of 5 blocks."""
    from timing import time_block
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = sorted(time_block(lambda i: dst.copy_(src), 10, DEVICE) / 10 for _ in range(5))[2]
    return 2 * nbytes / secs / 1e9


# ---------------------------------------------------------------------------------------------
# b: correctness at the real shapes

def correct(out: Path) -> None:
    """fastgan.selfcheck.check per preset and precision, then the graph against the eager step."""
    result = {"shape": SHAPE, "device": device_name(DEVICE), "cases": [], "graph_vs_eager": None}
    saved = torch.backends.cudnn.allow_tf32
    for preset, mode in CASES:
        torch.backends.cudnn.allow_tf32 = mode != "ieee"      # bf16 runs with torch's default
        cfg = config(preset, "bf16" if mode == "bf16" else "fp32")
        torch.manual_seed(len(result["cases"]))
        G, D = (net.to(DEVICE) for net in build(cfg.model, "triton"))
        rep = selfcheck.check(cfg, G, D, DEVICE)
        case = {"preset": preset, "mode": mode, "ok": rep.failed is None, "failed": rep.failed, "why": rep.why,
                "redrawn": rep.redrawn, "step": rep.step, "seconds": round(rep.seconds, 2),
                **{k: {"err": v.err, "own": v.own, "bound": v.bound} for k, v in rep.items.items()}}
        result["cases"].append(case)
        write_json(out, result)
        log(f"{preset} {mode}: {'ok' if case['ok'] else 'FAILED: ' + str(rep.why)} "
            f"({rep.summary()}; {rep.step}; {rep.seconds:.1f} s)")
    torch.backends.cudnn.allow_tf32 = saved
    result["graph_vs_eager"] = graph_vs_eager()
    write_json(out, result)
    log(f"graph vs eager: {result['graph_vs_eager']}")


def graph_vs_eager(iters: int = 6 if CUDA else 1) -> dict:
    """MMGen, bf16 (CPU: fp32), deterministic kernels: TrainStep and GraphedStep (3 warm-up iterations, capture,
    replays) from one state over the same inputs. The same launches run captured or not, so the losses
    agree to tests/test_cuda_graph.py's bf16 slack of 1e-3 (Adam moves a weight ~2e-4 per step)."""
    cfg = config("mmgen", AMP)
    torch.manual_seed(7)
    G, D = (net.to(DEVICE) for net in build(cfg.model, "triton"))
    G.deterministic = D.deterministic = True
    eager, graphed = TrainStep(cfg, copy.deepcopy(G), copy.deepcopy(D), DEVICE), GraphedStep(cfg, G, D, DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(8)
    worst, t0 = 0.0, time.perf_counter()
    for _ in range(iters):
        real = torch.rand(cfg.batch_size, 3, cfg.model.resolution, cfg.model.resolution, device=DEVICE,
                          generator=gen) * 2 - 1
        z = eager.noise(cfg.batch_size, gen)
        a, b = eager.step(real, z), graphed.step(real, z)
        worst = max(worst, (a - b).abs().max().item())
    captured = getattr(graphed, "_graph", None) is not None
    return {"iterations": iters, "captured": captured, "max_loss_diff": worst, "bound": 1e-3,
            "ok": worst <= 1e-3 and (captured or not CUDA), "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# e: profile of one graph replay

def profile(out: Path, top: int = 25) -> None:
    """GraphedStep (MMGen, bf16, no torch.compile: train.py's step) at batch 128: CUDA time per kernel
    over one replay, largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cfg = config("mmgen", AMP)
    torch.manual_seed(9)
    G, D = (net.to(DEVICE) for net in build(cfg.model, "triton"))
    step = GraphedStep(cfg, G, D, DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(10)
    real = torch.rand(cfg.batch_size, 3, cfg.model.resolution, cfg.model.resolution, device=DEVICE, generator=gen)
    z = step.noise(cfg.batch_size, gen)
    for _ in range(step.warmup + 3 if step.capture else 0):     # warm-up, capture, replays
        step.step(real * 2 - 1, z)
    sync(DEVICE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch_profile(activities=activities) as prof:
        step.step(real * 2 - 1, z)
        sync(DEVICE)
    from torch.autograd import DeviceType
    events = prof.key_averages()
    # On CUDA the kernels themselves (the launching host calls carry the same time again); on a CPU the ops.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA] if CUDA else list(events)

    def us(e):
        return e.self_device_time_total if CUDA else e.self_cpu_time_total
    rows = sorted(kernels, key=us, reverse=True)[:top]
    table = events.table(sort_by="self_device_time_total" if CUDA else "self_cpu_time_total", row_limit=top)
    write_json(out, {"device": device_name(DEVICE), "captured": step.capture, "total_us": sum(us(e) for e in kernels),
               "launches": sum(e.count for e in kernels) if CUDA else None,
               "kernels": [{"name": e.key[:120], "calls": e.count, "us": us(e)} for e in rows], "table": table})
    log(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("env", "correct", "profile"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not CUDA:
        torch.set_num_threads(1)        # toy sizes on a busy 2-core machine: see bench/throughput.py
    {"env": env, "correct": correct, "profile": profile}[args.stage](args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
