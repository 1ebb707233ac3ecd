"""Procedural face-like images in CelebA's layout: 178x218 JPEGs named 000001.jpg, 000002.jpg, ...

Image i is a pure function of i (and VERSION): a muted background gradient, then a head and
shoulders (hair, neck, clothes, ears, face oval, eyes with iris and pupil, eyebrows, nose, mouth,
sometimes glasses or a beard) drawn on their own layer and rolled by a random angle, side
lighting, a slight blur and sensor noise, saved at JPEG quality 90 (~7-8 KB, like CelebA's). The
face sits where CelebA's aligned faces sit (eyes near y=112, mouth near y=152) and its parts are
large enough to survive a resize to 32x32, so a small GAN learns them in a few hundred iterations.

    paths = ensure("data/synthetic", 2048)   # writes what is missing (a few seconds), then lists
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastgan import files
from fastgan.progress import Progress

from .sources import DataError

VERSION = 2
WIDTH, HEIGHT = 178, 218
MARKER = ".fastgan_synthetic.json"

SKIN_LIGHT = np.array([255, 224, 200])
SKIN_DARK = np.array([80, 52, 38])
HAIR = [(18, 14, 12), (50, 32, 20), (95, 60, 32), (150, 105, 55), (215, 180, 110), (135, 48, 22),
        (165, 165, 165), (235, 232, 225)]
IRIS = [(70, 45, 25), (45, 90, 150), (70, 110, 60), (100, 75, 40), (28, 22, 18)]


def file_name(index: int) -> str:
    """CelebA's names: 1-based, six digits."""
    return f"{index + 1:06d}.jpg"


def _color(rng, lo=0, hi=255):
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _shade(color, factor):
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def _ellipse(draw, cx, cy, rx, ry, fill, **kw):
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, **kw)


def _background(rng) -> np.ndarray:
    """A vertical two-colour gradient, half the time with a soft blob (a lamp, a window)."""
    h, w = HEIGHT // 4, WIDTH // 4    # drawn at quarter size: it is smooth, and 16x cheaper
    grey = rng.integers(40, 220)
    top, bottom = rng.integers(0, 256, (2, 3)) * 0.6 + grey * 0.4   # muted, like rooms and walls
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = (top * (1 - t) + bottom * t) * np.ones((1, w, 1), np.float32)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[:h, :w]
        bx, by, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 18)
        k = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - k) + rng.integers(0, 256, 3) * k
    return np.asarray(Image.fromarray(img.astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BILINEAR))


_NOISE = []


def _noise(rng) -> np.ndarray:
    """Sensor noise (sigma 3) cut at a random offset from one fixed tile: 20x cheaper than drawing it."""
    if not _NOISE:
        tile = np.random.default_rng(12345).normal(0, 3.0, (2 * HEIGHT, 2 * WIDTH, 3))
        _NOISE.append(np.round(tile).astype(np.int16))
    y, x = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
    return _NOISE[0][y:y + HEIGHT, x:x + WIDTH]


def _head(rng, skin, hair, cx, cy) -> Image.Image:
    """The head on a transparent layer (hair, ears, face, features), centred at (cx, cy)."""
    layer = Image.new("RGBA", (WIDTH, HEIGHT), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    fw, fh = rng.uniform(36, 46), rng.uniform(50, 60)    # face half-width and half-height
    yaw = rng.uniform(-1, 1)                              # features slide towards the turned side
    fx = cx + yaw * 12
    style = rng.choice(["short", "long", "long", "bun", "bald"], p=[0.35, 0.25, 0.15, 0.1, 0.15])
    if style == "long":
        _ellipse(d, cx, cy + 20, fw + rng.uniform(12, 24), fh + rng.uniform(25, 45), hair)
    d.rectangle((cx - 17, cy + 30, cx + 17, 200), fill=_shade(skin, 0.8))   # neck, over long hair
    d.ellipse((cx - 85, 190, cx + 85, 300), fill=_color(rng))                # shoulders
    if style == "bun":
        _ellipse(d, cx, cy - fh - 6, 20, 16, hair)
    for side in (-1, 1):  # ears, the far one mostly hidden when the head turns
        _ellipse(d, cx + side * (fw - 2) - yaw * 5, cy + 2, 8, 14, _shade(skin, 0.9))
    _ellipse(d, cx + yaw * 4, cy, fw, fh, skin)
    if style != "bald":
        line = cy - fh + rng.uniform(10, 26)              # hairline
        d.chord((cx - fw - 5, cy - fh - 12, cx + fw + 5, 2 * line - (cy - fh - 12)), 180, 360, fill=hair)
        if rng.random() < 0.4:  # a fringe swept to one side
            s = rng.choice([-1, 1])
            d.pieslice((cx - fw, line - 22, cx + fw, line + 18), 180 if s < 0 else 270,
                       270 if s < 0 else 360, fill=hair)
    ey = cy - rng.uniform(2, 10)
    ex = rng.uniform(16, 21)
    brow = _shade(hair, 0.7) if style != "bald" else _shade(skin, 0.45)
    iris = IRIS[rng.integers(len(IRIS))]
    open_ = rng.uniform(5.0, 7.0)   # eyes: large dark irises, so they survive the resize to 32x32
    for side in (-1, 1):
        x = fx + side * ex
        _ellipse(d, x, ey, 11, open_, (245, 245, 240))
        _ellipse(d, x + yaw * 3, ey, 6, open_, _shade(iris, 0.7))
        _ellipse(d, x + yaw * 3, ey, 3, 3, (10, 10, 10))
        by = ey - rng.uniform(9, 13)
        d.line((x - 10, by, x + 10, by - 1), fill=brow, width=int(rng.integers(3, 6)))
    nose = _shade(skin, 0.78)
    d.polygon([(fx + yaw * 3, ey + 6), (fx - 5 + yaw * 4, ey + 27), (fx + 5 + yaw * 4, ey + 27)], fill=nose)
    _ellipse(d, fx + yaw * 4, ey + 27, 6, 3, nose)
    my, mw = ey + rng.uniform(38, 44), rng.uniform(12, 19)
    lips = _shade((185, 70, 75), rng.uniform(0.75, 1.15))
    smile = rng.uniform(0, 8)
    if rng.random() < 0.35:  # open smile: teeth inside the lips
        d.chord((fx - mw, my - 6, fx + mw, my + 6 + smile), 0, 180, fill=lips)
        d.chord((fx - mw + 3, my - 4, fx + mw - 3, my + 3 + smile), 0, 180, fill=(240, 238, 230))
    else:
        d.chord((fx - mw, my - 4 - smile, fx + mw, my + 4 + smile / 2), 0, 180, fill=lips)
    if style != "long" and rng.random() < 0.15:  # beard
        d.chord((cx - fw + 3, cy + fh * 0.1, cx + fw - 3, cy + fh + 4), 10, 170, fill=hair)
        d.chord((fx - mw, my - 4 - smile, fx + mw, my + 4 + smile / 2), 0, 180, fill=lips)
    if rng.random() < 0.12:  # glasses
        frame = _color(rng, 0, 90)
        for side in (-1, 1):
            _ellipse(d, fx + side * ex, ey, 13, 10, None, outline=frame, width=2)
        d.line((fx - ex + 13, ey, fx + ex - 13, ey), fill=frame, width=2)
    return layer


def face_image(index: int) -> Image.Image:
    """Synthetic face number `index` (0-based) as a 178x218 RGB image."""
    rng = np.random.default_rng([VERSION, index])
    canvas = Image.fromarray(_background(rng))
    skin = tuple(int(c) for c in SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * rng.beta(1.3, 1.6)
                 + rng.integers(-12, 13, 3))
    hair = HAIR[rng.integers(len(HAIR))]
    cx, cy = WIDTH / 2 + rng.uniform(-6, 6), 118 + rng.uniform(-5, 5)
    # NEAREST: 20x faster than BILINEAR here, and the box blur below hides the stair steps
    head = _head(rng, skin, hair, cx, cy).rotate(rng.uniform(-12, 12), Image.NEAREST, center=(cx, cy))
    canvas.paste(head, (0, 0), head)
    img = np.asarray(canvas.filter(ImageFilter.BoxBlur(1)), np.int32)
    light = np.linspace(*(rng.uniform(0.8, 1.15, 2) * 256), WIDTH).astype(np.int32)[None, :, None]
    img = (img * light >> 8) + _noise(rng)                                  # side light, sensor noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write(root: str, indices: list[int]) -> int:
    for i in indices:
        # whole or not at all, under a temp name of this worker's own (the builders of several
        # nodes may write into one shared folder); not fsync'ed one by one (files.atomic's
        # durable=False): _ensure syncs them all once before the marker that vouches for them
        with files.atomic(os.path.join(root, file_name(i)), unique=True, durable=False) as tmp:
            face_image(i).save(tmp, format="JPEG", quality=90)
    return len(indices)


def ensure(root: str | Path, count: int, num_workers: int = 2, log=print, show: bool = True) -> list[Path]:
    """Write the first `count` synthetic faces into `root` where missing; return their paths."""
    root = Path(root).expanduser()
    try:
        return _ensure(root, count, num_workers, log, show)
    except OSError as e:
        raise DataError(f"cannot write the synthetic images to data.root {str(root)!r} ({e.strerror or e}): "
                        "pass --data.root=DIR with a folder you can write") from None


def _ensure(root: Path, count: int, num_workers: int, log, show: bool) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / file_name(i) for i in range(count)]
    marker = root / MARKER
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        done = {"version": VERSION, "count": 0}   # none yet, or a killed run: fill the gaps
    if done.get("version") == VERSION and done.get("count", 0) >= count:
        return paths
    stale = done.get("version") != VERSION        # an older generator drew other faces
    missing = [i for i, p in enumerate(paths) if stale or not p.is_file()]
    if missing:
        log(f"data: writing {len(missing)} synthetic faces to {root}")
        chunks = [missing[i:i + 64] for i in range(0, len(missing), 64)]
        bar = Progress(len(missing), desc="synthetic faces", enabled=show, every=10)
        if num_workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(min(num_workers, len(chunks))) as pool:
                for n in pool.map(_write, [str(root)] * len(chunks), chunks):
                    bar.update(n)
        else:
            for chunk in chunks:
                bar.update(_write(str(root), chunk))
        bar.close()
    os.sync()       # the faces (this run's, or a killed one's) reach the disk before the marker vouches for them
    files.write_text(marker, json.dumps({"version": VERSION, "count": count}), unique=True)
    return paths
