"""Draw samples from a trained generator (MMGeneration's demo/unconditional_demo.py).

    python fastgan/sample.py CONFIG CKPT [--num-samples 64] [--nrow 8] [--seed 0] [--out grid.png]
                             [--each DIR] [--device cpu|cuda] [--backend auto|torch|triton] [--raw]
    python fastgan/sample.py CONFIG CKPT --interpolate N [--steps K] [--lerp] [--out walk.png|walk.gif]

CKPT: ckpt/iter_N.pt, generator.safetensors, a work_dir (its generator.safetensors, else its
newest checkpoint), or an MMGeneration/MMagic DCGAN checkpoint (.pth, converted from BGR to RGB).
CONFIG: the config file the run used, or the work_dir's config.json (for an MMGeneration file, the
fastgan config of the same name, e.g. configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py).
A file with an EMA generator draws from it; --raw draws from the trained generator instead.
The noise comes from --seed on the CPU, so a seed gives the same images on CPU and GPU.
--interpolate N draws N latent walks of K images (slerp, or --lerp) between latents from --seed:
a grid with one walk per row, or with --out *.gif an animation.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]      # run as a file: fastgan/ must not shadow other modules

try:
    import fastgan  # noqa: F401
except ImportError:
    sys.exit("fastgan is not installed: run `pip install -e .` in the repository root")

import argparse
import math
import time
from pathlib import Path

import torch

from fastgan import images, interpolate
from fastgan import config as config_mod
from fastgan import errors
from fastgan.checkpoint import load_generator
from fastgan.models import BACKEND_CHOICES, resolve_backend


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python fastgan/sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file (.py) or a work_dir's config.json")
    p.add_argument("ckpt", help="ckpt/iter_N.pt, generator.safetensors, a work_dir, or an MMGeneration .pth")
    p.add_argument("--num-samples", type=int, default=64, help="images to draw (default 64)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: a square grid)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--out", default="grid.png", help="grid PNG to write (default grid.png)")
    p.add_argument("--each", default=None, metavar="DIR", help="also write every image as DIR/NNNNNN.png")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--backend", default=None, choices=BACKEND_CHOICES, help="default: the config's")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--raw", action="store_true", help="the trained generator, not its EMA (when the file has one)")
    p.add_argument("--interpolate", type=int, default=None, metavar="N",
                   help="draw N latent walks instead of samples (--num-samples and --nrow then unused)")
    p.add_argument("--steps", type=int, default=None, metavar="K", help="images per walk (default 8)")
    p.add_argument("--lerp", action="store_true", help="walk in straight lines (default: slerp)")
    args = p.parse_args(argv)
    if args.interpolate is not None and args.interpolate < 1:
        p.error("--interpolate must be at least 1")
    if args.interpolate is None and (args.lerp or args.steps is not None):
        p.error("--steps and --lerp go with --interpolate N")
    args.steps = 8 if args.steps is None else args.steps
    if args.steps < 2:
        p.error("--steps must be at least 2 (a walk has two ends)")
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.nrow is not None and args.nrow < 1:
        p.error("--nrow must be at least 1")
    return args


def generate(G: torch.nn.Module, num: int, seed: int, device, batch_size: int = 256) -> torch.Tensor:
    """`num` images (N, C, R, R) in [-1, 1] on the CPU from noise seeded on the CPU."""
    return interpolate.draw(G, G.sample_noise(num, generator=torch.Generator().manual_seed(seed)), device, batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but no CUDA device is visible")
    cfg = config_mod.load(args.config)      # a ConfigError or CheckpointError is one line (errors.main)
    backend = resolve_backend(args.backend or cfg.backend, device)
    if backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before fastgan.kernels first loads
    G = load_generator(args.ckpt, cfg, device=device, backend=backend, raw=args.raw, log=print)
    size = f"{cfg.model.resolution}x{cfg.model.resolution}, backend {backend} on {device}"
    t = time.perf_counter()
    if args.interpolate:
        mode = "lerp" if args.lerp else "slerp"
        fake, out = interpolate.write(G, args.out, args.interpolate, args.steps, args.seed, mode, device,
                                      args.batch_size)
        print(f"{args.interpolate} {mode} walks of {args.steps} images ({size}, "
              f"{time.perf_counter() - t:.2f} s) -> {out}")
    else:
        fake = generate(G, args.num_samples, args.seed, device, args.batch_size)
        dt = time.perf_counter() - t
        out = images.save_grid(fake, args.out, nrow=args.nrow or max(1, math.isqrt(args.num_samples)))
        print(f"{args.num_samples} samples ({size}, {dt:.2f} s) -> {out}")
    if args.each:
        paths = images.save_each(fake, args.each)
        print(f"{len(paths)} images -> {Path(args.each)}/")
    return 0


if __name__ == "__main__":
    errors.main(main, oom_hint="try a smaller --batch-size (images per forward)")
