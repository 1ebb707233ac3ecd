"""Score a trained generator against its dataset, offline (MMGeneration's tools/evaluation.py).

    python fastgan/evaluate.py CONFIG CKPT [--metrics swd,ms_ssim[,fid,kid,is]] [--num-samples N]
                               [--out FILE.json] [--inception-weights PATH] [--device cpu|cuda]
                               [--batch-size N] [--raw] [--key=value ...]

CKPT: ckpt/iter_N.pt, ckpt/best.pt, generator.safetensors, a work_dir, or an MMGeneration/MMagic
DCGAN checkpoint. CONFIG: the config file the run used, or the work_dir's config.json; --key=value
overrides it (e.g. --data.root=...). A file with an EMA generator is scored with it; --raw scores
the trained generator.
Defaults come from the config's eval.* keys (MMGen's DCGAN: SWD and MS-SSIM on 16384 images).
FID, KID and IS need pt_inception-2015-12-05-6726825d.pth (--inception-weights, $FASTGAN_INCEPTION,
or eval.inception_weights); nothing is ever downloaded. Real-data statistics are cached in
data.cache_dir. Prints a table and writes the scores as JSON (default: next to CKPT).
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
import json
import time
from pathlib import Path

import torch

from fastgan import config as config_mod
from fastgan import errors, files
from fastgan.checkpoint import load_generator
from fastgan.metrics import LOWER_IS_BETTER, Evaluator, parse_metrics
from fastgan.models import resolve_backend

# MMGeneration's published DCGAN 64x64 scores (configs/dcgan/README.md), by data set
MMGEN_DCGAN = {"swd_64": 8.93, "swd_32": 10.53, "swd_16": 50.32, "swd": 23.26, "ms_ssim": 0.2899}
MMGEN_FIGURES = {
    "celeba-cropped": MMGEN_DCGAN,
    "lsun-bedroom": {"swd_64": 42.79, "swd_32": 34.55, "swd_16": 98.46, "swd": 58.6, "ms_ssim": 0.2095},
    "mnist": {"swd_64": 21.16, "swd_32": 4.4, "swd_16": 8.41, "swd": 11.32, "ms_ssim": 0.1395},
}


def mmgen_figures(cfg, config_path: str) -> dict[str, float] | None:
    """MMGen's published scores for the recipe a config (or its work_dir) is named after; the
    CelebA recipe's for any other MMGen 64x64x3 model, as before."""
    if cfg.model.preset != "mmgen" or cfg.model.resolution != 64:
        return None
    named = f"{config_path} {cfg.work_dir}"
    for name, figures in MMGEN_FIGURES.items():
        if name in named:
            return figures
    return MMGEN_DCGAN if cfg.model.channels == 3 else None


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python fastgan/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                epilog="Any other --key=value overrides the config.")
    p.add_argument("config", help="config file (.py) or a work_dir's config.json")
    p.add_argument("ckpt", help="ckpt/iter_N.pt, generator.safetensors, a work_dir, or an MMGeneration .pth")
    p.add_argument("--metrics", default=None, help="comma-separated: swd, ms_ssim, fid, kid, is "
                                                   "(default: the config's eval.metrics)")
    p.add_argument("--num-samples", type=int, default=None, help="generated (and real) images "
                                                                 "(default: the config's eval.num_samples)")
    p.add_argument("--out", default=None, help="JSON file to write (default: CKPT's name + _metrics.json)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth for fid, kid, is")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--raw", action="store_true", help="the trained generator, not its EMA (when the file has one)")
    args, overrides = p.parse_known_args(argv)
    if args.num_samples is not None and args.num_samples < 2:
        p.error("--num-samples must be at least 2")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.metrics is not None:
        try:
            parse_metrics(args.metrics)
        except ValueError as e:
            p.error(str(e))
    return args, overrides


def default_out(ckpt: str, raw: bool = False) -> Path:
    path, tag = Path(ckpt), "_raw" if raw else ""
    return path / f"metrics{tag}.json" if path.is_dir() else path.with_name(f"{path.stem}{tag}_metrics.json")


def table(scores: dict[str, float], reference: dict[str, float] | None) -> str:
    head = f"{'metric':<10} {'value':>12}  {'better':<7}" + (f" {'MMGen DCGAN':>12}" if reference else "")
    rows = [head, "-" * len(head)]
    for k, v in scores.items():
        row = f"{k:<10} {v:>12.4f}  {'lower' if LOWER_IS_BETTER.get(k, True) else 'higher':<7}"
        if reference:
            row += f" {reference[k]:>12.4f}" if k in reference else f" {'':>12}"
        rows.append(row)
    return "\n".join(rows)


def evaluate(cfg, ckpt: str, device: torch.device, metrics=None, num_samples=None, batch_size=256,
             inception_weights=None, raw=False, log=None) -> dict[str, float]:
    G = load_generator(ckpt, cfg, device=device, backend=resolve_backend(cfg.backend, device), raw=raw, log=log)
    ev = Evaluator(cfg, device, metrics=metrics, num_samples=num_samples, batch_size=batch_size,
                   inception_weights=inception_weights)
    return ev(G)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but no CUDA device is visible")
    cfg = config_mod.load(args.config, overrides)   # a ConfigError, CheckpointError, ...: one line (errors.main)
    t0 = time.perf_counter()
    try:
        scores = evaluate(cfg, args.ckpt, device, args.metrics, args.num_samples, args.batch_size,
                          args.inception_weights, raw=args.raw, log=print)
    except ValueError as e:     # the evaluator's checks of counts and sizes (e.g. fewer real images than asked)
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - t0
    n = args.num_samples or cfg.eval.num_samples
    print(f"{args.ckpt}: {n} samples on {device}, {seconds:.1f} s")
    print(table(scores, mmgen_figures(cfg, args.config)))
    out = Path(args.out) if args.out else default_out(args.ckpt, args.raw)
    record = {"config": args.config, "overrides": overrides, "checkpoint": args.ckpt, "raw": args.raw,
              "num_samples": n, "device": str(device), "seconds": round(seconds, 2), "metrics": scores}
    files.write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    errors.main(main, oom_hint="try a smaller --batch-size (images per forward)")
