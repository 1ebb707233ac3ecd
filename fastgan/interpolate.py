"""Latent walks (MMGeneration's apps/interpolate_sample.py): images of G along paths between latents.

    z = walk_latents(G, num_walks=4, steps=8, seed=0, mode="slerp")   # (4, 8, noise_size)
    images = draw(G, z, device)                                       # (4 * 8, C, R, R), a walk per row

The end latents come from `seed` on the CPU (2 * num_walks of them: walk i goes from the i-th to
the (num_walks + i)-th), so a seed gives the same walks on a CPU and a GPU. Every walk starts at
exactly its first latent and ends at exactly its second (t = 0 and t = 1 give them bit for bit).
slerp follows the great circle between the two directions while the norm changes linearly, as in
MMGen and Tom White's "Sampling Generative Networks": a Gaussian latent lies near a sphere, which
lerp's midpoints cut through (at t = 0.5 between two independent latents the norm drops by ~1/sqrt(2)).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastgan import animation, images

MODES = ("slerp", "lerp")
FRAME_MS = 120    # per image of a walk: 8 steps there and back in ~1.7 s


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a, b: (N, D); t: (K,) -> (N, K, D)."""
    t = t.view(1, -1, 1)
    return a[:, None] * (1 - t) + b[:, None] * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation; a, b: (N, D); t: (K,) -> (N, K, D). Falls back to lerp where a and b
    point the same way (sin(omega) ~ 0)."""
    a64, b64 = a.double(), b.double()
    cos = (a64 / a64.norm(dim=1, keepdim=True) * (b64 / b64.norm(dim=1, keepdim=True))).sum(1).clamp(-1, 1)
    omega = torch.acos(cos).view(-1, 1, 1)
    so = torch.sin(omega)
    tt = t.double().view(1, -1, 1)
    out = torch.sin((1 - tt) * omega) / so * a64[:, None] + torch.sin(tt * omega) / so * b64[:, None]
    flat = (so.abs() < 1e-6).expand_as(out)
    out = torch.where(flat, lerp(a64, b64, t.double()), out)
    out[:, 0], out[:, -1] = a64, b64      # exact end points, whatever rounding did
    return out.to(a.dtype)


def walk_latents(G: torch.nn.Module, num_walks: int, steps: int, seed: int = 0, mode: str = "slerp") -> torch.Tensor:
    """(num_walks, steps, noise_size) latents on the CPU; walk i runs from z[i] to z[num_walks + i]."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_walks < 1 or steps < 2:
        raise ValueError(f"need at least 1 walk of at least 2 steps, got {num_walks} walks of {steps}")
    z = G.sample_noise(2 * num_walks, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(0, 1, steps)
    return (slerp if mode == "slerp" else lerp)(z[:num_walks], z[num_walks:], t)


def draw(G: torch.nn.Module, z: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """G (in eval mode: BN uses its running statistics, so images do not depend on the batch) on
    every latent of z (..., D), `batch_size` at a time: (N, K, D) walks -> (N * K, C, R, R), in
    order, on the CPU. sample.py draws its grids through it too."""
    G.eval()
    out = []
    with torch.no_grad():
        for chunk in z.reshape(-1, z.shape[-1]).split(batch_size):
            out.append(G(chunk.to(device)).float().cpu())
    return torch.cat(out)


def walk_frames(images: torch.Tensor, num_walks: int, steps: int) -> list[torch.Tensor]:
    """The walks as an animation: frame k holds image k of every walk (then back again, so the
    loop has no jump); each frame (num_walks, C, R, R)."""
    per_walk = images.view(num_walks, steps, *images.shape[1:])
    order = list(range(steps)) + list(range(steps - 2, 0, -1))
    return [per_walk[:, k] for k in order]


def frame_nrow(num_walks: int) -> int:
    """Columns of an animation frame: a square-ish grid of the walks."""
    return max(1, math.ceil(math.sqrt(num_walks)))


def write(G: torch.nn.Module, out: str | Path, num_walks: int, steps: int, seed: int = 0, mode: str = "slerp",
          device="cpu", batch_size: int = 256) -> tuple[torch.Tensor, Path]:
    """Draw the walks; write a grid (a walk per row) or, when `out` ends in .gif, an animation.
    Returns the images (num_walks * steps, C, R, R) and the file written."""
    fake = draw(G, walk_latents(G, num_walks, steps, seed, mode), device, batch_size)
    if Path(out).suffix.lower() == ".gif":
        frames = [images.make_grid(f, nrow=frame_nrow(num_walks)) for f in walk_frames(fake, num_walks, steps)]
        return fake, animation.save_gif(frames, out, durations=FRAME_MS)
    return fake, images.save_grid(fake, out, nrow=steps)
