"""The PIL decoders: a torch DataLoader that decodes every batch (data.cache=off), and the
decoded-cache build when DALI is absent. Both decode in data.num_workers processes.

Every path through here is deterministic: a batch is a pure function of its indices and flips
(sampler.Schedule), whichever worker decodes it.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import transforms
from .sampler import Loader, Schedule
from .sources import DataError, open_image

CHUNK = 32   # files per task handed to a worker process during a cache build


def decode(path, channels: int, resolution: int, recipe: str, crop_size: int | None) -> np.ndarray:
    """One image file -> uint8 (C, R, R); raises on an unreadable file."""
    return transforms.apply(open_image(path, channels), resolution, recipe, crop_size)


def _decode_chunk(args) -> list[np.ndarray | str]:
    paths, spec = args
    out = []
    for p in paths:
        try:
            out.append(decode(p, *spec))
        except Exception as e:  # any decoder error marks the file bad; the build goes on
            out.append(f"{type(e).__name__}: {e}")
    return out


def decode_into(paths: list[Path], out: np.ndarray, rows: list[int], spec: tuple, workers: int,
                progress=None) -> dict[int, str]:
    """Decode paths[i] into out[rows[i]] with PIL on `workers` processes; returns {row: error}
    for the files that fail. spec = (channels, resolution, recipe, crop_size)."""
    tasks = [([str(p) for p in paths[i:i + CHUNK]], spec) for i in range(0, len(paths), CHUNK)]
    failed = {}
    pool = multiprocessing.Pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        for t, chunk in enumerate(results):
            for k, item in enumerate(chunk):
                row = rows[t * CHUNK + k]
                if isinstance(item, str):
                    failed[row] = item
                else:
                    out[row] = item
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if pool:
            pool.terminate()
    return failed


class _Files(Dataset):
    """Item (i, flip) -> uint8 (C, R, R). A file that fails to decode here (it passed the header
    check: damage inside the data) is replaced by the next decodable one, so batches keep their
    size and the run its order; rank 0 says which file, once per worker."""

    def __init__(self, paths: list[Path], spec: tuple, verbose: bool):
        self.paths, self.spec, self.verbose = [str(p) for p in paths], spec, verbose
        self.warned = set()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        i, flip = item
        for k in range(len(self.paths)):
            path = self.paths[(i + k) % len(self.paths)]
            try:
                a = decode(path, *self.spec)
            except Exception as e:  # see the class docstring
                if self.verbose and path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: data: cannot decode {path} ({type(e).__name__}: {e}); "
                          "serving the next image in its place", file=sys.stderr)
                continue
            return torch.from_numpy(np.ascontiguousarray(a[..., ::-1]) if flip else a)
        raise DataError("no image in the dataset decodes")


class _Batches:
    """The batch sampler: lists of (image, flip) from start_iter on, forever."""

    def __init__(self, schedule: Schedule, start_iter: int):
        self.schedule, self.start_iter = schedule, start_iter

    def __iter__(self):
        sched, B = self.schedule, self.schedule.batch_size
        epoch, j = sched.position(self.start_iter)
        while True:
            idx, flips = sched.rank_epoch(epoch)
            flips = np.zeros(len(idx), bool) if flips is None else flips
            for j in range(j, sched.batches_per_epoch):
                s = slice(j * B, (j + 1) * B)
                yield list(zip(idx[s].tolist(), flips[s].tolist()))
            epoch, j = epoch + 1, 0


def _ignore_sigint(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too; the main process decides (fastgan.faults: it
    finishes the iteration and checkpoints, which needs the batch a worker is decoding). The
    workers end with it: the DataLoader's watchdog stops them when the main process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchStream(Loader):
    """Decode with PIL in a DataLoader every batch (no cache)."""

    def __init__(self, paths: list[Path], spec: tuple, schedule: Schedule, device, start_iter=0,
                 dtype=torch.float32, num_workers: int = 2, verbose: bool = True):
        super().__init__(schedule, device, start_iter, dtype)
        self.dataset = _Files(paths, spec, verbose)
        self.num_workers = num_workers
        self.name = f"torch ({num_workers} workers)"

    def __iter__(self):
        cuda = self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_sampler=_Batches(self.schedule, self.start_iter),
                            num_workers=self.num_workers, pin_memory=cuda, worker_init_fn=_ignore_sigint)
        for batch in loader:
            yield transforms.normalize(batch.to(self.device, non_blocking=cuda), self.dtype)
