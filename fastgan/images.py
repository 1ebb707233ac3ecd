"""Image grids and PNG files with PIL (no torchvision: it does not import beside every torch wheel)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastgan import files


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; values outside are clipped."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)       # 127.5: [-1, 1] onto [0, 255]
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile images into rows of `nrow` with `padding` pixels between them -> (H, W, C) uint8."""
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i, tile in enumerate(tiles):
        y = padding + (i // cols) * (h + padding)
        x = padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = tile
    return grid


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, C) uint8 array, whole or not at all (files.atomic)."""
    with files.atomic(path) as tmp:
        _pil(array).save(tmp, format="PNG")
    return Path(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    return save_png(make_grid(images, nrow, padding), path)


def save_each(images: torch.Tensor, folder: str | Path, start: int = 0) -> list[Path]:
    """One PNG per image: folder/000000.png, 000001.png, ..."""
    return [save_png(tile, Path(folder) / f"{start + i:06d}.png") for i, tile in enumerate(to_uint8(images))]


class RealGrid:
    """training_samples/real.png: the first `num` training images the run feeds the model (after
    crop, resize, flip and normalisation), as a grid shaped like the fixed-noise grids; written once.

    `add(batch)` sees each training batch until it has enough; it clones on the device and copies
    to the host without blocking, writing when a later call finds the copy done, so the training
    loop never waits for the device. `close()` writes whatever is pending (after the loop).
    Inactive (every call returns at once) off rank 0 or when real.png already exists.
    writes: a context manager factory around the one write (faults.BestEffort: a full disk warns
    and training goes on); it is tried once either way.
    """

    def __init__(self, path: str | Path, num: int, nrow: int, active: bool = True, writes=None):
        self.path, self.num, self.nrow = Path(path), num, nrow
        self.writes = writes or (lambda what: contextlib.nullcontext())
        self.done = not active or self.path.is_file()
        self.parts: list[torch.Tensor] = []
        self.have = 0
        self.host: torch.Tensor | None = None
        self.copied = None   # a CUDA event once the host copy is queued

    def add(self, batch: torch.Tensor) -> None:
        if self.done:
            return
        if self.host is None:
            take = batch[:self.num - self.have].detach()
            self.parts.append(take.clone())   # the loader may reuse its buffer
            self.have += take.shape[0]
            if self.have < self.num:
                return
            parts = torch.cat(self.parts)
            self.parts = []
            if parts.device.type == "cuda":
                self.host = torch.empty(parts.shape, dtype=parts.dtype, pin_memory=True)
                self.host.copy_(parts, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record()
            else:
                self.host = parts
        if self.copied is None or self.copied.query():
            self._write()

    def close(self) -> None:
        if self.done:
            return
        if self.host is None and self.parts:   # a run shorter than `num` images: what it saw
            self.host = torch.cat(self.parts).cpu()
        if self.copied is not None:
            self.copied.synchronize()
        if self.host is not None:
            self._write()
        self.done = True

    def _write(self) -> None:
        host, self.done, self.host, self.copied = self.host, True, None, None
        with self.writes(str(self.path)):
            save_grid(host, self.path, nrow=self.nrow)
