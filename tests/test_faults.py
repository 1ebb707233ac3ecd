"""Faults: SIGINT/SIGTERM stop with a checkpoint and resume exactly, a second SIGINT stops at once,
ckpt_minutes, a full / read-only / deleted work_dir, the rank watchdog's verdicts, and a stalled
rank (two real processes). Tiny runs (tests/runs.py).

The torchrun tests (a killed worker restarted, a 2-node rendezvous) are in test_faults_torchrun.py;
one-line errors for a user's mistakes, and the README's fault table, in test_errors.py.
"""

import errno
import gc
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastgan import checkpoint as ck
from fastgan import faults, watchdog
from fastgan import train as train_mod
from fastgan.distrib import Dist
from fastgan.train import train
from runs import (QUICKSTART, TRAIN, assert_same_state, dispositions, free_port, logged, losses, run_main, run_script,
                  start, tiny, tiny_args, wait_for)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return tiny_args(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _collect():
    """Run the finalizers of loops that ended in an exception: their signal handlers go."""
    yield
    gc.collect()


# -- signals -------------------------------------------------------------------------------------

def test_sigterm_stops_with_a_checkpoint_and_the_same_command_resumes_exactly(tmp_path, data_args):
    """SIGTERM while the run is inside iteration 3 (a 4 s stall before its batch): it stops after
    that iteration with a checkpoint, status 143 and the command to run; the same command then
    finishes. Losses and final weights equal an uninterrupted run's (one thread on both sides)."""
    extra = ["--total_iters=6", "--ckpt_interval=100", "--sample_interval=100", "--ckpt_minutes=0",
             f"--seed={int(torch.randint(0, 1000, ()))}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # the children's OMP_NUM_THREADS: CPU sums may split by thread
    try:
        train(tiny(tmp_path / "ref", data_args, *extra), Dist())
    finally:
        torch.set_num_threads(threads)
    work = tmp_path / "run"
    args = [QUICKSTART, f"--work_dir={work}", *data_args, *extra]
    proc = start(args, tmp_path, env={"FASTGAN_TEST_STALL": "0:3:4", "OMP_NUM_THREADS": "1"})
    wait_for(logged(work, 2), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.files[1].read_text()
    line = next(x for x in err.splitlines() if x.startswith("interrupted"))
    stop = int(line.split(" at iteration ")[1].split("/")[0])
    assert 3 <= stop < 6 and f"saved {work / 'ckpt' / f'iter_{stop}.pt'}" in line
    assert line.endswith("run the same command: python " + " ".join([TRAIN, *map(str, args)]))
    assert "SIGTERM: finishing this iteration" in err and "Traceback" not in err
    assert [n for n, _ in ck.list_checkpoints(work / "ckpt")] == [stop]
    out = run_script(*args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert f"resumed from {work / 'ckpt' / f'iter_{stop}.pt'} at iteration {stop}" in out.stdout
    assert losses(work) == losses(tmp_path / "ref") and [x[0] for x in losses(work)] == list(range(1, 7))
    assert_same_state(work / "ckpt" / "iter_6.pt", tmp_path / "ref" / "ckpt" / "iter_6.pt")


def test_sigint_stops_with_status_130(tmp_path, data_args, monkeypatch, capsys):
    """A real SIGINT to this process after iteration 2's checkpoint: the run stops after
    iteration 3 with its checkpoint and exit status 130, and the previous handler is back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)     # not ignored, whatever ran pytest
    try:
        after_checkpoint(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        code, out, err = run_main([QUICKSTART, f"--work_dir={tmp_path}", *data_args, "--total_iters=6",
                                   "--ckpt_interval=2", "--sample_interval=100"], capsys)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 130 and len(err) == 1
    assert err[0].startswith(f"interrupted by SIGINT at iteration 3/6: saved {tmp_path / 'ckpt' / 'iter_3.pt'}. "
                             "To continue from there, run the same command: python ")
    assert [n for n, _ in ck.list_checkpoints(tmp_path / "ckpt")] == [3, 2]
    assert "iter 3/6" in out and "iter 4/6" not in out


def test_signal_in_the_last_iteration_finishes_the_run(tmp_path, data_args, monkeypatch, capsys):
    """A SIGINT that arrives during the last iteration: the run is complete, so it finishes as
    usual (the last checkpoint, generator.safetensors, status 0), not as an interrupted one."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)     # not ignored, whatever ran pytest
    try:
        after_checkpoint(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        code, out, err = run_main([QUICKSTART, f"--work_dir={tmp_path}", *data_args, "--total_iters=3",
                                   "--ckpt_interval=2", "--sample_interval=100"], capsys)
    finally:
        signal.signal(signal.SIGINT, before)
    assert code == 0 and err == [] and f"done: {tmp_path / 'generator.safetensors'}" in out
    assert [n for n, _ in ck.list_checkpoints(tmp_path / "ckpt")] == [3, 2]
    assert (tmp_path / "generator.safetensors").is_file() and (tmp_path / "training_samples" / "iter_3.png").is_file()


def test_second_sigint_stops_at_once_and_keeps_checkpoints(tmp_path, data_args):
    """The first SIGINT waits for an iteration stuck for minutes; a SIGTERM then is ignored; a
    second SIGINT ends the process at once, leaving the checkpoints as they were."""
    work = tmp_path / "run"
    args = [QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=10", "--ckpt_interval=2",
            "--sample_interval=100"]
    proc = start(args, tmp_path, env={"FASTGAN_TEST_STALL": "0:3:300"})       # stuck in iteration 3
    wait_for(lambda: (work / "ckpt" / "iter_2.pt").is_file() and logged(work, 2)(), proc)
    good = (work / "ckpt" / "iter_2.pt").read_bytes()
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: finishing this iteration" in proc.files[1].read_text(), proc, timeout=30)
    # SIGTERM is ignored now (schedulers and torchrun may both send one): the kernel drops an ignored
    # signal when it is sent, so the disposition says it all; SIGINT is back to its default action.
    assert dispositions(proc.pid) == {"SIGTERM": "ignored", "SIGINT": "default"}
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT     # a second Ctrl-C ends it at once (not the SIGTERM)
    assert [n for n, _ in ck.list_checkpoints(work / "ckpt")] == [2]
    assert (work / "ckpt" / "iter_2.pt").read_bytes() == good and not list((work / "ckpt").glob("*.tmp"))


def test_forked_children_keep_the_default_sigterm():
    """Handlers a loop left behind (an exception ended it) must not reach a forked worker pool:
    Pool.terminate() sends SIGTERM and waits for the workers to die."""
    import multiprocessing
    before = signal.getsignal(signal.SIGTERM)
    left = faults._SignalState(say_now=False)
    left.install()
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply(os.getpid) != os.getpid()
            pool.terminate()
            pool.join()           # hangs if the worker's SIGTERM only set a flag
        again = faults._SignalState(say_now=False)
        again.install()           # the next loop puts the leftovers' predecessors back first
        assert signal.getsignal(signal.SIGTERM) == again.handler and again.previous[signal.SIGTERM] == before
        again.restore()
    finally:
        left.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_ckpt_minutes(tmp_path, data_args, monkeypatch, capsys):
    """A clock that advances 25 s per reading: with ckpt_minutes=1, a checkpoint every third
    iteration; each timed one is removed when the next checkpoint is written. (ckpt_minutes=0
    writes none: test_sigterm_stops_with_a_checkpoint_and_the_same_command_resumes_exactly.)"""
    now = iter(range(0, 10_000, 25))
    monkeypatch.setattr(faults, "clock", lambda: next(now))
    train(tiny(tmp_path / "a", data_args, "--total_iters=8", "--ckpt_interval=100", "--sample_interval=100",
               "--ckpt_minutes=1"), Dist())
    saved = [line.rsplit("iter_", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("saved")]
    assert saved == ["3.pt", "6.pt", "8.pt"]
    assert [n for n, _ in ck.list_checkpoints(tmp_path / "a" / "ckpt")] == [8]


def test_timed_checkpoints_take_no_place_of_keep_ckpts(tmp_path, data_args, monkeypatch, capsys):
    """The same clock with ckpt_interval=4 and keep_ckpts=2: timed ones at 3 and 7, regular ones at
    4 and 8. Each timed one goes when the next is written, and keep_ckpts counts the regular ones."""
    now = iter(range(0, 10_000, 25))
    monkeypatch.setattr(faults, "clock", lambda: next(now))
    train(tiny(tmp_path / "a", data_args, "--total_iters=8", "--ckpt_interval=4", "--sample_interval=100",
               "--keep_ckpts=2", "--ckpt_minutes=1"), Dist())
    saved = [line.rsplit("iter_", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("saved")]
    assert saved == ["3.pt", "4.pt", "7.pt", "8.pt"]
    assert [n for n, _ in ck.list_checkpoints(tmp_path / "a" / "ckpt")] == [8, 4]


# -- a full, read-only or deleted work_dir -------------------------------------------------------

def after_checkpoint(monkeypatch, at, fault):
    """Run `fault()` right after the checkpoint of iteration `at` is written."""
    save = train_mod.Run.save_checkpoint

    def wrapped(run, iteration, path=None):
        out = save(run, iteration, path)
        if iteration == at:
            fault()
        return out
    monkeypatch.setattr(train_mod.Run, "save_checkpoint", wrapped)


class FailingWriter:
    """torch.utils.tensorboard.SummaryWriter on a full disk (tensorboard is not a test dependency)."""

    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    add_image = add_scalar

    def close(self):
        pass


def check_disk_fault(work, code, out, err, reason, log_warning=True):
    """The checkpoint at 4 fails: one error line naming it; each optional output warned about once."""
    assert code == 1
    assert err == [f"error: cannot write {work / 'ckpt' / 'iter_4.pt'}: {reason}; the checkpoints "
                                "written before are intact: free space or fix the folder, then run the same "
                                "command to continue from the newest"]
    assert out.count("warning: cannot write sample grids") == 1        # iterations 3 and 4 both failed
    if log_warning:
        assert out.count(f"warning: cannot write {work / 'log.jsonl'}") == 1
    found = ck.load_latest(work / "ckpt")
    assert found[0] == work / "ckpt" / "iter_2.pt" and found[1]["iteration"] == 2
    assert not list((work / "ckpt").glob("*.tmp")) and not list((work / "training_samples").glob("*.tmp"))


def test_disk_full_injected(tmp_path, data_args, monkeypatch, capsys):
    """From iteration 3 on, writes get the kernel's ENOSPC (files turned into links to /dev/full)."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("no /dev/full device")
    import types
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FailingWriter))
    work = tmp_path / "run"

    def fill():
        for path in [work / "log.jsonl", work / "ckpt" / "iter_4.pt.tmp",
                     *(work / "training_samples" / f"iter_{i}.png.tmp" for i in (3, 4))]:
            path.unlink(missing_ok=True)
            path.symlink_to("/dev/full")
    after_checkpoint(monkeypatch, 2, fill)
    code, out, err = run_main([QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=4",
                               "--ckpt_interval=2", "--sample_interval=1"], capsys)
    check_disk_fault(work, code, out, err, "No space left on device")
    assert out.count("warning: cannot write TensorBoard events") == 1     # it failed from iteration 1
    assert "iter 4/4" in out                                              # training went on


@pytest.fixture
def tmpfs(tmp_path):
    """A real 8 MiB filesystem (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_disk_fault_on_a_real_filesystem(tmpfs, data_args, monkeypatch, capsys, fault):
    """After the checkpoint at 2 the tmpfs fills up (or is remounted read-only); the next
    checkpoint stops the run, iter_2.pt loads, and once there is room the same run resumes."""
    work = tmpfs / "run"
    filler = tmpfs / "filler"

    def fill():
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=30)
            return
        with open(filler, "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
    after_checkpoint(monkeypatch, 2, fill)
    args = [QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=4", "--ckpt_interval=2", "--sample_interval=1"]
    code, out, err = run_main(args, capsys)
    # tmpfs appends into a file's last page without allocating: log.jsonl may still fit when full
    check_disk_fault(work, code, out, err, "Read-only file system" if fault == "read-only" else "No space left on device",
                     log_warning=fault == "read-only")
    monkeypatch.undo()
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True, timeout=30)
    else:
        filler.unlink()
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert f"resumed from {work / 'ckpt' / 'iter_2.pt'} at iteration 2" in out
    assert ck.load(work / "ckpt" / "iter_4.pt")["iteration"] == 4


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_full_disk_while_building_the_data_cache(tmp_path, data_args, monkeypatch, how, request):
    """The decoded cache's space is reserved before decoding: a full disk is one line, not a
    SIGBUS through the memory map halfway through."""
    from fastgan.data import DataError, build_loader
    if how == "tmpfs":
        cache_dir = request.getfixturevalue("tmpfs")
        with open(cache_dir / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
    else:
        cache_dir = tmp_path / "cache"

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "posix_fallocate", full)
    cfg = tiny(tmp_path / "run", data_args, f"--data.cache_dir={cache_dir}")
    with pytest.raises(DataError, match=r"cannot make room for the decoded images \(0 MiB\) in .*No space left on "
                                        r"device.*--data.cache=off"):
        build_loader(cfg, log=lambda m: None)
    assert not [p for p in Path(cache_dir).iterdir() if p.name != "filler"]     # no half-built cache


def test_real_grid_that_cannot_be_written_is_a_warning(tmp_path, data_args, capsys):
    """real.png is optional like the sample grids: a write that fails warns once, training goes on."""
    work = tmp_path / "run"
    (work / "training_samples" / "real.png.tmp").mkdir(parents=True)     # where its temp file would go
    code, out, err = run_main([QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=2",
                               "--ckpt_interval=2", "--sample_interval=1"], capsys)
    assert code == 0 and err == []
    assert out.count(f"warning: cannot write {work / 'training_samples' / 'real.png'}") == 1
    assert not (work / "training_samples" / "real.png").exists()
    assert (work / "training_samples" / "iter_2.png").is_file() and (work / "generator.safetensors").is_file()


def test_deleted_work_dir_stops_the_run(tmp_path, data_args, monkeypatch, capsys):
    import shutil
    work = tmp_path / "run"
    after_checkpoint(monkeypatch, 2, lambda: shutil.rmtree(work))
    code, out, err = run_main([QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=4",
                               "--ckpt_interval=2", "--sample_interval=1"], capsys)
    assert code == 1 and err == [
        f"error: work_dir {work} was deleted, moved or unmounted while training (noticed after iteration 3): "
        "nothing more can be saved there, so the run stops. Put it back to continue from its newest "
        "checkpoint, or start again"]
    assert not work.exists()          # nothing wrote a new, half-empty work_dir in its place


# -- the rank watchdog ---------------------------------------------------------------------------

@pytest.fixture
def two_monitors(monkeypatch):
    """Ranks 0 and 1 of a 2-rank run sharing one in-memory store, on a hand-driven clock."""
    t = [1000.0]
    monkeypatch.setattr(watchdog, "clock", lambda: t[0])
    store = dist.HashStore()
    ms = [watchdog.Monitor(r, 2, 10.0, store, prefix="test/", thread=False) for r in range(2)]

    def tick(seconds, *alive):
        """Advance the clock in heartbeat steps; the ranks in `alive` publish at each."""
        for _ in range(int(seconds / ms[0].interval)):
            t[0] += ms[0].interval
            for m in ms:
                if m.rank in alive:
                    m._publish()
                m._read()
    return ms, tick


def test_watchdog_names_the_rank_that_is_behind(two_monitors):
    (m0, m1), tick = two_monitors
    m0.progress, m1.progress = (3, watchdog.STEPPING), (3, watchdog.LOADING)      # rank 1 stuck loading
    m0.progress_time = m1.progress_time = watchdog.clock()
    tick(5, 0, 1)
    assert m0._verdict() is None and m1._verdict() is None                   # not yet dist_timeout_s
    tick(6, 0, 1)
    assert m0._verdict().startswith(f"rank 1 (pid {os.getpid()} on {socket.gethostname()}) has been stuck "
                                    "loading the batch of iteration 3 for ")
    assert "s while rank 0 waits for it (dist_timeout_s=10)" in m0._verdict()
    assert m1._verdict().startswith("this rank (1, pid ") and "loading the batch of iteration 3" in m1._verdict()


def test_watchdog_names_a_dead_rank_and_ignores_a_shared_wait(two_monitors):
    (m0, m1), tick = two_monitors
    m0.progress = m1.progress = (7, watchdog.STEPPING)
    m0.progress_time = m1.progress_time = watchdog.clock()
    tick(20, 0, 1)
    assert m0._verdict() is None                # both wait at the same point: torch's timeout decides
    tick(11, 0)                                 # rank 1's heartbeat stops
    assert m0._verdict().startswith("rank 1 (pid ") and "died or froze: no heartbeat for 1" in m0._verdict()
    m1.store.set("test/exit/1", "error: out of GPU memory")      # what errors.report leaves
    assert m0._verdict().endswith("stopped with: error: out of GPU memory")
    assert m0.explain(RuntimeError("gloo: Connection reset by peer")).endswith("stopped with: error: out of GPU memory")


def test_watchdog_quotes_another_rank_error_during_set_up(two_monitors, monkeypatch):
    """Before the loop (watching off) stalls are not judged, but a rank that failed in set-up
    stops the others at the next heartbeat instead of after dist_timeout_s + 60 s."""
    (m0, m1), tick = two_monitors
    fired = []
    monkeypatch.setattr(m0, "_fire", fired.append)
    assert not m0.watching
    tick(30, 0)                                  # rank 1 silent for 3 timeouts: no verdict in set-up
    m0._tick()
    assert fired == []
    m1.store.set("test/exit/1", "error: work_dir '/x' cannot be written")      # what errors.report leaves
    m0._tick()
    assert fired == [f"rank 1 (pid {os.getpid()} on {socket.gethostname()}) stopped with: "
                     "error: work_dir '/x' cannot be written"]


# -- a stalled rank, two real processes ------------------------------------------------------------


def test_stalled_rank_stops_every_rank(tmp_path, data_args):
    """Rank 1 sleeps 10 min before iteration 3's batch; with dist_timeout_s=5 both ranks stop by
    themselves (no torchrun to kill them), rank 0 naming rank 1 and what it was doing."""
    port = free_port()
    args = [QUICKSTART, f"--work_dir={tmp_path / 'run'}", *data_args, "--total_iters=20", "--sample_interval=100",
            "--dist_timeout_s=5"]
    procs = [start(args, tmp_path, name=f"rank{r}",
                   env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
                        "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                        "FASTGAN_TEST_STALL": "1:3:600"}) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errs = [p.files[1].read_text() for p in procs]
    assert codes == [1, 1], errs
    line0 = [x for x in errs[0].splitlines() if x.startswith("rank 0: error:")]
    assert len(line0) == 1 and "rank 1 (pid " in line0[0] and "loading the batch of iteration 3" in line0[0], errs[0]
    assert any(x.startswith("rank 1: error:") for x in errs[1].splitlines()), errs[1]
    assert "Traceback" not in errs[0] + errs[1]
