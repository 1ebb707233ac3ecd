"""Tiny training runs, shared by the test files that train: paths, a run's overrides, the
processes that run train.py, and what they leave in the work_dir.

A tiny run: MMGen at 32x32, base_channels 8, batch 8, 64 synthetic faces, a log line per
iteration, decoded once into a host cache (data and cache in one folder per test module).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgan import checkpoint as ck
from fastgan import config as C
from fastgan import errors
from fastgan import train as train_mod

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastgan" / "train.py")
QUICKSTART = str(ROOT / "configs" / "quickstart.py")


def tiny_args(d: Path, *extra: str) -> list[str]:
    """Overrides of the quick start for a tiny run; data and cache under d."""
    return ["--model.resolution=32", "--model.base_channels=8", "--batch_size=8", "--num_samples=4",
            "--data.source=synthetic", f"--data.root={d / 'faces'}", "--data.synthetic_count=64",
            f"--data.cache_dir={d / 'cache'}", "--data.cache=host", "--data.loader=torch",
            "--data.num_workers=0", "--log_interval=1", *extra]


def tiny(work_dir, data_args, *extra) -> C.Config:
    return C.load(QUICKSTART, [f"--work_dir={work_dir}", *data_args, *extra])


def run_script(*args, timeout=240, **kw):
    """train.py as a user runs it, to the end."""
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_sample(*args, check=True):
    """sample.py as a user runs it."""
    out = subprocess.run([sys.executable, str(ROOT / "fastgan" / "sample.py"), *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def default_sigint():
    """Children get SIGINT's default action even when pytest runs with it ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, tmp_path, env=None, name="run", prefix=(sys.executable, TRAIN)):
    """train.py (or `prefix`, e.g. torchrun's command) in a child process; stdout and stderr to
    files (read them after it ends)."""
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([*prefix, *map(str, args)], stdout=out, stderr=err,
                            env={**os.environ, **(env or {})}, preexec_fn=default_sigint)
    proc.files = (tmp_path / f"{name}.out", tmp_path / f"{name}.err")
    return proc


def dispositions(pid: int) -> dict[str, str]:
    """SIGTERM's and SIGINT's disposition in process `pid`: ignored, handled or default (Linux's
    /proc/PID/status masks)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = dict(line.split(":") for line in status if line.startswith(("SigIgn", "SigCgt")))
    ignored, handled = int(masks["SigIgn"], 16), int(masks["SigCgt"], 16)

    def what(sig):
        bit = 1 << (sig - 1)
        return "ignored" if ignored & bit else "handled" if handled & bit else "default"
    return {s.name: what(s) for s in (signal.SIGTERM, signal.SIGINT)}


def run_main(argv, capsys):
    """train.py's entry point in this process: (exit status, stdout, the error lines). stderr
    also carries progress bars; a user's mistake must leave one error line and no traceback."""
    with pytest.raises(SystemExit) as stop:
        errors.main(train_mod.main, [str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return stop.value.code, out.out, error_lines(out.err)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error:", "rank ", "interrupted"))]


def wait_for(condition, proc=None, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, "the run ended first: " + proc.files[1].read_text()[-2000:]
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what a run leaves -----------------------------------------------------------------------------

def log_entries(work_dir) -> list[dict]:
    """log.jsonl's complete lines (a line being written is left out)."""
    out = []
    for line in (Path(work_dir) / "log.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def logged(work, iteration):
    """A condition for wait_for: the run has logged its losses at `iteration` or later."""
    path = Path(work) / "log.jsonl"
    return lambda: path.is_file() and any(e.get("iter", 0) >= iteration and "loss_g" in e
                                          for e in log_entries(work))


def losses(work):
    return [(e["iter"], e["loss_d_fake"], e["loss_d_real"], e["loss_g"]) for e in log_entries(work) if "loss_g" in e]


def assert_same_state(a_path, b_path):
    """Two checkpoints hold the same G, D and optimizer states, bit for bit."""
    a, b = ck.load(a_path), ck.load(b_path)
    for net in ("G", "D"):
        for name, x in a[net].items():
            assert torch.equal(x, b[net][name]), f"{net}.{name}"
    for opt in ("opt_g", "opt_d"):
        for i, s in a[opt]["state"].items():
            assert all(torch.equal(s[k], b[opt]["state"][i][k]) for k in s), opt
