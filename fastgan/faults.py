"""Faults during a training run: a stop signal, a timed checkpoint, a rank that dies or stalls,
a disk that fills up. train.py calls it; it holds no training logic.

    guard = faults.Guard(cfg, d, work_dir)              # right before the loop
    data = guard.watch(iter(loader), start)             # marks this rank's progress per batch
    due = guard.poll(done)          # each iteration: "signal" | "time" | None, the same on every rank
    guard.saved(done, path)         # after each checkpoint
    if guard.stopping: break        # after the signal's checkpoint; then raise guard.interrupted(done)

Signals. The first SIGTERM or SIGINT only sets a flag (and prints a line); the loop finishes the
iteration it is in, writes a checkpoint and stops with exit status 128 + the signal number (130,
143). Then SIGINT gets its default action back, so a second Ctrl-C ends the process at once
(checkpoints are written to a temp file and renamed, so earlier ones stay intact), and further
SIGTERMs are ignored: a scheduler and torchrun may both deliver one for the same stop, and
schedulers follow up with SIGKILL after their grace period anyway. A signal set to be ignored
(nohup, `&` in a script) stays ignored.

Agreement. Every rank must stop after the same iteration, or some would wait in a collective the
others never join. So the stop (and `ckpt_minutes`) is decided by an all-reduce (max) of each
rank's [signal number, checkpoint due] at fixed iterations that every rank computes alike:
  - one process: no collective; the flag is read every iteration (a Python attribute).
  - several processes on CPUs (gloo): every iteration. The DDP step already meets the other ranks
    on the host every iteration; this adds one 2-element all-reduce (0.3 ms measured between two
    processes on a loaded 2-core machine, where the smallest test iteration takes ~10 ms).
  - several processes on GPUs (nccl): every log_interval iterations, where the loop reads its losses
    and syncs with the device anyway, so the hot loop stays free of host syncs. Worst case: a
    signal waits log_interval iterations (100 in the MMGen config; at the 1.6-3 ms per iteration
    the design aims for, under half a second).
Under torchrun, signal torchrun itself (it forwards SIGTERM/SIGINT to every worker and waits
--shutdown-timeout seconds, default 30, before SIGKILL). A signal sent to one worker alone also
stops every rank with a checkpoint, but torchrun counts the non-zero exit as a failure and, with
--max-restarts, restarts the workers, which resume from that checkpoint.

Ranks that die or stall: fastgan/watchdog.py (started by distrib.setup; the Guard switches it on
for the loop and marks each rank's progress).

Outputs a run can live without (sample grids, log.jsonl, TensorBoard) go through `BestEffort`: a
failed write is warned about once and training goes on. Checkpoints are not optional: a failed
write stops the run (checkpoint.py says which file and why; earlier checkpoints stay intact).

Test hook: FASTGAN_TEST_STALL=RANK:ITERATION:SECONDS makes that rank sleep before loading that
iteration's batch (a stalled data loader), for the tests of the watchdog and of signals; not in a
group torchrun restarted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from fastgan import watchdog
from fastgan.errors import Interrupted, UserError, describe

clock = time.monotonic            # the tests replace it to make ckpt_minutes pass in an instant

SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- signals -----------------------------------------------------------------------------------

_installed: _SignalState | None = None     # the handlers in place now (one loop per process)


class _SignalState:
    """What the handlers share with the Guard; kept apart so the handlers can outlive a Guard
    (an exception out of the loop) and put the previous handlers back when it is collected, or
    when the next Guard starts."""

    def __init__(self, say_now: bool):
        self.signum = 0
        self.say_now = say_now
        self.pid = os.getpid()
        self.previous: dict[int, object] = {}

    def handler(self, signum, frame):
        if os.getpid() != self.pid:     # a forked child (a worker pool): the default action, or
            signal.signal(signum, signal.SIG_DFL)     # Pool.terminate() would wait for it forever
            os.kill(os.getpid(), signum)
            return
        if self.signum:                                 # a handler left from an earlier one
            return
        self.signum = signum
        for sig in self.previous:               # a second Ctrl-C ends the process; SIGTERM: see above
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGINT else signal.SIG_IGN)
        if self.say_now:                        # os.write: print() may be mid-write here
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: finishing this iteration, then writing a checkpoint and stopping "
                        "(Ctrl-C again to stop at once, without a checkpoint)\n".encode())

    def install(self) -> None:
        global _installed
        if threading.current_thread() is not threading.main_thread():
            return
        if _installed is not None:      # left by a loop an exception ended (tests, notebooks)
            _installed.restore()
        _installed = self
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue
            self.previous[sig] = current
            signal.signal(sig, self.handler)

    def restore(self) -> None:
        """The previous handlers back, where ours (or what a first signal set) is still in place:
        a later Guard's handlers stay."""
        if threading.current_thread() is not threading.main_thread():
            return
        global _installed
        for sig, old in self.previous.items():
            current = signal.getsignal(sig)
            if current == self.handler or (self.signum and current in (signal.SIG_DFL, signal.SIG_IGN)):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self.previous.clear()
        if _installed is self:
            _installed = None


def _command() -> str:
    """How to run this again, for the line that says how to continue."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "the same torchrun command"
    return "the same command: " + shlex.join(["python", *sys.argv])


# -- the guard around the training loop --------------------------------------------------------

class Guard:
    """Signals, `ckpt_minutes`, the work_dir's existence and (several ranks) the watchdog, for
    one training loop. See the module docstring for the design."""

    def __init__(self, cfg, d, work_dir: str | Path):
        self.cfg, self.d = cfg, d
        self.work = Path(work_dir)
        self.stopping = False
        self.signum = 0
        self.last_path = None
        self._extra = None                     # an off-grid (timed) checkpoint this run wrote
        self._last_ckpt = clock()
        self._seconds = cfg.ckpt_minutes * 60
        self._every = 1 if (not d.enabled or d.device.type == "cpu") else cfg.log_interval
        self._identity = _identity(self.work) if d.main else None
        self._signals = _SignalState(say_now=d.main)
        self._signals.install()
        weakref.finalize(self, self._signals.restore)
        self._stall = _stall_hook(d.rank)
        watchdog.watch(True)

    def watch(self, batches, start: int):
        """The loader's batches, marking (iteration, phase) for the watchdog."""
        it = start
        while True:
            it += 1
            watchdog.beat(it, watchdog.LOADING)
            if self._stall and self._stall[0] == it:
                time.sleep(self._stall[1])
            batch = next(batches)
            watchdog.beat(it, watchdog.STEPPING)
            yield batch

    def poll(self, done: int) -> str | None:
        """After iteration `done`: "signal" (checkpoint and stop), "time" (ckpt_minutes passed:
        checkpoint) or None. Every rank gets the same answer at the same iteration."""
        watchdog.beat(done, watchdog.AFTER)
        if done % self.cfg.log_interval == 0 and self._identity is not None:
            self._check_work_dir(done)
        if done % self._every:
            return None
        signum = self._signals.signum
        due = int(self._seconds > 0 and clock() - self._last_ckpt >= self._seconds)
        if self.d.enabled:
            flags = torch.tensor([signum, due], dtype=torch.int64, device=self.d.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, due = flags.tolist()
        if signum:
            self.stopping, self.signum = True, signum
            return "signal"
        return "time" if due else None

    def saved(self, done: int, path: Path | None) -> None:
        """A checkpoint was written: restart the ckpt_minutes clock; drop the timed checkpoint
        this run wrote before (it was only a recovery point; keep_ckpts keeps the regular ones)."""
        self._last_ckpt = clock()
        if not self.d.main or path is None:
            return
        self.last_path = path
        if self._extra is not None and self._extra != path:
            self._extra.unlink(missing_ok=True)
            self._extra = None
        regular = done % self.cfg.ckpt_interval == 0 or done == self.cfg.total_iters or self.stopping
        if not regular:
            self._extra = path

    def close(self) -> None:
        """After the loop: the previous signal handlers back, the watchdog off."""
        self._signals.restore()
        watchdog.watch(False)

    def interrupted(self, done: int) -> Interrupted:
        name = signal.Signals(self.signum).name
        where = f"saved {self.last_path}" if self.last_path else "checkpoint saved by rank 0"
        return Interrupted(f"interrupted by {name} at iteration {done}/{self.cfg.total_iters}: {where}. "
                           f"To continue from there, run {_command()}", 128 + self.signum)

    def _check_work_dir(self, done: int) -> None:
        if _identity(self.work) != self._identity:
            raise UserError(f"work_dir {self.work} was deleted, moved or unmounted while training "
                            f"(noticed after iteration {done}): nothing more can be saved there, so the run "
                            f"stops. Put it back to continue from its newest checkpoint, or start again")


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _stall_hook(rank: int):
    spec = os.environ.get("FASTGAN_TEST_STALL", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":   # not after a restart
        return None
    r, it, seconds = spec.split(":")
    return (int(it), float(seconds)) if int(r) == rank else None


def memory_advice(cfg) -> str:
    """What to try when training runs out of memory."""
    tries = [f"--batch_size={max(1, cfg.batch_size // 2)}"]
    if cfg.amp == "fp32":
        tries.append("--amp=bf16")
    if cfg.data.cache == "gpu":
        tries.append("--data.cache=host (the decoded images then live in host memory)")
    return f"batch_size={cfg.batch_size} per process does not fit; try {', or '.join(tries)}"


# -- outputs a run can live without ------------------------------------------------------------

class BestEffort:
    """`with writes("sample grids"): ...` runs a write; an OSError (full disk, read-only or
    vanished folder) is warned about once per kind and swallowed, and training goes on."""

    def __init__(self, warn):
        self.warn = warn
        self.failed: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, what: str):
        try:
            yield
        except OSError as e:
            self.failed[what] = self.failed.get(what, 0) + 1
            if self.failed[what] == 1:
                self.warn(f"warning: cannot write {what} ({describe(e)}); training goes on without "
                          "them (said once)")
