"""A one-line progress bar with img/s and ETA, for rank 0; no dependency on tqdm.

On a terminal it redraws one line in place (at most 5 times a second); elsewhere (a log file,
CI) it prints a plain line every `every` seconds so a long step still shows it is alive.
`write()` prints a message above the bar without tearing it.
"""

from __future__ import annotations

import shutil
import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, start: int = 0, unit_items: int = 1, desc: str = "",
                 enabled: bool = True, stream=None, every: float = 30.0):
        self.total, self.n, self.start = total, start, start
        self.unit_items = unit_items          # items (images) per step, for the rate
        self.desc, self.enabled = desc, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.tty else every
        self.t0 = self.last = time.perf_counter()
        self.drawn = False

    def reset(self, start: int) -> None:
        """Count from `start` (a resumed run) with the clock starting now."""
        self.n = self.start = start
        self.t0 = self.last = time.perf_counter()

    def rate(self) -> float:
        """Items per second since the bar started."""
        dt = time.perf_counter() - self.t0
        return (self.n - self.start) * self.unit_items / dt if dt > 0 else 0.0

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        done = self.n - self.start
        eta = (self.total - self.n) * dt / done if done else 0.0
        frac = self.n / self.total if self.total else 1.0
        stats = f" {self.n}/{self.total} [{_duration(dt)}<{_duration(eta)}, {self.rate():,.1f} img/s]"
        head = f"{self.desc}: " if self.desc else ""
        width = shutil.get_terminal_size((100, 20)).columns - len(head) - len(stats) - 8
        if width < 10:
            return f"{head}{100 * frac:3.0f}%{stats}"
        fill = int(frac * width)
        return f"{head}{100 * frac:3.0f}%|{'#' * fill}{' ' * (width - fill)}|{stats}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.n >= self.total):
            self.last = now
            self._draw()

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """Print a line (to stdout) above the bar."""
        if not self.enabled:
            return
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        print(message, flush=True)
        if self.drawn:
            self._draw()

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = False
