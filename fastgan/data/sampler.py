"""The batch order, and the loader that serves batches from decoded images in memory.

The order is a pure function of (number of images, seed, rank, world size, batch size, flip):
epoch e shuffles all images with a generator seeded by (seed, e), rank r takes the slice
[n*r//W, n*(r+1)//W) of that permutation (DALI's own shard formula, so fn.readers.file with
shard_id=r, num_shards=W reads the same files) and cuts it into batches_per_epoch = (n//W)//B
batches; the rest of the slice waits for the next epoch. With flip on, the same generator draws
one coin per image and position. So iteration k is always the same batch: resuming with
start_iter=k continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .sources import DataError
from .transforms import normalize


class Schedule:
    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, flip: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        per_rank = num_images // world_size
        if per_rank < batch_size:
            fits = 1 << (max(per_rank, 1).bit_length() - 1)       # the largest power of two that fits
            fix = f"use --batch_size={fits} (at most {per_rank}) or add images" if per_rank else "add images"
            raise DataError(f"{num_images} usable images give {per_rank} per rank over {world_size} "
                            f"rank(s): fewer than one batch of {batch_size}; {fix}")
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size, self.flip = rank, world_size, flip
        self.batches_per_epoch = per_rank // batch_size

    def shard(self, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of `rank`'s slice of every epoch's permutation."""
        r = self.rank if rank is None else rank
        n, w = self.num_images, self.world_size
        return n * r // w, n * (r + 1) // w

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole epoch e: a permutation of all images and, with flip on, a coin per position."""
        rng = np.random.default_rng([self.seed % 2**64, e])
        perm = rng.permutation(self.num_images)
        return perm, (rng.random(self.num_images) < 0.5) if self.flip else None

    def rank_epoch(self, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's images of epoch e in order (batches_per_epoch * batch_size), and flips."""
        perm, flips = self.epoch(e)
        start = self.shard()[0]
        stop = start + self.batches_per_epoch * self.batch_size
        return perm[start:stop], None if flips is None else flips[start:stop]

    def position(self, start_iter: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of iteration start_iter."""
        return divmod(start_iter, self.batches_per_epoch)


class Loader:
    """What build_loader returns: `name`, `num_images`, `batches_per_epoch`, and iteration that
    yields (batch_size, C, R, R) batches in [-1, 1] on `device` forever."""

    name = "loader"

    def __init__(self, schedule: Schedule, device: torch.device, start_iter: int = 0,
                 dtype: torch.dtype = torch.float32):
        self.schedule, self.device, self.start_iter, self.dtype = schedule, torch.device(device), start_iter, dtype
        self.num_images = schedule.num_images
        self.batches_per_epoch = schedule.batches_per_epoch
        self.skipped: list[tuple[str, str]] = []   # (file, reason) for every unusable file

    def __iter__(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __repr__(self):
        return f"<{self.name}: {self.num_images} images, {self.batches_per_epoch} batches per epoch>"


class ArrayLoader(Loader):
    """Batches from decoded uint8 images (N, C, R, R) held in host or GPU memory.

    `rows` maps image number -> row of `images` (a cache may hold rows that failed to decode).
    Per batch: one index_select (on the GPU when the images live there), the flips, normalize; on a
    GPU no host sync: the epoch's indices go over once per epoch, asynchronously."""

    def __init__(self, images: torch.Tensor, schedule: Schedule, device, start_iter=0,
                 dtype=torch.float32, rows: np.ndarray | None = None, name: str = "memory"):
        super().__init__(schedule, device, start_iter, dtype)
        self.images, self.rows, self.name = images, rows, name

    def _to(self, array: np.ndarray, device) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def __iter__(self):
        sched, B = self.schedule, self.schedule.batch_size
        epoch, j = sched.position(self.start_iter)
        store = self.images.device
        while True:
            idx, flips = sched.rank_epoch(epoch)
            if self.rows is not None:
                idx = self.rows[idx]
            idx = self._to(idx, store)
            flips = None if flips is None else self._to(flips, self.device)
            for j in range(j, sched.batches_per_epoch):
                if store == self.device:
                    batch = self.images.index_select(0, idx[j * B:(j + 1) * B])
                else:   # host cache feeding a GPU: gather straight into pinned memory, copy async
                    batch = torch.empty((B,) + self.images.shape[1:], dtype=torch.uint8, device="cpu", pin_memory=True)
                    torch.index_select(self.images, 0, idx[j * B:(j + 1) * B], out=batch)
                    batch = batch.to(self.device, non_blocking=True)
                if flips is not None:
                    f = flips[j * B:(j + 1) * B].view(-1, 1, 1, 1)
                    batch = torch.where(f, batch.flip(-1), batch)
                yield normalize(batch, self.dtype)
            epoch, j = epoch + 1, 0
