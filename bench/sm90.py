"""Static Hopper build report: every Triton kernel a fastgan iteration launches, built for sm_90.

No GPU needed. The iteration runs on CPU tensors with the kernel launches recorded instead of
executed (with the GPU code paths and block sizes, not the interpreter's); each distinct
specialisation is then compiled by Triton for an H100 (GPUTarget cuda 90) down to a cubin with
the ptxas that ships in Triton's wheel, and read back with its cuobjdump:

  smem    shared memory per program; must fit Hopper's 227 KiB opt-in limit
  regs    registers per thread;  stack: local-memory frame bytes (255 regs + stack = spills)
  occ     programs resident per SM (registers, shared memory), and waves = programs / (132 * occ)
  mma     tensor-core instructions in the SASS: HGMMA (Hopper wgmma) or HMMA (the Ampere path)

    python bench/sm90.py                                   # mmgen, bf16, train b128 + sample b1024
    python bench/sm90.py --presets mmgen pytorch_examples --batches 128 1024 --amps bf16 fp32
    python bench/sm90.py --compile aot_eager                # the launches as torch.compile traces them

Exit status 1 if a kernel fails to build or exceeds the shared-memory limit (a launch on the GPU
would fail with "out of resources"). Exit status 2 if this triton wheel has no ptxas/cuobjdump to build with.
This is the build this machine's triton makes; the device image's may allocate differently, so
the GPU run (bench/gpu_check.sh) has the last word.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)       # the GPU code paths; before fastgan.kernels loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastgan import errors, files  # noqa: E402
from fastgan.config import Config  # noqa: E402
from fastgan.kernels.fusion import PRO_ACT, PRO_DY_STATS, PRO_DY_TANH, PRO_NONE, PRO_NORM_ACT  # noqa: E402
from fastgan.models import PRESETS, build  # noqa: E402
from fastgan.step import TrainStep  # noqa: E402

H100_SMS = 132
SMEM_LIMIT = 232448            # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KiB)
SMEM_PER_SM = 233472           # 228 KiB per SM, 1 KiB of it reserved per resident block
REGS_PER_SM = 65536
SHORT = {"_conv_kernel": "conv", "_conv_transpose_kernel": "convT", "_wgrad_kernel": "wgrad",
         "_channel_sum_kernel": "chansum", "_bn_stats_kernel": "bn_stats", "_bn_grad_kernel": "bn_grad"}
PRO_NAMES = {k.value: name for k, name in [(PRO_NONE, "-"), (PRO_ACT, "act"), (PRO_NORM_ACT, "bn+act"),
                                           (PRO_DY_TANH, "dtanh"), (PRO_DY_STATS, "dBN")]}


def h100_target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    fn: object
    kwargs: dict               # every argument by name
    grid: tuple
    where: str                 # scenario


@dataclass
class Built:
    kernel: str
    role: str                  # prologue / epilogue summary
    blocks: str
    warps: int
    stages: int
    programs: int
    smem: int = 0
    regs: int = 0
    stack: int = 0
    hgmma: int = 0
    hmma: int = 0
    occupancy: int = 0
    waves: float = 0.0
    seconds: float = 0.0
    error: str = ""
    where: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.smem <= SMEM_LIMIT


# ---------------------------------------------------------------------------------------------
# recording

@contextlib.contextmanager
def recording(where: str, out: list):
    """Kernel launches append a Launch to `out` instead of running."""
    real_run = triton_jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)      # eager calls pass args by position
        out.append(Launch(self, named, tuple(grid) if isinstance(grid, (tuple, list)) else (grid,), where))
    triton_jit.JITFunction.run = record
    try:
        yield
    finally:
        triton_jit.JITFunction.run = real_run


class _TargetDriver:
    """Stands in for Triton's CUDA driver where there is none: what torch.compile asks of it
    (the target, to build TTIR and see which tensors a kernel writes) is the H100's."""

    def get_current_target(self):
        return h100_target()


@contextlib.contextmanager
def h100():
    """Kernels launched on CPU tensors choose as on an H100: Triton's driver reports its target,
    and wgrad splits its rows for 132 SMs (on a CPU device it would not split them at all)."""
    from fastgan.kernels import wgrad
    config = triton.runtime.driver
    previous = config._active            # None until first asked for; reset_active() would ask
    programs = wgrad._target_programs
    config.set_active(_TargetDriver())
    wgrad._target_programs = lambda device: 2 * H100_SMS
    try:
        yield
    finally:
        config._active = previous
        wgrad._target_programs = programs


def scenario(preset: str, batch: int, amp: str, mode: str, resolution: int, compile_backend: str = "",
             deterministic: bool = False, base_channels: int | None = None, tf32: bool = True,
             recipe: str | None = None) -> list:
    """The launches of one training iteration (recipe of the preset unless given), one sampling
    call (G in eval mode, no grad, under bf16 autocast when amp is bf16) or one training-mode G
    forward without grad (mode "forward").

    tf32: whether cuDNN may use TF32 on the GPU (torch's default; fastgan/fused.py then passes it
    to every GEMM kernel, bf16 ones included); on CPU tensors the kernels are told IEEE, so the
    recorded launches are set to what the GPU would pass.
    compile_backend="aot_eager": through torch.compile as on a GPU (the ops are triton_ops, the
    kernels wrap_triton calls that dynamo and AOT autograd trace), short of inductor's codegen."""
    cfg = Config(recipe=recipe or preset, amp=amp, backend="triton", compile=bool(compile_backend))
    cfg.model.preset, cfg.model.resolution, cfg.model.base_channels = preset, resolution, base_channels
    G, D = build(cfg.model, "triton")
    G.deterministic = D.deterministic = deterministic
    launches: list = []
    where = (f"{preset} {mode} b{batch} {amp}" + ("" if tf32 or amp != "fp32" else " ieee")
             + (f" w{base_channels}" if base_channels else "") + (f" {resolution}px" if resolution != 64 else "")
             + (" deterministic" if deterministic else ""))
    step = TrainStep(cfg, G, D, torch.device("cpu"), compile_backend=compile_backend or "inductor")

    def sample(z):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            return G(z)
    if compile_backend:
        torch._dynamo.reset()
        sample = torch.compile(sample, backend=compile_backend)
    z = torch.randn(step.num_noise, batch, G.noise_size)
    with recording(where, launches), h100():
        if mode == "train":
            step.step(torch.randn(batch, cfg.model.channels, resolution, resolution), z)
        else:
            G.train(mode == "forward")
            sample(z[0])
    for launch in launches:
        if "PRECISION" in launch.kwargs:
            launch.kwargs["PRECISION"] = "tf32" if tf32 else "ieee"
    return launches


# ---------------------------------------------------------------------------------------------
# building

def _specialise(launch: Launch, backend):
    """What Triton's launcher would compile for these arguments: (signature, constexprs, attrs, options)."""
    # the options JITFunction.run adds before binding, as far as this triton version has them
    known = backend.parse_options({}).__dict__
    extra = dict(debug=False, instrumentation_mode="", fpsan_homomorphic_casts=False)
    kwargs = dict(launch.kwargs, **{k: v for k, v in extra.items() if k in known})
    binder = triton_jit.create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, options = binder(**kwargs)
    return launch.fn._pack_args(backend, kwargs, bound, spec, options)


def _tools() -> tuple[str, str]:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(bin_dir / "ptxas"), str(bin_dir / "cuobjdump")


def available() -> str:
    """'' if this machine can build for sm_90, else why not."""
    ptxas, cuobjdump = _tools()
    missing = [p for p in (ptxas, cuobjdump) if not os.access(p, os.X_OK)]
    return f"not in this triton wheel: {', '.join(missing)}" if missing else ""


def _describe(launch: Launch) -> tuple[str, str]:
    k = launch.kwargs
    if "BLOCK_M" in k:
        blocks = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"
    elif "BLOCK_P" in k:
        blocks = f"{k['BLOCK_P']}x{k['BLOCK_Q']}x{k['BLOCK_R']}"
    else:
        blocks = f"{k.get('BLOCK_T', k.get('BLOCK_R'))}x{k.get('BLOCK_C')}"
    role = []
    for name in ("PRO", "BPRO", "GPRO"):
        if k.get(name):
            role.append(f"{name.lower()}:{PRO_NAMES[k[name]]}")
    if k.get("DACT"):
        role.append(f"dact:{PRO_NAMES[k.get('EPRO', PRO_NONE.value)]}")
    for flag in ("STATS", "TANH", "HAS_BIAS", "ONE_BY_ONE", "FLAT_K", "FLAT", "ATOMIC"):
        if k.get(flag):
            role.append(flag.lower())
    if "DOT_DTYPE" in k:
        role.append(str(k["DOT_DTYPE"]) + ("/tf32" if k.get("PRECISION") == "tf32" else ""))
    return " ".join(role), blocks


def _resources(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, HGMMA count, HMMA count) from cuobjdump."""
    _, cuobjdump = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, stack, len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass))


def build_one(launch: Launch, spec: tuple) -> Built:
    """Compile one launch, specialised as _specialise(launch) gave `spec`, and read it back."""
    from triton.compiler import ASTSource
    role, blocks = _describe(launch)
    options, signature, constexprs, attrs = spec
    out = Built(SHORT.get(launch.fn.__name__, launch.fn.__name__), role, blocks, options.num_warps,
                options.num_stages, math.prod(launch.grid), where=launch.where)
    t0 = time.perf_counter()
    try:
        ck = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=h100_target(),
                            options=options.__dict__)
        out.smem = ck.metadata.shared
        out.regs, out.stack, out.hgmma, out.hmma = _resources(ck.asm["cubin"])
    except Exception as e:          # noqa: BLE001 -- reported per kernel, the run goes on
        out.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    out.seconds = time.perf_counter() - t0
    threads = 32 * out.warps
    if out.regs:
        by_regs = REGS_PER_SM // (math.ceil(out.regs * threads / 256) * 256)
        by_smem = SMEM_PER_SM // (out.smem + 1024) if out.smem else 32
        out.occupancy = max(0, min(by_regs, by_smem, 2048 // threads, 32))
        out.waves = out.programs / (H100_SMS * out.occupancy) if out.occupancy else math.inf
    return out


def _key(launch: Launch, spec: tuple) -> str:
    options, signature, constexprs, attrs = spec
    return f"{launch.fn.__name__}|{sorted(signature.items())}|{constexprs}|{attrs}|{options.num_warps}|{options.num_stages}"


_POOL: list = []                # (launch, spec) per distinct kernel; forked workers index it


def _build_index(i: int) -> Built:
    return build_one(*_POOL[i])


def build_all(launches: list, jobs: int) -> list:
    """One Built per distinct specialisation, in first-launch order."""
    from triton.compiler import make_backend
    backend = make_backend(h100_target())
    unique: dict = {}
    for launch in launches:
        spec = _specialise(launch, backend)
        unique.setdefault(_key(launch, spec), (launch, spec))
    _POOL[:] = list(unique.values())
    n = len(_POOL)
    print(f"building {n} distinct kernels ({len(launches)} launches) for sm_90 with {jobs} jobs",
          file=sys.stderr, flush=True)
    if jobs <= 1:
        return [_build_index(i) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        built = []
        for i, b in enumerate(pool.imap(_build_index, range(n)), 1):
            built.append(b)
            print(f"  [{i}/{n}] {b.kernel} {b.blocks} {b.seconds:.1f}s", file=sys.stderr, flush=True)
        return built


# ---------------------------------------------------------------------------------------------
# report

def table(built: list) -> str:
    head = "| where | kernel | role | blocks | warps | stages | programs | smem KiB | regs | stack | occ | waves | mma |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for b in built:
        mma = f"HGMMA {b.hgmma}" if b.hgmma else (f"HMMA {b.hmma}" if b.hmma else "-")
        if b.error:
            lines.append(f"| {b.where} | {b.kernel} | {b.role} | {b.blocks} | {b.warps} | {b.stages} | "
                         f"{b.programs} | FAILED: {b.error} | | | | | |")
            continue
        flag = " OVER" if b.smem > SMEM_LIMIT else ""
        lines.append(f"| {b.where} | {b.kernel} | {b.role} | {b.blocks} | {b.warps} | {b.stages} | {b.programs} | "
                     f"{b.smem / 1024:.1f}{flag} | {b.regs} | {b.stack} | {b.occupancy} | {b.waves:.2f} | {mma} |")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["mmgen"], choices=list(PRESETS))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch sizes (default: 128 for train, 1024 for sample)")
    p.add_argument("--amps", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    p.add_argument("--modes", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--compile", default="", choices=["", "aot_eager"],
                   help="record the launches of the step under torch.compile (aot_eager: tracing, no codegen)")
    p.add_argument("--deterministic", action="store_true", help="the kernels without atomics (deterministic=true)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    why = available()
    if why:
        print(f"cannot build for sm_90: {why}", file=sys.stderr)
        return 2
    launches = []
    for preset in args.presets:
        for mode in args.modes:
            for batch in args.batches or ([128] if mode == "train" else [1024]):
                for amp in args.amps:
                    launches += scenario(preset, batch, amp, mode, args.resolution, args.compile,
                                         args.deterministic)
    built = build_all(launches, args.jobs)
    print(table(built))
    bad = [b for b in built if not b.ok]
    spills = [b for b in built if b.stack]
    print(f"\n{len(built)} kernels: {len(bad)} failed or over the shared-memory limit, "
          f"{len(spills)} with a local-memory stack frame (spills), "
          f"{sum(1 for b in built if b.hgmma)} on HGMMA, {sum(1 for b in built if b.hmma and not b.hgmma)} on HMMA; "
          f"triton {triton.__version__}", flush=True)
    if args.out:
        files.write_text(args.out, json.dumps({"triton": triton.__version__, "target": "cuda sm_90",
                                               "smem_limit": SMEM_LIMIT, "rows": [asdict(b) for b in built]},
                                              indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    errors.main(main)       # a user's mistake: one line, no traceback
