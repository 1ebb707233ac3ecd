"""Faults during a training run: a stop signal, a timed checkpoint, a rank that dies or stalls,
a disk that fills up. train.py calls it; it holds no training logic.

    guard = faults.Guard(cfg, d, log.say, work_dir)    # right before the loop
    data = guard.watch(iter(loader), start)             # marks this rank's progress per batch
    due = guard.poll(done)          # each iteration: "signal" | "time" | None, the same on every rank
    guard.saved(done, path)         # after each checkpoint
    if guard.stopping: break        # after the signal's checkpoint; then raise guard.interrupted(done)

Signals. The first SIGTERM or SIGINT only sets a flag (and prints a line); the loop finishes the
iteration it is in, writes a checkpoint and stops with exit status 128 + the signal number (130,
143). The handler then gives the signal back its default action, so a second one ends the process
at once; checkpoints are written to a temp file and renamed, so earlier ones stay intact. A signal
set to be ignored (nohup, `&` in a script) stays ignored.

Agreement. Every rank must stop after the same iteration, or some would wait in a collective the
others never join. So the stop (and `ckpt_minutes`) is decided by an all-reduce (max) of each
rank's [signal number, checkpoint due] at fixed iterations that every rank computes alike:
  - one process: no collective; the flag is read every iteration (a Python attribute).
  - several processes on CPUs (gloo): every iteration. The DDP step already meets the other ranks
    on the host every iteration; this adds one 2-element all-reduce (~0.1 ms on one machine).
  - several processes on GPUs (nccl): every log_interval iterations, where the loop reads its losses
    and syncs with the device anyway, so the hot loop stays free of host syncs. Worst case: a
    signal waits log_interval iterations (100 in the MMGen config: well under a second on an H100).
Under torchrun, signal torchrun itself (it forwards SIGTERM/SIGINT to every worker and waits
--shutdown-timeout seconds, default 30, before SIGKILL). A signal sent to one worker alone also
stops every rank with a checkpoint, but torchrun counts the non-zero exit as a failure and, with
--max-restarts, restarts the workers, which resume from that checkpoint.

Ranks that die or stall (several processes only). Each rank runs a heartbeat thread that writes
(sequence number, iteration, phase, pid, host) to the rendezvous store every `interval` seconds
(dist_timeout_s / 20, 0.25 to 5 s) and reads the others'. When this rank's own loop has made no
progress for dist_timeout_s, it looks for the cause: a rank whose heartbeat stopped (dead or
frozen), else the rank furthest behind (stalled in data loading, its step, or its checkpoint);
if that is this rank, it says so. It prints one line naming the rank and what it was doing, and
exits; every rank does the same, so none is left running, within dist_timeout_s + interval. If
every rank waits at the same point (a network fault), no rank is to blame and torch's collective
timeout (dist_timeout_s + 60 s) ends the run. A rank that stops on an error tells the others
through the store, and their watchdogs stop at once naming it. A collective that fails because
a peer vanished (gloo reports it at once) is explained the same way by errors.main.

Outputs a run can live without (sample grids, log.jsonl, TensorBoard) go through `BestEffort`: a
failed write is warned about once and training goes on. Checkpoints are not optional: a failed
write stops the run (checkpoint.py says which file and why; earlier checkpoints stay intact).

Test hook: FASTGAN_TEST_STALL=RANK:ITERATION:SECONDS makes that rank sleep before loading that
iteration's batch (a stalled data loader), for the tests of the watchdog and of signals; not in a
group torchrun restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fastgan.errors import Interrupted, UserError, describe, one_line

clock = time.monotonic            # the tests replace it to make ckpt_minutes pass in an instant

SIGNALS = (signal.SIGTERM, signal.SIGINT)
LOADING, STEPPING, AFTER = 0, 1, 2
PHASES = {LOADING: "loading the batch of", STEPPING: "in the training step of",
          AFTER: "logging / sampling / checkpointing after"}
COLLECTIVE_MARGIN_S = 60          # torch's own collective timeout: dist_timeout_s + this (a backstop)


def collective_timeout(dist_timeout_s: float) -> timedelta:
    return timedelta(seconds=dist_timeout_s + COLLECTIVE_MARGIN_S)


# -- signals -----------------------------------------------------------------------------------

class _SignalState:
    """What the handlers share with the Guard; kept apart so the handlers can outlive a Guard
    (an exception out of the loop) and put the previous handlers back when it is collected."""

    def __init__(self, say_now: bool):
        self.signum = 0
        self.say_now = say_now
        self.previous: dict[int, object] = {}

    def handler(self, signum, frame):
        if self.signum:                                 # a handler left from an earlier one
            return
        self.signum = signum
        for sig in self.previous:                       # the second signal ends the process at once
            signal.signal(sig, signal.SIG_DFL)
        if self.say_now:                      # os.write: print() may be mid-write here
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: finishing this iteration, then writing a checkpoint and stopping "
                        f"(send {name} again to stop at once, without a checkpoint)\n".encode())

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue
            self.previous[sig] = current
            signal.signal(sig, self.handler)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self.previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self.previous.clear()


def _command() -> str:
    """How to run this again, for the line that says how to continue."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "the same torchrun command"
    return "the same command: " + shlex.join(["python", *sys.argv])


# -- the guard around the training loop --------------------------------------------------------

class Guard:
    """Signals, `ckpt_minutes`, the work_dir's existence and (several ranks) the watchdog, for
    one training loop. See the module docstring for the design."""

    def __init__(self, cfg, d, say, work_dir: str | Path):
        self.cfg, self.d, self.say = cfg, d, say
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
        if _monitor is not None:
            _monitor.watch(True)

    def watch(self, batches, start: int):
        """The loader's batches, marking (iteration, phase) for the watchdog."""
        it = start
        while True:
            it += 1
            _beat(it, LOADING)
            if self._stall and self._stall[0] == it:
                time.sleep(self._stall[1])
            batch = next(batches)
            _beat(it, STEPPING)
            yield batch

    def poll(self, done: int) -> str | None:
        """After iteration `done`: "signal" (checkpoint and stop), "time" (ckpt_minutes passed:
        checkpoint) or None. Every rank gets the same answer at the same iteration."""
        _beat(done, AFTER)
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
        if _monitor is not None:
            _monitor.watch(False)

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


# -- the heartbeat monitor (several ranks) -----------------------------------------------------

_monitor: Monitor | None = None


def _beat(iteration: int, phase: int) -> None:
    if _monitor is not None:
        _monitor.progress = (iteration, phase)
        _monitor.progress_time = clock()


class Monitor:
    """Heartbeats through the rendezvous store, a watchdog over the loop, and the others' last
    words. One per process, started by distrib.setup after the process group is up."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store, prefix: str, thread: bool = True):
        self.rank, self.world, self.timeout = rank, world_size, timeout_s
        self.interval = interval(timeout_s)
        self.store, self.prefix = store, prefix
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.seq = 0
        self.progress, self.progress_time = (0, AFTER), clock()
        self.watching = False
        self.seen: dict[int, dict] = {}       # rank -> last heartbeat
        self.alive: dict[int, float] = {}     # rank -> when its sequence number last moved
        self.moved: dict[int, float] = {}     # rank -> when its progress last moved
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.store_lost_since = None
        self._publish()
        self.thread = threading.Thread(target=self._run, name="fastgan-watchdog", daemon=True)
        if thread:
            self.thread.start()

    def watch(self, on: bool) -> None:
        self.progress_time = clock()
        self.watching = on

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2 * self.interval + 1)

    # the thread

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with self.lock:
                    self._publish()
                    self._read()
                self.store_lost_since = None
            except Exception as e:            # the store's host (torchrun's agent or rank 0) is gone
                self.store_lost_since = self.store_lost_since or clock()
                if self.watching and clock() - self.store_lost_since > self.timeout:
                    self._fire(f"lost the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                               f"{os.environ.get('MASTER_PORT')} for {self.timeout:.0f} s "
                               f"({type(e).__name__}): torchrun's agent or rank 0 is gone")
                continue
            if self.watching and not self.stop.is_set():
                verdict = self._verdict()
                if verdict:
                    self._fire(verdict)

    def _publish(self) -> None:
        self.seq += 1
        it, phase = self.progress
        self.store.set(self.prefix + f"hb/{self.rank}",
                       json.dumps({**self.me, "seq": self.seq, "it": it, "phase": phase}))

    def _read(self) -> None:
        now = clock()
        for r in range(self.world):
            if r == self.rank:
                continue
            key = self.prefix + f"hb/{r}"
            if not self.store.check([key]):
                self.alive.setdefault(r, now)
                self.moved.setdefault(r, now)
                continue
            hb = json.loads(self.store.get(key))
            old = self.seen.get(r)
            if old is None or hb["seq"] != old["seq"]:
                self.alive[r] = now
            if old is None or (hb["it"], hb["phase"]) != (old["it"], old["phase"]):
                self.moved[r] = now
            self.seen[r] = hb

    def last_words(self) -> dict[int, str]:
        """The error lines of ranks that stopped on an error."""
        out = {}
        for r in range(self.world):
            key = self.prefix + f"exit/{r}"
            if r != self.rank and self.store.check([key]):
                out[r] = self.store.get(key).decode()
        return out

    def _dead(self) -> list[int]:
        """Ranks whose heartbeat stopped: gone from this host, or silent for 3 intervals."""
        now, out = clock(), []
        for r, hb in self.seen.items():
            gone = hb["host"] == self.me["host"] and not _pid_alive(hb["pid"])
            if gone or now - self.alive.get(r, now) > 3 * self.interval:
                out.append(r)
        return sorted(out)

    def _who(self, r: int) -> str:
        hb = self.seen.get(r)
        return f"rank {r}" + (f" (pid {hb['pid']} on {hb['host']})" if hb else "")

    def _doing(self, progress) -> str:
        it, phase = progress
        return f"{PHASES[phase]} iteration {it}" if it else "before the first iteration"

    def _verdict(self) -> str | None:
        words = self.last_words()
        if words:
            r, line = sorted(words.items())[0]
            return f"{self._who(r)} stopped with: {line}"
        stuck = clock() - self.progress_time
        if stuck < self.timeout:
            return None
        mine = self.progress
        tail = f"(dist_timeout_s={self.timeout:g}); stopping this rank too"
        dead = self._dead()
        if dead:
            r = dead[0]
            hb = self.seen[r]
            return (f"{self._who(r)} died or froze: no heartbeat for {clock() - self.alive[r]:.0f} s, last "
                    f"{self._doing((hb['it'], hb['phase']))}; rank {self.rank} waited {stuck:.0f} s {tail}")
        behind = sorted((hb["it"], hb["phase"], r) for r, hb in self.seen.items() if (hb["it"], hb["phase"]) < mine)
        if behind:
            it, phase, r = behind[0]
            return (f"{self._who(r)} has been stuck {self._doing((it, phase))} for "
                    f"{clock() - self.moved[r]:.0f} s while rank {self.rank} waits for it {tail}")
        ahead = [r for r, hb in self.seen.items() if (hb["it"], hb["phase"]) > mine]
        if ahead and len(self.seen) == self.world - 1:
            return (f"this rank ({self.rank}, pid {self.me['pid']} on {self.me['host']}) has been stuck "
                    f"{self._doing(mine)} for {stuck:.0f} s while the other ranks wait for it "
                    f"(dist_timeout_s={self.timeout:g}); stopping")
        return None              # every rank waits at the same point: torch's collective timeout decides

    def _fire(self, verdict: str) -> None:
        from fastgan import errors
        errors.report(f"error: {verdict}")
        exit_now(1)

    # the main thread, after a collective failed

    def explain(self, error: BaseException) -> str:
        """Which rank made a collective fail: its last words, else the one whose heartbeat
        stops within a few intervals; else torch's message."""
        first = one_line(str(error))[:200]
        deadline = clock() + 4 * self.interval
        while True:
            try:
                with self.lock:
                    self._read()
                    words = self.last_words()
            except Exception:
                return f"lost contact with the other ranks and the rendezvous store ({first})"
            if words:
                r, line = sorted(words.items())[0]
                return f"{self._who(r)} stopped with: {line}"
            dead = self._dead()
            if dead:
                r = dead[0]
                hb = self.seen[r]
                return (f"{self._who(r)} is gone (killed or crashed; last seen {self._doing((hb['it'], hb['phase']))}"
                        f"), so rank {self.rank} stops too ({first})")
            if clock() > deadline:
                return f"a collective operation failed on rank {self.rank} ({first})"
            time.sleep(self.interval / 4)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a twentieth of the timeout, 0.25 to 5 s."""
    return min(5.0, max(0.25, timeout_s / 20))


def start_monitor(rank: int, world_size: int, timeout_s: float) -> None:
    """Heartbeats for this process (several ranks, after init_process_group): a client of the
    rendezvous store of its own (torchrun's agent hosts it; rank 0 without torchrun), keys under
    the run id and restart count so a restarted group does not read its predecessor's."""
    global _monitor
    if world_size < 2 or _monitor is not None or "MASTER_ADDR" not in os.environ:
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                          timeout=timedelta(seconds=max(10.0, 2 * interval(timeout_s))))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _monitor = Monitor(rank, world_size, timeout_s, store,
                       prefix=f"fastgan/{os.environ.get('TORCHELASTIC_RUN_ID', port)}/{attempt}/")


def stop_monitor() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.close()
        _monitor = None


def tell_others(line: str) -> None:
    """Leave this rank's error line where the other ranks' watchdogs read it."""
    if _monitor is None:
        return
    try:
        _monitor.store.set(_monitor.prefix + f"exit/{_monitor.rank}", line)
    except Exception:           # the store may be what failed
        pass


def _distributed_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "ProcessGroup", "Connection"))


def explain(e: BaseException) -> str | None:
    """A one-line account of a failed collective (which rank, what happened), or None when `e`
    is not one."""
    if not _distributed_error(e) or not (dist.is_available() and dist.is_initialized()):
        return None
    if _monitor is None:
        return f"a collective operation failed: another process of this run stopped ({one_line(str(e))[:200]})"
    return _monitor.explain(e)


def exit_now(code: int) -> None:
    """Leave without tearing down a process group that may hang (a dead peer's NCCL communicator)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
