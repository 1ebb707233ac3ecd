"""Crop/resize recipes and the uint8 -> [-1, 1] normalisation every loader shares.

    resize       MMGen's Resize(keep_ratio=False): the whole image squashed to RxR, bilinear
    center_crop  the central square of side crop_size (default: the shorter side), then RxR

Bilinear here is PIL's, which widens its filter when it shrinks (antialiasing), like DALI's
fn.resize(antialias=True); the DALI pipeline builds the same box (see dali.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RECIPES = ("resize", "center_crop")


def crop_box(width: int, height: int, recipe: str, crop_size: int | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region that is resized to RxR."""
    if recipe == "resize":
        return 0, 0, width, height
    if recipe != "center_crop":
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    side = min(width, height, crop_size or max(width, height))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def apply(img: Image.Image, resolution: int, recipe: str, crop_size: int | None) -> np.ndarray:
    """A decoded PIL image (mode RGB or L) through the recipe: uint8 (C, R, R)."""
    box = crop_box(img.width, img.height, recipe, crop_size)
    if box != (0, 0, img.width, img.height):
        # crop first: resize(box=...) would let the filter read pixels outside the box; DALI
        # decodes the box alone (decoders.image_slice), and so do we
        img = img.crop(box)
    img = img.resize((resolution, resolution), Image.BILINEAR)
    a = np.asarray(img)
    return np.ascontiguousarray(a.transpose(2, 0, 1)) if a.ndim == 3 else a[None].copy()


def apply_array(images: np.ndarray, resolution: int, channels: int, recipe: str,
                crop_size: int | None) -> np.ndarray:
    """Gray images (N, H, W) uint8 (an idx file) -> (N, channels, R, R) uint8."""
    n = images.shape[0]
    out = np.empty((n, 1, resolution, resolution), np.uint8)
    for i in range(n):
        out[i] = apply(Image.fromarray(images[i], "L"), resolution, recipe, crop_size)
    return np.repeat(out, channels, axis=1) if channels == 3 else out


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> dtype in [-1, 1] as (x - 127.5) * (1 / 127.5): bit for bit what DALI's
    crop_mirror_normalize(mean=127.5, std=127.5) computes, so cached and streamed batches agree."""
    return images.to(torch.float32).sub_(127.5).mul_(1 / 127.5).to(dtype)
