"""Data-path throughput, in one table:

  decode    JPEG -> resized uint8, img/s: DALI mixed (GPU), DALI cpu, PIL with N worker processes
  serve     img/s of finished batches: from the decoded cache (GPU, host, host->GPU) and from the
            streaming loaders that decode every batch (DALI, torch DataLoader)
  train     end-to-end training img/s through the folder path (build_loader) against the same
            step fed one in-memory tensor; target on a GPU: the folder path >= 97% of in-memory

Images are the synthetic CelebA-layout faces (178x218 JPEGs, ~7.7 KB), or --data DIR for a real
folder such as img_align_celeba. Each figure is the median of --repeats runs, with min and max.
On a CPU the defaults are toy sizes (a few minutes on 2 cores); on a GPU, CelebA-like ones.

    python bench/loader.py
    python bench/loader.py --images 20000 --resolution 64 --batch 128 --workers 4 8 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from fastgan import config as config_mod
from fastgan import errors
from fastgan.data import build_loader, dali, synthetic, transforms
from fastgan.data.sources import list_folder
from fastgan.data.torch_loader import decode_into
from fastgan.models import RESOLUTIONS, build, resolve_backend
from fastgan.step import TrainStep
from report import write_json  # bench/*.py (bench/ is sys.path[0] when run as a script)
from timing import device_name, sync

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an image folder to read instead of synthetic faces")
    p.add_argument("--images", type=int, default=20000 if cuda else 512, help="synthetic faces to write and read")
    p.add_argument("--resolution", type=int, default=64 if cuda else 32, choices=RESOLUTIONS)
    p.add_argument("--recipe", default="resize", choices=transforms.RECIPES)
    p.add_argument("--batch", type=int, default=128 if cuda else 32)
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16] if cuda else [1, 2],
                   help="PIL decode processes to try")
    p.add_argument("--serve-batches", type=int, default=500 if cuda else 40)
    p.add_argument("--train-iters", type=int, default=300 if cuda else 15)
    p.add_argument("--config", default=str(ROOT / ("configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py" if cuda
                                                   else "configs/quickstart.py")), help="model and step for 'train'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/fastgan/bench")
    p.add_argument("--skip", nargs="*", default=[], choices=("decode", "serve", "train"))
    p.add_argument("--out", help="JSON path (default bench/results/loader-<device>-<date>.json)")
    return p.parse_args(argv)


def timed(fn, repeats, items, device):
    """img/s of fn() over `repeats` runs: (median, min, max)."""
    rates = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        rates.append(items / (time.perf_counter() - t))
    return statistics.median(rates), min(rates), max(rates)


class Table:
    def __init__(self):
        self.rows = []

    def add(self, section, what, rates, note=""):
        med, lo, hi = rates
        self.rows.append({"section": section, "what": what, "img_s": round(med, 1), "min": round(lo, 1),
                          "max": round(hi, 1), "note": note})
        print(f"{section:<7} {what:<44} {med:>11,.0f} {lo:>11,.0f} {hi:>11,.0f}  {note}", flush=True)


def bench_decode(table, paths, spec, args, device):
    n = len(paths)
    out = np.empty((n,) + (spec[0], spec[1], spec[1]), np.uint8)
    rows = list(range(n))
    if dali.available():
        if device.type == "cuda":
            dali.decode_into(paths[:512], out, rows, spec, device.index or 0, 4)   # nvJPEG start-up
            table.add("decode", "DALI mixed (nvJPEG)", timed(
                lambda: dali.decode_into(paths, out, rows, spec, device.index or 0, 4), args.repeats, n, device))
        threads = os.cpu_count() or 1
        table.add("decode", f"DALI cpu ({threads} threads)", timed(
            lambda: dali.decode_into(paths, out, rows, spec, None, threads), args.repeats, n, device))
    for w in args.workers:
        table.add("decode", f"PIL ({w} process{'es' if w > 1 else ''})", timed(
            lambda: decode_into(paths, out, rows, spec, w), args.repeats, n, device))


def loader_cfg(args, root, cache, kind, workers):
    return config_mod.load(args.config, [
        f"--batch_size={args.batch}", f"--model.resolution={args.resolution}", "--data.source=folder",
        f"--data.root={root}", f"--data.recipe={args.recipe}", f"--data.cache={cache}", f"--data.loader={kind}",
        f"--data.cache_dir={args.cache_dir}", f"--data.num_workers={workers}", "--data.flip=true"])


def bench_serve(table, root, args, device):
    quiet = dict(log=lambda *a: None)
    cuda, most = device.type == "cuda", max(args.workers)
    setups = [("gpu", "auto", most, "decoded cache in GPU memory")] if cuda else []
    setups += [("host", "auto", most, "decoded cache in host memory" + (" -> GPU" if cuda else ""))]
    if dali.available():
        setups.append(("off", "dali", most, f"DALI {'mixed' if cuda else 'cpu'} streaming, no cache"))
    setups += [("off", "torch", w, f"torch DataLoader ({w} workers), no cache") for w in args.workers]
    for cache, kind, workers, what in setups:
        loader = build_loader(loader_cfg(args, root, cache, kind, workers), device=device, **quiet)
        n = 5 * args.serve_batches if cache != "off" else args.serve_batches // 2   # cache: ~50x faster
        it = iter(loader)
        next(it)   # worker start-up and the first decode are not throughput

        def run():
            for batch in islice(it, n):
                pass
        table.add("serve", what, timed(run, args.repeats, n * args.batch, device), loader.name)


def bench_train(table, root, args, device):
    quiet = dict(log=lambda *a: None)
    cfg = loader_cfg(args, root, "gpu", "auto", max(args.workers))
    G, D = build(cfg.model, resolve_backend(cfg.backend, device))
    step = TrainStep(cfg, G.to(device), D.to(device), device)
    gen = torch.Generator(device).manual_seed(0)
    n, warm = args.train_iters, max(3, args.train_iters // 10)
    in_memory = torch.rand(args.batch, cfg.model.channels, args.resolution, args.resolution, device=device) * 2 - 1
    loader = build_loader(cfg, device=device, **quiet)
    data, name = iter(loader), f"folder path ({loader.name})"

    def from_memory(k):
        for _ in range(k):
            step.step(in_memory, step.noise(args.batch, gen))

    def from_folder(k):
        for _ in range(k):
            step.step(next(data), step.noise(args.batch, gen))
    from_memory(warm)
    from_folder(warm)
    memory, folder = [], []
    for _ in range(args.repeats):   # interleaved, so a busy machine hurts both alike
        memory.append(timed(lambda: from_memory(n), 1, n * args.batch, device)[0])
        folder.append(timed(lambda: from_folder(n), 1, n * args.batch, device)[0])
    model = f"{cfg.model.preset} {args.resolution}px b{args.batch} {cfg.amp} {resolve_backend(cfg.backend, device)}"
    table.add("train", f"in-memory tensor ({model})", (statistics.median(memory), min(memory), max(memory)))
    ratio = statistics.median(folder) / statistics.median(memory)
    table.add("train", name, (statistics.median(folder), min(folder), max(folder)),
              f"{100 * ratio:.1f}% of in-memory (target >= 97%)")


def main(argv=None):
    args = parse(argv if argv is not None else sys.argv[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device_name(device)
    if args.data:
        root = Path(args.data).expanduser()
    else:
        root = Path(args.cache_dir).expanduser() / f"faces-{args.images}"
        synthetic.ensure(root, args.images, num_workers=os.cpu_count() or 1)
    paths = list_folder(root)[:args.images]
    size = sum(p.stat().st_size for p in paths) / len(paths)
    spec = (3, args.resolution, args.recipe, None)
    print(f"\n{len(paths)} images in {root} ({size / 1024:.1f} KB each), {args.recipe} -> {args.resolution}px, "
          f"batch {args.batch}, on {gpu} ({os.cpu_count()} CPU cores); DALI "
          f"{'yes' if dali.available() else 'not installed'}\n")
    print(f"{'section':<7} {'what':<44} {'img/s':>11} {'min':>11} {'max':>11}", flush=True)
    table = Table()
    if "decode" not in args.skip:
        bench_decode(table, paths, spec, args, device)
    if "serve" not in args.skip:
        bench_serve(table, root, args, device)
    if "train" not in args.skip:
        bench_train(table, root, args, device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "bench/results" / f"loader-{'gpu' if device.type == 'cuda' else 'cpu'}-{stamp}.json")
    write_json(out, {"date": stamp, "device": gpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                     "dali": dali.available(), "images": len(paths), "bytes_per_image": round(size),
                     "settings": {k: v for k, v in vars(args).items() if k != "skip"}, "rows": table.rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    errors.main(main)       # a user's mistake: one line, no traceback
