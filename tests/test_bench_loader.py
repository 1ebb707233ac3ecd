"""bench/loader.py runs as a user runs it, at toy sizes, and writes a table of finite rates for every
section (decode, serve, train); so the loader benchmark cannot rot on machines without a GPU."""

import json
import subprocess
import sys
from pathlib import Path

from fastgan.data import dali

ROOT = Path(__file__).resolve().parents[1]


def test_loader_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "loader.json"
    cmd = [sys.executable, str(ROOT / "bench" / "loader.py"), "--images", "48", "--batch", "8", "--workers", "1",
           "--serve-batches", "4", "--train-iters", "3", "--repeats", "2", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["images"] == 48 and result["dali"] == dali.available()
    sections = [r["section"] for r in result["rows"]]
    # decode: PIL (+ DALI cpu); serve: host cache, torch DataLoader (+ DALI streaming); train: two rows.
    assert sections.count("decode") == 1 + dali.available()
    assert sections.count("serve") == 2 + dali.available()
    assert sections.count("train") == 2
    for r in result["rows"]:
        assert 0 < r["min"] <= r["img_s"] <= r["max"] < float("inf"), r
    assert "% of in-memory" in result["rows"][-1]["note"]
