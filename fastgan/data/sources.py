"""Where images come from: an image folder, an idx(.gz) file, and checks for unusable files.

Folder listing is recursive over .jpg/.jpeg/.png (any case), sorted by relative path, so every
rank and every run sees the same order. `check_file` reads a file's header and tail only
(~0.1 ms): it finds empty, truncated, non-image and dangling-link files before a decoder meets
them (DALI stops the whole pipeline on one such file). `open_image` turns photos upright by their
EXIF orientation and converts every mode PIL knows (L, I;16, RGBA, LA, P, CMYK, 1, ...) to the
channels asked for, the way DALI's decoder does, so both paths decode the same pixels.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fastgan.errors import UserError
from fastgan.progress import Progress

EXTENSIONS = (".jpg", ".jpeg", ".png")
PNG_END = b"IEND\xaeB`\x82"


class DataError(UserError, ValueError):
    """The data source cannot give a single usable image (or is missing, or malformed)."""


def download_hint(root: Path) -> str:
    """What to fetch and where to put it, for the data sets the configs name."""
    if root.name == "img_align_celeba":
        return (f": download CelebA's img_align_celeba.zip (\"Align&Cropped Images\", 202,599 JPEGs, from "
                f"mmlab.ie.cuhk.edu.hk/projects/CelebA.html) and unzip it into {root.parent}/, giving "
                f"{root / '000001.jpg'}; or pass --data.root=DIR")
    return ""


def list_folder(root: str | Path) -> list[Path]:
    """Every .jpg/.jpeg/.png under root (links followed once, cycles skipped), sorted."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder (data.source=folder needs one){download_hint(root)}")
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(EXTENSIONS)]
    found.sort(key=lambda p: os.path.relpath(p, root))
    return [Path(p) for p in found]


def check_file(path: str | Path) -> tuple[str | None, bool]:
    """(why the file is unusable or None, whether DALI may decode it).

    JPEG and PNG files with a complete tail go to DALI; other formats PIL reads (a GIF saved as
    .jpg) and files whose tail is odd but which PIL decodes in full are decoded by PIL."""
    path = str(path)
    try:
        size = os.stat(path).st_size
    except OSError:
        return ("broken link" if os.path.islink(path) else "unreadable"), False
    if size == 0:
        return "empty file", False
    try:
        with Image.open(path) as img:
            fmt = img.format
            with open(path, "rb") as f:
                f.seek(max(0, size - 64))
                tail = f.read()
    except Exception:  # PIL raises many kinds here (UnidentifiedImageError, OSError, SyntaxError)
        return "not an image", False
    complete = (b"\xff\xd9" in tail) if fmt in ("JPEG", "MPO") else tail.endswith(PNG_END) if fmt == "PNG" else False
    if complete:
        return None, True
    try:  # no end marker where one belongs, or a format DALI is not given: decode it fully once
        with Image.open(path) as img:
            img.load()
    except Exception:
        return ("truncated" if fmt in ("JPEG", "MPO", "PNG") else "undecodable"), False
    return None, False


def check_files(paths: list[Path], workers: int | None = None, show: bool = True) -> list[tuple[str | None, bool]]:
    """check_file over many files, in order, on all cores: PIL's header parsing holds the GIL
    (~0.2 ms a file, 40 s for CelebA on one core), so processes, not threads."""
    workers = workers or os.cpu_count() or 1
    bar = Progress(len(paths), desc="checking files", enabled=show, every=10)
    pool = multiprocessing.Pool(workers) if workers > 1 and len(paths) > 2000 else None
    out = []
    try:
        for result in (pool.imap(check_file, paths, chunksize=256) if pool else map(check_file, paths)):
            out.append(result)
            bar.update(1)
    finally:
        if pool:
            pool.terminate()
    bar.close()
    return out


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float gray images to 8 bits by scaling, not clipping (PIL clips)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.clip(a, 0, 255)
    else:  # I;16*, I: 16-bit samples; round(v * 255 / 65535), what DALI's decoder does
        a = (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(a.astype(np.uint8), "L")


def convert(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image to mode RGB (channels=3) or L (channels=1). Alpha is dropped, as DALI,
    torchvision and PIL's own convert("RGB") do."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    return img.convert("RGB" if channels == 3 else "L")


def open_image(path: str | Path, channels: int) -> Image.Image:
    """Decode one file fully, upright (EXIF orientation applied, as DALI does); raises on an
    unreadable one."""
    with Image.open(path) as img:
        img.load()
        return convert(ImageOps.exif_transpose(img), channels)


def idx_file(root: str | Path) -> Path:
    """The idx image file: root itself, or the training *-images-idx3-ubyte[.gz] in a folder."""
    root = Path(root).expanduser()
    if root.is_file():
        return root
    mnist = ("download MNIST's train-images-idx3-ubyte.gz (yann.lecun.com/exdb/mnist or a mirror; Fashion-MNIST "
             "has a file of the same name) and pass its path, e.g. --data.root=data/mnist/train-images-idx3-ubyte.gz")
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} does not exist (data.source=idx wants an idx file or its "
                        f"folder): {mnist}")
    found = sorted(p for p in root.iterdir() if "images" in p.name and "idx3" in p.name)
    if not found:
        raise DataError(f"no *-images-idx3-ubyte[.gz] file in {root} (MNIST/Fashion-MNIST layout): {mnist}")
    train = [p for p in found if p.name.startswith("train")]
    return (train or found)[0]


def read_idx(root: str | Path) -> np.ndarray:
    """An idx3 image file (MNIST, Fashion-MNIST; gzip or not) as a uint8 array (N, H, W)."""
    path = idx_file(root)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype != 0x08 or ndim != 3:
        raise DataError(f"{path}: expected uint8 images (N, H, W), got type 0x{dtype:02x} with {ndim} dims")
    n, h, w = struct.unpack(">3I", data[4:16])
    if len(data) < 16 + n * h * w:
        raise DataError(f"{path} is truncated: {n} images of {h}x{w} need {16 + n * h * w} bytes, has {len(data)}")
    if n == 0:
        raise DataError(f"{path} holds no images")
    return np.frombuffer(data, np.uint8, n * h * w, 16).reshape(n, h, w)
