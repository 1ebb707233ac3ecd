"""A dependency-free progress line for the long data steps (writing, scanning, decoding)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`label  done/total  rate unit/s  ETA`: redrawn in place on a terminal, a line every 10 s
    in a log file, and a summary line at close. enabled=False makes it silent (ranks other than 0)."""

    def __init__(self, label: str, total: int, unit: str = "img", enabled: bool = True, stream=None):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.start = self.last = time.perf_counter()

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            eta = (self.total - self.done) / max(self.rate(), 1e-9)
            line = (f"{self.label}  {self.done}/{self.total}  {self.rate():.0f} {self.unit}/s  "
                    f"ETA {eta:.0f}s")
            self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            took = time.perf_counter() - self.start
            line = f"{self.label}  {self.done} {self.unit} in {took:.1f}s ({self.rate():.0f} {self.unit}/s)"
            self.stream.write(f"\r{line}\033[K\n" if self.tty else line + "\n")
            self.stream.flush()
