"""bench/gpu_check.sh, the one-call GPU check: its dry run (every stage at toy size on the CPU, so the
script a GPU session runs cannot rot; ~1.5-2 minutes on 2 cores) and the time box around each step."""

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
    assert res["status"] == "timeout (3 s)" and time.monotonic() - t0 < 30 and len(ticks) >= 2
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
