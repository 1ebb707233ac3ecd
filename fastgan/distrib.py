"""torchrun / DDP setup: RANK, LOCAL_RANK, WORLD_SIZE from the environment; nccl on GPU, gloo on CPU.

A plain `python fastgan/train.py` is one process and never touches torch.distributed.
Settings that cannot work (RANK outside WORLD_SIZE, more processes than GPUs, no MASTER_ADDR, a
rendezvous nobody else joins) are UserErrors that say what to change. With several processes,
fastgan.watchdog watches the other ranks (heartbeats, dist_timeout_s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastgan.errors import UserError, first_line


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Only the main process (rank 0) prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def check_env(rank: int, local_rank: int, world_size: int, local_world: int) -> None:
    """The launcher's variables agree with each other (torchrun sets them all consistently;
    a hand-written launch or a leftover WORLD_SIZE may not)."""
    launch = "launch the processes with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
    if world_size < 1:
        raise UserError(f"WORLD_SIZE={world_size}: must be at least 1")
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size} (ranks run 0..{world_size - 1}): {launch}")
    if world_size > 1 and "RANK" not in os.environ:
        raise UserError(f"WORLD_SIZE={world_size} but RANK is not set: {launch}, or unset WORLD_SIZE")
    if not 0 <= local_rank < local_world or local_world > world_size:
        raise UserError(f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world} and WORLD_SIZE={world_size} "
                        f"do not fit together (0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE): {launch}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world_size > 1 and not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} needs {' and '.join(missing)}: {launch}")


def setup(device: str | None = None, timeout_s: float = 600.0) -> Dist:
    """Read torchrun's environment, pick this process's device, join the process group.
    timeout_s: config dist_timeout_s (fastgan.watchdog)."""
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    check_env(rank, local_rank, world_size, _env_int("LOCAL_WORLD_SIZE", world_size if "LOCAL_RANK" in os.environ else 1))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA (a CPU wheel)" if torch.version.cuda is None
                   else "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
            raise UserError(f"--device=cuda, but no CUDA device is visible: {why}; or use --device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                            f"use torchrun --nproc_per_node={torch.cuda.device_count()} (one process per GPU)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
        local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        if local_world > 1:   # processes on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        raise UserError(f"device must be cpu or cuda, got {kind!r}")
    d = Dist(rank, local_rank, world_size, dev)
    if d.enabled and not dist.is_initialized():
        from fastgan import watchdog
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = watchdog.collective_timeout(timeout_s)
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    device_id=dev if dev.type == "cuda" else None, **_restart_store(timeout))
        except (dist.DistError, RuntimeError, ValueError) as e:
            raise UserError(f"rank {rank} of {world_size} could not join the others through "
                            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                            f"{timeout.total_seconds():.0f} s ({first_line(e)}): start all {world_size} "
                            "processes (torchrun on every node, with the same --nnodes and --rdzv_endpoint)") from None
        watchdog.start_monitor(rank, world_size, timeout_s)
    return d


def _restart_store(timeout) -> dict:
    """torchrun's agent keeps one store across --max-restarts, and the keys gloo and nccl use to
    swap addresses carry no attempt number: a restarted group reads its predecessor's addresses
    and fails with "Connection refused" (torch 2.13). A prefix per attempt keeps them apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"fastgan/attempt_{attempt}", store)}


def cleanup() -> None:
    from fastgan import watchdog
    watchdog.stop_monitor()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_buffers(d: Dist, *modules: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank: DDP runs with
    broadcast_buffers=False, so each rank's statistics drift apart between syncs."""
    if not d.enabled:
        return
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b, src=0)


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is left alone)."""
    t = t.clone()
    if d.enabled:
        dist.all_reduce(t)
    return t


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out
