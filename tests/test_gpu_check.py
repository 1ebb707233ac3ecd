"""bench/gpu_check.sh, the one-call GPU check: its dry run (every stage at toy size on the CPU, so the
script a GPU session runs cannot rot; ~1.5-2 minutes on 2 cores), how it installs fastgan where pip
refuses, the time box around each step, and the summary of logs read while being written."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402
import triton_cache  # noqa: E402


def test_dry_run_runs_every_stage_and_returns_what_a_session_commits(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--work", str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]

    # the planned budget first, the summary table last (the device tool returns the output's tail)
    before = text.split("\n[a] ")[0]
    assert "\nplanned device time" in before and "a environment" in before and "d-torch" in before
    assert text.rstrip().endswith((out / "summary.md").read_text().rstrip())

    # at most 8 files with plain names, at most 2 folders deep: what the device tool brings back
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    summary = json.loads((out / "summary.json").read_text())
    table = summary["throughput"]["file"]
    assert set(files) == {"summary.json", "summary.md", table, "samples-triton.png", "samples-torch.png",
                          "profile.txt", "logs.tar.gz"}

    assert summary["dry_run"] and list(summary["stages"]) == list("abcde")
    for key, stage in summary["stages"].items():
        for name, step in stage["steps"].items():
            assert step["status"] == "ok", f"{name}: {step}"
    assert summary["env"]["peak_bf16_tflops"] > 0 and summary["env"]["copy_gb_s"] > 0
    cases = summary["correct"]["cases"]
    assert cases and all(c["ok"] and c["grads"]["err"] <= c["grads"]["bound"] for c in cases)
    assert summary["correct"]["graph_vs_eager"]["ok"] and summary["pytest"]["passed"] >= 1
    rows = json.loads((out / table).read_text())["rows"]       # bench/throughput.py's own file, as committed
    assert {(r["variant"], r["mode"]) for r in rows} >= {("eager_fp32", "train"), ("fastgan", "sample")}
    assert all(r["parity_ok"] and r["img_per_s"] > 0 for r in rows)
    for backend in ("triton", "torch"):
        run = summary["learn"][backend]
        assert run["iterations"] == 2 and run["eval"]["swd"] > 0 and run["grid"], (backend, run)
    assert summary["learn"]["triton"]["backend"].startswith("backend triton")
    assert summary["profile"]["top"] and (out / "profile.txt").read_text().count("\n") > 10


def test_a_step_past_its_box_is_killed_with_its_children(tmp_path):
    """A step that overruns is stopped at the end of its box, children included (inductor's compile
    workers, DataLoader workers), and recorded as a timeout; the check goes on. While it ran, its
    results so far were copied out (tick) every second here, every 15 s in a real check."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(300)")
    step = gpu_check.Step("sleeper", [sys.executable, "-c", code], planned=1)
    t0 = time.monotonic()
    ticks = []
    res = gpu_check.run_step(step, 3, tmp_path / "sleeper.log", dict(os.environ), lambda: ticks.append(1), every=1)
    # the first wait (1 s of the 3 s box) always times out, however loaded the machine: one tick at least
    assert res["status"] == "timeout (3 s)" and time.monotonic() - t0 < 30 and ticks
    child = int(pid_file.read_text())
    for _ in range(50):                      # the child is gone (or a zombie about to be reaped by init)
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} of the timed-out step is still running")


# A stand-in for the GPU machine's Python, as gpu_check.sh calls it: fastgan is importable once
# installed or from a copy on PYTHONPATH; pip refuses a system Python (PEP 668) unless told
# --break-system-packages, and then installs only if FAKE_PIP_WORKS is set; the hand-over to
# gpu_check.py is printed, not run.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  -c) [[ -f "$FAKE_DIR/installed" || -f "${PYTHONPATH%%:*}/fastgan/kernels/__init__.py" ]]; exit $? ;;
  -m) if [[ "$*" == *--break-system-packages* && -n "${FAKE_PIP_WORKS:-}" ]]; then
          touch "$FAKE_DIR/installed"; exit 0
      fi
      echo "error: externally-managed-environment"; exit 1 ;;
  *)  echo "hand-over: $* PYTHONPATH=${PYTHONPATH:-}" ;;
esac
"""


def test_install_where_pip_refuses_a_system_python(tmp_path):
    """pip's PEP 668 refusal gets a second try with --break-system-packages; if pip still fails, a
    copy of the sources on PYTHONPATH, which triton_cache.py's build accepts as this tree."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)

    def run(**env):
        (tmp_path / "calls").unlink(missing_ok=True)
        out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHON": str(fake), "FAKE_DIR": str(tmp_path),
                                              "TMPDIR": str(tmp_path), "OUT": str(tmp_path / "out"), "PYTHONPATH": "",
                                              **env})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout, (tmp_path / "calls").read_text().splitlines()

    said, calls = run(FAKE_PIP_WORKS="1")
    pips = [c for c in calls if c.startswith("-m pip install")]
    assert len(pips) == 2 and "--break-system-packages" not in pips[0] and "--break-system-packages" in pips[1]
    last = said.splitlines()[-1]
    assert last.startswith("hand-over: bench/gpu_check.py --started") and last.endswith("--dry-run PYTHONPATH=")
    assert not (tmp_path / "fastgan-src").exists()

    (tmp_path / "installed").unlink()
    said, calls = run()
    src = tmp_path / "fastgan-src"
    assert len([c for c in calls if c.startswith("-m pip install")]) == 2
    assert f"running fastgan from a copy in {src}" in said and said.splitlines()[-1].endswith(f"PYTHONPATH={src}")
    assert triton_cache.sources_hash(src / "fastgan", src / "fastgan" / "kernels") == \
        triton_cache.sources_hash(ROOT / "fastgan", ROOT / "kernels")


def test_summary_skips_a_log_line_cut_short(tmp_path):
    """A step killed mid-write, or a refresh while a line is being written, leaves a partial last
    line: the summary keeps every complete one (and the newest grid by iteration, not by name)."""
    work, out = tmp_path / "work", tmp_path / "out"
    run = work / "d-triton"
    (run / "training_samples").mkdir(parents=True)
    (work / "logs").mkdir()
    out.mkdir()
    lines = [{"iter": i, "img_per_s": 1000.0 + i, "elapsed_s": i / 10, "loss_d": 1.0, "loss_g": 2.0}
             for i in (250, 500, 750)]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"iter": 1000, "img_pe')
    for it in (9, 10):
        (run / "training_samples" / f"iter_{it}.png").write_bytes(f"grid {it}".encode())
    (work / "logs" / "d-triton.log").write_text("backend triton (fused Triton kernels)\n")
    stats = {"tag": "b-correct", "hits": 295, "compiled": 0, "compile_s": 0.0, "other": 3, "compiled_names": []}
    (work / "triton-stats.jsonl").write_text(json.dumps(stats) + "\n" + json.dumps({"tag": "a-env"}) + "\n"
                                             + '{"tag": "b-pytest", "hi')
    summary = {}
    gpu_summary.collect(summary, "d", work, out)
    learned = summary["learn"]["triton"]
    assert learned["iterations"] == 750 and learned["img_per_s"] == 1750.0 and learned["elapsed_s"] == 75.0
    assert learned["losses"] == {"loss_d": 1.0, "loss_g": 2.0} and learned["backend"].startswith("backend triton")
    assert (out / "samples-triton.png").read_bytes() == b"grid 10" and summary["learn"]["torch"] is None
    assert summary["triton_stats"] == {"b-correct": {k: stats[k] for k in ("hits", "compiled", "compile_s", "other")}}
