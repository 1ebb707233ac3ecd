"""The rank watchdog: heartbeats through the rendezvous store, for runs of several processes.

Each rank runs a thread that writes (sequence number, iteration, phase, pid, host) to the
rendezvous store every `interval` seconds (dist_timeout_s / 20, 0.25 to 5 s) and reads the
others'. When this rank's own loop has made no progress for dist_timeout_s, it looks for the
cause: a rank whose heartbeat stopped (dead or frozen), else the rank furthest behind (stuck
loading a batch, in its step, or writing a checkpoint); if that is this rank, it says so. It
prints one line naming the rank and what it was doing, and exits; every rank does the same, so
none is left running, within dist_timeout_s + interval. If every rank waits at the same point (a
network fault), no rank is to blame and torch's collective timeout (dist_timeout_s + 60 s) ends
the run. A rank that stops on an error leaves its line in the store (errors.report), and the
others' watchdogs stop within an interval, quoting it: in set-up and after the loop too, where
stalls are not judged (a rank that fails in set-up would otherwise leave the others waiting in a
collective for dist_timeout_s + 60 s). A collective that fails because a peer vanished (gloo says
so at once) is explained by `explain`, which errors.main calls: the rank that left last words,
else the one whose heartbeat stops within a few intervals.

The store client is its own (torchrun's agent hosts the store; rank 0 does without torchrun), its
keys under the run id and restart count, so a restarted group never reads its predecessor's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from fastgan.errors import first_line

clock = time.monotonic            # the tests drive it by hand

LOADING, STEPPING, AFTER = 0, 1, 2
PHASES = {LOADING: "loading the batch of", STEPPING: "in the training step of",
          AFTER: "logging / sampling / checkpointing after"}
COLLECTIVE_MARGIN_S = 60          # torch's own collective timeout: dist_timeout_s + this (a backstop)


def collective_timeout(dist_timeout_s: float) -> timedelta:
    return timedelta(seconds=dist_timeout_s + COLLECTIVE_MARGIN_S)


_monitor: Monitor | None = None


def beat(iteration: int, phase: int) -> None:
    """The training loop's progress on this rank (two attribute writes; published by the thread)."""
    if _monitor is not None:
        _monitor.progress = (iteration, phase)
        _monitor.progress_time = clock()


def watch(on: bool) -> None:
    """Judge stalls only while the loop runs (setup and the final samples may take long); other
    ranks' error lines stop this one at any time."""
    if _monitor is not None:
        _monitor.watch(on)


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
            self._tick()

    def _tick(self) -> None:
        """One heartbeat: publish ours, read the others', and stop this rank on another's error
        (any time) or on a stall (only while watching)."""
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
            return
        if not self.stop.is_set():
            verdict = self._verdict(stalls=self.watching)
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

    def _verdict(self, stalls: bool = True) -> str | None:
        """Why this rank should stop: another rank's error line, else (with `stalls`) a stall."""
        words = self.last_words()
        if words:
            r, line = sorted(words.items())[0]
            return f"{self._who(r)} stopped with: {line}"
        if not stalls:
            return None
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
        first = first_line(error)
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
    try:
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=max(10.0, 2 * interval(timeout_s))))
    except Exception as e:    # training works without it; only a dead or stuck rank goes unnamed
        print(f"warning: no rank watchdog ({first_line(e)})", file=sys.stderr)
        return
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
    if not _distributed_error(e) or not group_up():
        return None
    if _monitor is None:
        return f"a collective operation failed: another process of this run stopped ({first_line(e)})"
    return _monitor.explain(e)


def group_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def exit_now(code: int) -> None:
    """Leave without tearing down a process group that may hang (a dead peer's NCCL communicator)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
