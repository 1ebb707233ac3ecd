"""torchrun on CPUs (gloo): a worker killed with -9 is restarted by torchrun (--max-restarts) and
training resumes from the newest checkpoint by itself; a 2-node rendezvous (two torchrun
invocations, c10d on 127.0.0.1) stops on a SIGTERM to one node's torchrun, every rank at the same
iteration with one checkpoint, and the same two commands resume it.

The most expensive tests of the suite (each torchrun starts an agent and its workers); tiny runs.
"""

import os
import signal
import sys
from pathlib import Path

import pytest

from fastgan import checkpoint as ck
from runs import QUICKSTART, TRAIN, free_port, logged, losses, start, tiny_args, wait_for

RUN = (sys.executable, "-m", "torch.distributed.run")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return tiny_args(tmp_path_factory.mktemp("data"))


def workers(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    found = {}
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(pid)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def finish(*procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_killed_worker_is_restarted_and_resumes(tmp_path, data_args):
    """Rank 1 is held before iteration 6 (a test hook, first attempt only) and killed with -9;
    torchrun restarts both workers, which resume from iter_4.pt and finish. Iteration 5, trained
    before and after the restart, has the same losses: the resume is exact."""
    work = tmp_path / "run"
    proc = start(["--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.2", TRAIN,
                  QUICKSTART, f"--work_dir={work}", *data_args, "--total_iters=8", "--ckpt_interval=4",
                  "--sample_interval=100", "--ckpt_minutes=0"], tmp_path,
                 {**ONE_THREAD, "FASTGAN_TEST_STALL": "1:6:600"}, "torchrun", prefix=RUN)
    wait_for(lambda: (work / "ckpt" / "iter_4.pt").is_file() and logged(work, 5)(), proc)
    first = workers(proc.pid)
    os.kill(first[1], signal.SIGKILL)
    assert finish(proc) == [0], proc.files[1].read_text()[-3000:]
    out, err = (f.read_text() for f in proc.files)
    assert f"resumed from {work / 'ckpt' / 'iter_4.pt'} at iteration 4" in out
    said = [x for x in err.splitlines() if x.startswith("rank 0: error: rank 1 (pid ")]
    assert len(said) == 1 and f"rank 1 (pid {first[1]} " in said[0] and " is gone (killed or crashed" in said[0], err
    assert "forcefully exiting via" not in err              # rank 0 left by itself, no SIGKILL needed
    fifth = [x for x in losses(work) if x[0] == 5]
    assert len(fifth) == 2 and fifth[0] == fifth[1]
    assert [x[0] for x in losses(work)] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert ck.load(work / "ckpt" / "iter_8.pt")["world_size"] == 2
    assert not any(alive(pid) for pid in first.values())


def test_two_nodes_stop_together_on_sigterm_and_resume(tmp_path, data_args):
    """Two torchrun invocations (--nnodes=2, c10d rendezvous on 127.0.0.1), checkpointing every
    iteration by the clock (ckpt_minutes, agreed between the nodes). Rank 0 is held in iteration 3
    while one node's torchrun gets SIGTERM: both ranks stop after the same iteration with one
    checkpoint (exit 143), and the same two commands resume and finish."""
    port = free_port()
    work = tmp_path / "run"
    cmd = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
           "--rdzv_id=fastgan-test", "--max-restarts=0", TRAIN, QUICKSTART, f"--work_dir={work}", *data_args,
           "--total_iters=6", "--ckpt_interval=100", "--sample_interval=100", "--ckpt_minutes=0.0001"]
    stall = {"FASTGAN_TEST_STALL": "0:3:4"}
    nodes = [start(cmd, tmp_path, {**ONE_THREAD, **stall}, f"node{i}", prefix=RUN) for i in range(2)]
    wait_for(logged(work, 2), nodes[0])
    nodes[1].send_signal(signal.SIGTERM)
    codes = finish(*nodes)
    errs = [n.files[1].read_text() for n in nodes]
    said = sorted(x for e in errs for x in e.splitlines()       # torchrun's failure report quotes them too
                  if x.startswith("rank ") and " interrupted by SIGTERM at iteration " in x)
    assert len(said) == 2 and said[0].startswith("rank 0: ") and said[1].startswith("rank 1: "), errs
    stop = {int(x.split(" at iteration ")[1].split("/")[0]) for x in said}
    assert len(stop) == 1 and 3 <= min(stop) < 6, said                    # the same iteration on both
    stop = stop.pop()
    assert codes[0] != 0 and codes[1] != 0 and any("exitcode  : 143" in e for e in errs), errs
    assert ck.list_checkpoints(work / "ckpt")[0][0] == stop
    assert ck.load(work / "ckpt" / f"iter_{stop}.pt")["world_size"] == 2
    nodes = [start(cmd, tmp_path, ONE_THREAD, f"again{i}", prefix=RUN) for i in range(2)]
    assert finish(*nodes) == [0, 0], [n.files[1].read_text()[-3000:] for n in nodes]
    out = "".join(n.files[0].read_text() for n in nodes)
    assert f"resumed from {work / 'ckpt' / f'iter_{stop}.pt'} at iteration {stop}" in out
    assert [x[0] for x in losses(work)] == list(range(1, 7))
    assert [n for n, _ in ck.list_checkpoints(work / "ckpt")] == [6, stop]   # timed ones make way
