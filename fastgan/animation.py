"""Animated GIFs with Pillow: training_samples/progress.gif from the fixed-noise grids, and latent walks.

progress.gif is rebuilt from the iter_N.png files present, in iteration order, each time a grid is
written: a resumed run (or one whose GIF was lost) gets one frame per grid, in order, with no state
of its own to keep. Each frame carries its iteration in a caption strip under the grid. A GIF holds
256 colours per frame: each frame gets its own palette (fast octree, then nearest-colour mapping,
no dithering: 6-9 ms for a 274 px grid on a 2-core CPU; on the quick start's grids the mean error
is 3.5 to 8 of 255, the grainy later grids being the hardest). Frames already made are kept in
memory, as palette images, by file name, size and mtime, so a rebuild in a training process only
quantizes the new grid: 0.09-0.15 s for 42 frames of 274 px, most of it writing the GIF (0.22-0.32 s
when every frame was quantized again). Past MAX_FRAMES grids the GIF takes MAX_FRAMES of them
evenly spaced, the first and the newest included, to keep it (and report.html, which inlines it)
to a few MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastgan import files

MAX_FRAMES = 100
FRAME_MS, LAST_FRAME_MS = 400, 2000      # the newest grid stays up longer before the loop restarts
CAPTION_PX = 14

_frames: dict[tuple[str, int, int], Image.Image] = {}


def to_palette(image: Image.Image) -> Image.Image:
    """An RGB or L image as the P image a GIF frame holds (L stays exact: 256 greys); a P image
    (a frame made before) is returned as it is."""
    if image.mode in ("L", "P"):
        return image
    image = image.convert("RGB")
    return image.quantize(palette=image.quantize(256, method=Image.Quantize.FASTOCTREE), dither=Image.Dither.NONE)


def save_gif(frames: list, path: str | Path, durations: int | list[int] = FRAME_MS) -> Path:
    """Write frames (PIL images or (H, W, C) uint8 arrays) as a looping GIF, whole or not at all
    (files.atomic): a killed run leaves the old GIF or the new one."""
    from fastgan.images import _pil     # late: it imports torch, which list_grids' users (report.py) need not
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    frames = [to_palette(f if isinstance(f, Image.Image) else _pil(f)) for f in frames]
    with files.atomic(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return Path(path)


def list_grids(folder: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every training_samples/iter_N.png, in iteration order."""
    return files.numbered(folder, ".png")


def _spread(items: list, limit: int) -> list:
    """At most `limit` items, evenly spaced, first and last kept."""
    if len(items) <= limit:
        return items
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, limit)).astype(int))
    return [items[i] for i in picks]


def captioned(image: Image.Image, text: str) -> Image.Image:
    """The image over a black strip holding `text`."""
    out = Image.new(image.mode, (image.width, image.height + CAPTION_PX), 0)
    out.paste(image, (0, 0))
    white = 255 if image.mode == "L" else (255, 255, 255)
    ImageDraw.Draw(out).text((3, image.height + 1), text, fill=white, font=ImageFont.load_default())
    return out


def _frame(iteration: int, path: Path) -> tuple[tuple, Image.Image]:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _frames:
        with Image.open(path) as im:
            grid = im.convert("L" if im.mode == "L" else "RGB")
        _frames[key] = to_palette(captioned(grid, f"iteration {iteration}"))
    return key, _frames[key]


def write_progress_gif(folder: str | Path, name: str = "progress.gif") -> Path | None:
    """Rebuild folder/progress.gif from folder's iter_N.png grids; None when there is none yet."""
    grids = _spread(list_grids(folder), MAX_FRAMES)
    if not grids:
        return None
    made = dict(_frame(it, p) for it, p in grids)
    for key in set(_frames) - set(made):      # grids no longer shown, or rewritten since
        del _frames[key]
    frames = list(made.values())
    return save_gif(frames, Path(folder) / name, [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS])
