"""torchrun / DDP setup: RANK, LOCAL_RANK, WORLD_SIZE from the environment; nccl on GPU, gloo on CPU.

A plain `python fastgan/train.py` is one process and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
        raise SystemExit(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str | None = None) -> Dist:
    """Read torchrun's environment, pick this process's device, join the process group."""
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device=cuda, but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
        local_world = _env_int("LOCAL_WORLD_SIZE", 1)
        if local_world > 1:   # processes on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    else:
        raise SystemExit(f"device must be cpu or cuda, got {kind!r}")
    d = Dist(rank, local_rank, world_size, dev)
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    return d


def cleanup() -> None:
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
