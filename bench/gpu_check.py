"""One GPU check in one device call: is fastgan right, fast, and does it learn, on the GPU it runs on.

    bash bench/gpu_check.sh                # on the GPU machine, $OUT from the device tool (~8.5 minutes)
    bash bench/gpu_check.sh --dry-run      # anywhere: every stage at toy size on the CPU (~1.5 minutes)
    bash bench/gpu_check.sh --only d,e     # some stages (a second call after a first one ran out)

Stages in priority order, each step a process of its own in a time box (killed with its children at
the end of the box). What a step has written is copied to $OUT every 15 s while it runs and when it
ends, and the summary (summary.json, summary.md; 7 files in all: the device tool brings back at most
8) is rewritten each time and printed last, so a call cut short still returns what it finished.

  a  environment: GPU, SMs, driver, versions, bf16 matmul peak and copy bandwidth measured here;
     the carried Triton cache relocated and its key inputs compared (bench/triton_cache.py)
  b  correctness on CUDA: fastgan.selfcheck at the real shapes (both presets; bf16, tf32, IEEE fp32),
     the CUDA-graph step against the eager step, and the CUDA tests of tests/test_cuda_graph.py,
     tests/test_fused_models.py and the EMA's (tests/test_ema.py)
  c  throughput (bench/throughput.py, MMGen preset): training at batch 128 (eager fp32, eager bf16,
     fastgan, torch.compile reduce-overhead), sampling at batch 1024 (the same four)
  d  learning: fastgan/train.py, MMGen's config at 64x64 in bf16 on synthetic faces, 3000 iterations
     with backend=triton (CUDA graph) and with backend=torch: img/s, SWD at the end, both sample grids
  e  if time is left: one graph replay profiled (top kernels), torch.compile max-autotune, batch-1024
     training rows

Time boxes: a step may run until the deadline minus the planned time of every later step of the
mandatory stages (a..d), so time one saves goes to the next, and an overrun cannot eat a later
stage's plan; e gets what is left. The plan (PLAN, seconds on an H200) is printed first; the figures it
rests on are in bench/NOTES.md section 4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_summary import collect, finish  # noqa: E402
CONFIG = "configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py"
SUMMARY_RESERVE = 15        # seconds kept for the last summary, the tar and the processes' exit
MIN_BOX = 5                 # a step with less time than this is skipped, not started
REFRESH_S = 15              # while a step runs, its results so far reach $OUT this often
PYTEST_CUDA = ("replay or sync or nccl or cross_between or tf32 or one_training_iteration or fifty")
EMA_CUDA_TEST = "tests/test_ema.py::test_captured_update_equals_uncaptured_without_host_sync"   # "sync" selects it


@dataclass
class Step:
    name: str
    cmd: list
    planned: float            # seconds on an H200 (PLAN)
    why: str = ""             # what the plan rests on


@dataclass
class Stage:
    key: str
    title: str
    steps: list
    optional: bool = False

    @property
    def planned(self) -> float:
        return sum(s.planned for s in self.steps)


# ---------------------------------------------------------------------------------------------
# the plan

def plan(work: Path, dry: bool) -> list:
    """The stages and their steps; planned seconds and what they rest on (bench/NOTES.md section 4)."""
    py = [sys.executable, str(ROOT / "bench/triton_cache.py"), "run", "--stats", str(work / "triton-stats.jsonl")]

    def run(tag, *argv):          # every Python step runs under Triton's compilation listener
        return [*py, "--tag", tag, "--", *map(str, argv)]
    stages_py = ROOT / "bench/gpu_stages.py"
    bench = ["bench/throughput.py", "--out", work / "throughput.json", "--append", "--presets", "mmgen"]
    if dry:   # toy sizes: every path once, about 2 minutes on 2 busy CPU cores
        bench += ["--resolution", "32", "--base-channels", "4", "--repeats", "1", "--no-profile", "--peak-size", "256"]
        c1 = [*bench, "--batches", "4", "--modes", "train", "--variants", "eager_fp32"]
        c2 = [*bench, "--batches", "4", "--modes", "sample", "--variants", "eager_fp32", "fastgan"]
        e2 = e3 = None
        pytest_k = "build_step_says_which_runs"
        iters, train = 2, ["--amp=fp32", "--model.resolution=32", "--model.base_channels=4", "--batch_size=4",
                           "--data.synthetic_count=32", "--eval.num_samples=16", "--data.num_workers=0",
                           "--log_interval=1", "--device=cpu"]
    else:
        c1 = [*bench, "--batches", "128", "--modes", "train",
              "--variants", "eager_fp32", "eager_bf16", "fastgan", "compile_reduce_overhead"]
        c2 = [*bench, "--batches", "1024", "--modes", "sample",
              "--variants", "eager_fp32", "eager_bf16", "fastgan", "compile_reduce_overhead"]
        e2 = [*bench, "--batches", "128", "--modes", "train", "--variants", "compile_max_autotune"]
        e3 = [*bench, "--batches", "1024", "--modes", "train", "--variants", "eager_fp32", "eager_bf16", "fastgan"]
        pytest_k = PYTEST_CUDA
        iters, train = 3000, ["--amp=bf16", "--data.synthetic_count=8192", "--eval.num_samples=8192",
                              "--data.num_workers=16", "--log_interval=250"]
    train = [CONFIG, "--compile=false", "--data.source=synthetic", f"--data.root={work / 'faces'}",
             f"--data.cache_dir={work / 'data-cache'}", "--sample_interval=1000000", "--ckpt_interval=1000000",
             "--eval.metrics=swd", "--eval.best_metric=", "--keep_ckpts=1", f"--total_iters={iters}",
             f"--eval_interval={iters}", *train]
    stages = [
        Stage("a", "environment", [
            Step("a-cache", [sys.executable, "bench/triton_cache.py", "prepare", "--json", str(work / "cache.json"),
                             *(["--dir", str(work / "triton-cache"), "--pack", str(ROOT / ".triton-cache.tar.gz")]
                               if dry else ["--build-if-stale", "--jobs", "16"])], 5,
                 "unpacks the carried 14 MiB tar (~60 MiB), rewrites ~300 small JSON files: 2.4 s here. If a key "
                 "input differs there: compiles the ~300 kernels on 16 cores instead (~1 min, from e's time)"),
            Step("a-env", run("a-env", stages_py, "env", "--out", work / "env.json"), 20,
                 "Python start and torch import (~5 s), 8192^3 bf16 matmuls and 1 GiB copies (~2 s)")]),
        Stage("b", "correctness", [
            Step("b-correct", run("b-correct", stages_py, "correct", "--out", work / "correct.json"), 45,
                 "import ~5 s; 6 self-checks at batch 128 (3 iterations, then 3 warm-up, a capture, 2 replays "
                 "each) and 6 iterations graph against eager: ~0.3 s of GPU work; 295 kernels load from the cache "
                 "(1.4 s here); CUDA context, cuDNN and cuBLAS set-up"),
            Step("b-pytest", run("b-pytest", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                 "tests/test_cuda_graph.py", "tests/test_fused_models.py", EMA_CUDA_TEST,
                                 "-k", pytest_k, f"--junitxml={work / 'b-pytest.xml'}"), 45,
                 "pytest start and collection ~10 s; 16 CUDA tests on tiny models, kernels from the cache "
                 "(the EMA's runs on the torch backend)")]),
        Stage("c", "throughput", [
            Step("c-train-b128", run("c-train-b128", *c1), 120,
                 "4 rows: the 2 eager ~10 s each; fastgan and reduce-overhead are torch.compile'd by inductor "
                 "(~40-50 s each: cannot be carried); each row: warm-up, parity, 5 x 0.25 s, a kernel count"),
            Step("c-sample-b1024", run("c-sample-b1024", *c2), 50,
                 "4 rows of G alone: reduce-overhead compiles G (~20 s); fastgan's G from the cache")]),
        Stage("d", "learning", [
            Step("d-triton", run("d-triton", "fastgan/train.py", *train, "--backend=triton",
                                 f"--work_dir={work / 'd-triton'}"), 70,
                 "import ~5 s, 8192 synthetic faces on 16 workers ~10 s (first run only), self-check ~3 s, "
                 "3000 iterations at ~4-8 ms, SWD on 8192 images ~5 s"),
            Step("d-torch", run("d-torch", "fastgan/train.py", *train, "--backend=torch",
                                f"--work_dir={work / 'd-torch'}"), 60,
                 "as above without the data and the self-check; torch's iteration ~5-8 ms")]),
        Stage("e", "extras", [Step("e-profile", run("e-profile", stages_py, "profile", "--out", work / "profile.json"),
                                   20, "import, capture, one profiled replay")]
              + ([Step("e-train-b1024", run("e-train-b1024", *e3), 60, "3 rows at batch 1024; fastgan's "
                       "compile is inductor's again"),
                  Step("e-max-autotune", run("e-max-autotune", *e2), 120, "inductor's max-autotune benchmarks "
                       "conv templates: minutes"),
                  Step("e-ops", run("e-ops", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bench_ops.py",
                                    "--benchmark-group-by=group", "--benchmark-columns=median,iqr,rounds",
                                    f"--benchmark-json={work / 'ops.json'}"), 60,
                       "each fused op against cuDNN at batch 128; its kernels are not in the cache")]
                 if e2 else []), optional=True),
    ]
    return stages


def print_plan(stages: list, budget: float, setup: float) -> None:
    print(f"planned device time (s, on an H200; budget {budget:.0f} s, {setup:.0f} s of it already spent on set-up):")
    for stage in stages:
        print(f"  {stage.key} {stage.title:<12} {stage.planned:>5.0f}{'  (if time is left)' if stage.optional else ''}")
        for s in stage.steps:
            print(f"      {s.name:<16} {s.planned:>5.0f}  {s.why}")
    print(f"  summary          {SUMMARY_RESERVE:>5.0f}", flush=True)


# ---------------------------------------------------------------------------------------------
# running a step in its box

def run_step(step: Step, box: float, log_path: Path, env: dict, tick=None, every: float = REFRESH_S) -> dict:
    """Run step.cmd with stdout and stderr to log_path, killed with its process group after `box` s;
    tick() every `every` seconds meanwhile (what the step has written so far goes to $OUT)."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        rc = None
        while rc is None:
            left = box - (time.monotonic() - t0)
            if left <= 0:
                _kill(proc)
                break
            try:
                rc = proc.wait(timeout=min(every, left))
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    status = f"timeout ({box:.0f} s)" if rc is None else "ok" if rc == 0 else f"failed (exit {rc})"
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "box_s": round(box, 1)}


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join("      " + ln[:200] for ln in text[-lines:])


# ---------------------------------------------------------------------------------------------
# main

def environment(work: Path, dry: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"))
    if dry:
        # the CPU even where there is a GPU; one thread: at toy sizes torch's two OpenMP threads wait
        # on each other on a busy 2-core machine
        env.update(TRITON_CACHE_DIR=str(work / "triton-cache"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        return env
    env["TRITON_CACHE_DIR"] = str(ROOT / ".triton-cache")
    # The ptxas in triton's wheel, which the carried cache was built with (its version enters every
    # key); torch's inductor would otherwise switch a process to torch's own ptxas when it first
    # compiles in that process, and every fastgan kernel compiled after that would miss the cache.
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        ptxas = Path(spec.origin).parent / "backends/nvidia/bin/ptxas"
        if ptxas.is_file():
            env["TRITON_PTXAS_PATH"] = str(ptxas)
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (the default without a GPU)")
    p.add_argument("--budget", type=float, default=510, help="seconds from --started to the summary (default 510: "
                                                             "the device call's timeout_s 540, less a margin)")
    p.add_argument("--started", type=float, default=None, help="epoch seconds the call began (gpu_check.sh passes it)")
    p.add_argument("--only", default="abcde", help="stages to run, e.g. 'd,e' (default all)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fastgan-gpu-check")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/fastgan-gpu-check-out")))
    args = p.parse_args(argv)
    only = set(args.only.replace(",", ""))
    if not only or not only <= set("abcde"):
        p.error(f"--only takes stage letters a-e (e.g. 'd,e'), got {args.only!r}")
    started = args.started or time.time()
    deadline = time.monotonic() + args.budget - (time.time() - started)
    dry = args.dry_run or not _has_cuda()
    work, out = args.work.resolve(), args.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dry_run": dry, "started": time.strftime("%F %T", time.localtime(started)), "budget_s": args.budget,
               "setup_s": round(time.time() - started, 1), "stages": {}, "device": None}
    stages = plan(work, dry)
    print(f"fastgan GPU check{' (DRY RUN: no GPU, every stage at toy size on the CPU)' if dry else ''}; "
          f"results in {out}", flush=True)
    print_plan(stages, args.budget, summary["setup_s"])
    env = environment(work, dry)

    def refresh(key):               # what stage `key` has written so far -> summary and $OUT
        collect(summary, key, work, out)
        finish(summary, work, out)
    for i, stage in enumerate(stages):
        if stage.key not in only:
            continue
        record = summary["stages"].setdefault(stage.key, {"title": stage.title, "planned_s": stage.planned,
                                                          "steps": {}})
        later = sum(s.planned for st in stages[i + 1:] if not st.optional and st.key in only for s in st.steps)
        for j, step in enumerate(stage.steps):
            rest = 0 if stage.optional else sum(s.planned for s in stage.steps[j + 1:])
            box = deadline - SUMMARY_RESERVE - later - rest - time.monotonic()
            if box < MIN_BOX:
                record["steps"][step.name] = {"status": "skipped (no time left)", "seconds": 0}
                print(f"[{stage.key}] {step.name}: skipped, {box:.0f} s left for it", flush=True)
                continue
            print(f"[{stage.key}] {step.name}: up to {box:.0f} s (planned {step.planned:.0f})", flush=True)
            res = run_step(step, box, work / "logs" / f"{step.name}.log", env, lambda: refresh(stage.key))
            record["steps"][step.name] = res
            print(f"[{stage.key}] {step.name}: {res['status']} in {res['seconds']:.0f} s", flush=True)
            if res["status"] != "ok":
                print(tail(work / "logs" / f"{step.name}.log"), flush=True)
            refresh(stage.key)
        record["seconds"] = round(sum(s.get("seconds", 0) for s in record["steps"].values()), 1)
    summary["elapsed_s"] = round(time.time() - started, 1)
    print(finish(summary, work, out), flush=True)
    # an optional stage only runs in the time left: its steps skipped or cut short fail nothing
    optional = {stage.key for stage in stages if stage.optional}
    return 0 if all(s["status"] == "ok" or (key in optional and not s["status"].startswith("failed"))
                    for key, st in summary["stages"].items() for s in st["steps"].values()) else 1


def _has_cuda() -> bool:
    """Whether a GPU is visible, without importing torch into this process: nvidia-smi -L, or where
    there is no nvidia-smi, torch asked in a child process."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        ask = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return ask.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


if __name__ == "__main__":
    sys.exit(main())
