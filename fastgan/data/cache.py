"""The decoded-dataset cache: every image decoded once, resized, stored as uint8 (N, C, R, R).

On disk in data.cache_dir as a pair:
    <folder>-<R>px-<C>ch-<recipe>-<key>.npy    the images (numpy format, memory-mappable)
    <folder>-<R>px-<C>ch-<recipe>-<key>.json   what was built: count, holes, skipped files, decoder
key hashes every listed file's relative path, size and mtime with the resolution, channels and
recipe: touching, adding, removing or replacing a file, or changing the recipe, builds anew.
Both files are written whole or not at all (fastgan/files.py, under temp names of the building
process's own: the ranks of several nodes may build into one shared folder), the .json last, and
checked against each other on load: a killed build leaves no cache that looks complete.

A build checks each file's header and tail (sources.check_file), then decodes the good ones
(DALI or PIL) into a memory-mapped temp file; a file that still fails to decode becomes a
"hole": its row stays in the array and is never served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastgan import files
from fastgan.errors import writable_dir
from fastgan.progress import Progress

from .sources import DataError, check_files

FORMAT = 1
NO_CACHE_FIX = ("free space, pass --data.cache_dir=DIR with a folder you can write, or --data.cache=off "
                "(decode every batch, no cache)")


def key(paths: list[Path], root: Path, spec: tuple) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, list(spec)]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:  # a dangling link: its presence counts, its (absent) contents cannot
            stamp = "missing"
        h.update(f"{os.path.relpath(p, root)}\0{stamp}\n".encode())
    return h.hexdigest()[:20]


def location(cache_dir: str, root: Path, spec: tuple, k: str) -> Path:
    channels, resolution, recipe, crop_size = spec
    crop = f"{crop_size}" if recipe == "center_crop" and crop_size else ""
    name = f"{root.name or 'data'}-{resolution}px-{channels}ch-{recipe}{crop}-{k}"
    return Path(cache_dir).expanduser() / name


def load(stem: Path, k: str, spec: tuple) -> tuple[np.ndarray, dict] | None:
    """(images memory-mapped read-only, metadata), or None when absent, incomplete or damaged."""
    npy, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):  # missing, or cut short (numpy checks the size against the header)
        return None
    channels, resolution = spec[0], spec[1]
    if (meta.get("format") != FORMAT or meta.get("key") != k or images.dtype != np.uint8
            or images.shape != (meta.get("count"), channels, resolution, resolution)):
        return None
    return images, meta


def build(paths: list[Path], root: Path, stem: Path, k: str, spec: tuple, decode, decoder: str,
          show: bool = True) -> tuple[np.ndarray, dict]:
    """Check and decode `paths` into the cache at `stem`. decode(paths, out, rows, progress, dali_ok)
    fills out[rows[i]] and returns {row: error}."""
    writable_dir(stem.parent, "data.cache_dir", NO_CACHE_FIX)
    npy, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    for path in (npy, meta_path):
        files.remove_stale(path)        # what killed builds on this host left behind
    t0 = time.perf_counter()
    checks = check_files(paths, show=show)
    bad = [(str(p), why) for p, (why, _) in zip(paths, checks) if why]
    good = [(p, ok) for p, (why, ok) in zip(paths, checks) if not why]
    if not good:
        raise DataError(f"no usable image in {root}: all {len(paths)} image files are unreadable "
                        f"({', '.join(f'{Path(f).name}: {w}' for f, w in bad[:5])}{', ...' if len(bad) > 5 else ''})")
    channels, resolution = spec[0], spec[1]
    try:
        with files.atomic(npy, unique=True) as tmp:
            out = _allocate(tmp, (len(good), channels, resolution, resolution))
            bar = Progress(len(good), desc=f"decoding ({decoder})", enabled=show, every=10)
            failed = decode([p for p, _ in good], out, list(range(len(good))), bar, [ok for _, ok in good])
            bar.close()
            out.flush()
            del out
    except OSError as e:
        raise DataError(f"cannot write {npy} ({e.strerror}): {NO_CACHE_FIX}") from None
    bad += [(str(good[row][0]), f"decode failed: {err}") for row, err in sorted(failed.items())]
    if len(failed) == len(good):
        raise DataError(f"no image in {root} decodes ({bad[0][0]}: {bad[0][1]})")
    meta = {"format": FORMAT, "key": k, "root": str(root), "count": len(good), "listed": len(paths),
            "holes": sorted(failed), "skipped": [[os.path.relpath(f, root), w] for f, w in bad],
            "decoder": decoder, "seconds": round(time.perf_counter() - t0, 2), "built": time.strftime("%F %T")}
    try:
        files.write_text(meta_path, json.dumps(meta), unique=True)
    except OSError as e:
        raise DataError(f"cannot write {meta_path} ({e.strerror}): {NO_CACHE_FIX}") from None
    return np.load(npy, mmap_mode="r"), meta


def _allocate(path: Path, shape: tuple) -> np.ndarray:
    """The memory-mapped .npy with its blocks allocated now: on a full disk, a write through the
    map would kill the process with SIGBUS mid-decode; this fails first, with a message."""
    size = int(np.prod(shape))
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):   # else: cannot, go on
                    raise
    except OSError as e:
        raise DataError(f"cannot make room for the decoded images ({size / 2**20:.0f} MiB) in {path.parent} "
                        f"({e.strerror}): {NO_CACHE_FIX}") from None
    return out


def to_memory(images: np.ndarray, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """The cache into host memory (device cpu) or onto a GPU, in chunks (no second host copy)."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(images))
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for i in range(0, len(images), chunk):
        out[i:i + chunk].copy_(torch.from_numpy(np.array(images[i:i + chunk])))
    return out
