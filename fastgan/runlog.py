"""The run's log: log.jsonl, TensorBoard events and stdout, written by rank 0 only.

Writes here are best effort (faults.BestEffort): on a full or read-only disk the run warns once
per kind of output and trains on; checkpoints are what a run cannot do without.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fastgan import distrib, faults
from fastgan.progress import Progress


class RunLog:
    """`say` prints a line (above the progress bar), `record` appends an entry to log.jsonl and
    its numbers to TensorBoard, `image` adds a grid to TensorBoard; `writes` wraps any other
    optional write. Every rank may call them; only rank 0 acts."""

    def __init__(self, cfg, d: distrib.Dist, progress: Progress):
        self.main, self.progress = d.main, progress
        self.path = Path(cfg.work_dir) / "log.jsonl"
        self.tb = None
        self.writes = faults.BestEffort(self.say)    # a full disk skips these; checkpoints stop the run
        if not self.main:
            return
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:      # a kill may have cut the last line short
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "a") as out:
                        out.write("\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(cfg.work_dir) / "tensorboard"))
        except ImportError:
            pass

    def say(self, message: str) -> None:
        if self.main:
            self.progress.write(message)

    def record(self, entry: dict) -> None:
        if not self.main:
            return
        with self.writes(f"{self.path}"):
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.tb is not None and "iter" in entry:
            with self.writes("TensorBoard events"):
                for k, v in entry.items():
                    if k not in ("iter", "time", "event") and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, entry["iter"])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        if self.main and self.tb is not None:
            with self.writes("TensorBoard events"):
                self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
