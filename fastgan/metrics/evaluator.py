"""Evaluator: the metrics of a generator against the real data, for the training loop and evaluate.py.

    ev = Evaluator(cfg, device, rank, world_size)   # real-data statistics: computed once, cached
    scores = ev(G)                                  # {"swd": ..., "swd_64": ..., "ms_ssim": ..., "fid": ...}

Rank 0 does the work; with torch.distributed initialised the other ranks wait in a broadcast and
return the same dict. Fakes come from a fixed noise seed, so two evaluations of one generator agree
and two checkpoints are compared on the same z. Images are quantised to uint8 first, as saved
samples are: metrics see what a user sees.

Real-data statistics live in cfg.data.cache_dir, keyed by the dataset (source, root and its mtime,
recipe, crop, resolution, channels) and the number of images: a uint8 sample of the real images
(SWD, and the input of the features) and, per feature network, their Inception features (FID, KID).
Delete the eval_real_* files there to recompute them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from fastgan.metrics import fid as fid_mod
from fastgan.metrics.inception import feature_net
from fastgan.metrics.ms_ssim import ms_ssim_pairs
from fastgan.metrics.swd import resolutions, swd
from fastgan.progress import Progress

METRICS = ("swd", "ms_ssim", "fid", "kid", "is")
NEEDS_FEATURES = ("fid", "kid", "is")
# Direction of every key ev(G) can return. MS-SSIM measures likeness between unrelated samples:
# lower is more diverse, which is what "better" means when choosing a checkpoint by it.
LOWER_IS_BETTER = {"swd": True, **{f"swd_{r}": True for r in (128, 64, 32, 16)}, "ms_ssim": True,
                   "fid": True, "kid": True, "kid_std": True, "is": False, "is_std": True}
NOISE_SEED = 20210408      # fixed z for every evaluation (any constant; this is MMGen's DCGAN release date)


def parse_metrics(text: str | list | tuple) -> tuple[str, ...]:
    names = [m.strip().lower().replace("-", "_") for m in (text.split(",") if isinstance(text, str) else text)]
    names = [m for m in names if m]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric {', '.join(bad) or '(none given)'}; valid: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def quantize(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded, on the same device."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (.module) and torch.compile (._orig_mod) wrappers: sampling at another batch size
    must not recompile or touch DDP's buckets."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


@torch.no_grad()
def sample_images(G: torch.nn.Module, n: int, batch_size: int, device, seed: int = NOISE_SEED,
                  progress: bool = True) -> torch.Tensor:
    """n generated images as uint8 (n, C, R, R) on `device`; the noise is drawn on the CPU from `seed`."""
    G = _plain(G)
    gen = torch.Generator().manual_seed(seed)
    out = []
    bar = Progress(n, desc="sampling", enabled=progress)
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        z = torch.randn(b, G.noise_size, generator=gen).to(device)
        out.append(quantize(G(z)))
        bar.update(b)
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def extract(net: torch.nn.Module, images: torch.Tensor, batch_size: int, device,
            desc: str = "features", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the feature network over uint8 images in batches -> (features, logits), float32 on the CPU.
    Grayscale images are repeated to 3 channels (torch-fidelity and pytorch-fid expect RGB)."""
    feats, logits = [], []
    bar = Progress(images.shape[0], desc=desc, enabled=progress)
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f, lg = net(x)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
        bar.update(x.shape[0])
    bar.close()
    return torch.cat(feats), torch.cat(logits)


def _save_npz(path: Path, **arrays) -> None:
    """Through a temp file: a killed run never leaves half a cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


class Evaluator:
    """Metrics of a generator; see the module docstring. Keyword arguments override cfg.eval.*
    (metrics, num_samples, inception_weights) and the batch size (default cfg.batch_size).
    `real_batches`: an iterable of float [-1, 1] image batches to use instead of the configured
    dataset (nothing is cached then)."""

    def __init__(self, cfg, device, rank: int = 0, world_size: int = 1, *, metrics=None,
                 num_samples: int | None = None, batch_size: int | None = None,
                 inception_weights: str | None = None, real_batches=None, progress: bool = True):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.metrics = parse_metrics(metrics if metrics is not None else cfg.eval.metrics)
        self.num_samples = num_samples or cfg.eval.num_samples
        self.batch_size = batch_size or cfg.batch_size
        self.progress = progress and rank == 0
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be at least 2, got {self.num_samples}")
        if "swd" in self.metrics:
            resolutions(cfg.model.resolution)          # raises for images under 16x16
        best = cfg.eval.best_metric
        if best and best not in LOWER_IS_BETTER:
            raise ValueError(f"eval.best_metric {best!r} is not a metric; valid: {', '.join(LOWER_IS_BETTER)}")
        self.reals = self.real_feats = self.net = None
        if rank != 0:
            return
        if any(m in NEEDS_FEATURES for m in self.metrics):   # fail on a missing file before any slow work
            self.net = feature_net(inception_weights, cfg.eval.inception_weights, cfg.data.cache_dir)
        if "swd" in self.metrics or "fid" in self.metrics or "kid" in self.metrics:
            self.reals = self._real_images(real_batches)
        if "fid" in self.metrics or "kid" in self.metrics:
            self.real_feats = self._real_features(cache=real_batches is None)

    # -- real data -----------------------------------------------------------------------------

    def _key(self) -> str:
        d, m = self.cfg.data, self.cfg.model
        root = Path(d.root).expanduser().resolve()
        ident = dict(source=d.source, root=str(root), mtime=root.stat().st_mtime_ns if root.exists() else 0,
                     recipe=d.recipe, crop=d.crop_size, res=m.resolution, ch=m.channels, n=self.num_samples,
                     synthetic=d.synthetic_count if d.source == "synthetic" else None)
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return f"eval_real_{d.source}_{m.resolution}px_{d.recipe}_n{self.num_samples}_{digest}"

    def _cache(self, suffix: str) -> Path:
        return Path(self.cfg.data.cache_dir).expanduser() / f"{self._key()}{suffix}.npz"

    def _real_images(self, real_batches) -> torch.Tensor:
        path = None if real_batches is not None else self._cache("")
        if path is not None and path.is_file():
            with np.load(path) as z:
                return torch.from_numpy(z["images"])
        if real_batches is None:
            from fastgan.data import build_loader
            cfg = copy.deepcopy(self.cfg)
            cfg.data.flip = False             # statistics of the data itself
            cfg.batch_size = self.batch_size
            real_batches = build_loader(cfg, 0, 1, self.device, start_iter=0)
        got, out = 0, []
        bar = Progress(self.num_samples, desc="real images", enabled=self.progress)
        for batch in real_batches:
            out.append(quantize(batch[:self.num_samples - got]).cpu())
            got += out[-1].shape[0]
            bar.update(out[-1].shape[0])
            if got >= self.num_samples:
                break
        bar.close()
        if got < self.num_samples:
            raise ValueError(f"the real data gave {got} images; {self.num_samples} are needed")
        images = torch.cat(out)
        if path is not None:
            _save_npz(path, images=images.numpy())
        return images

    def _real_features(self, cache: bool) -> torch.Tensor:
        path = self._cache(f"_{self.net.name}") if cache else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                return torch.from_numpy(z["features"])
        feats, _ = extract(self.net.to(self.device), self.reals, self.batch_size, self.device,
                           "real features", self.progress)
        if path is not None:
            _save_npz(path, features=feats.numpy())
        return feats

    # -- one evaluation ------------------------------------------------------------------------

    def compute(self, G: torch.nn.Module) -> dict[str, float]:
        """Rank 0's work: sample, then every metric. G must be in eval mode."""
        fakes = sample_images(G, self.num_samples, self.batch_size, self.device, progress=self.progress)
        out: dict[str, float] = {}
        if "swd" in self.metrics:
            out.update(swd(self.reals.to(self.device), fakes, batch_size=max(self.batch_size, 256)))
        if "ms_ssim" in self.metrics:
            out["ms_ssim"] = ms_ssim_pairs(fakes)
        if self.net is not None:
            feats, logits = extract(self.net.to(self.device), fakes, self.batch_size, self.device,
                                    "fake features", self.progress)
            if "fid" in self.metrics:
                out["fid"] = fid_mod.fid(self.real_feats, feats)
            if "kid" in self.metrics:
                out["kid"], out["kid_std"] = fid_mod.kid(self.real_feats, feats)
            if "is" in self.metrics:
                out["is"], out["is_std"] = fid_mod.inception_score(logits)
        return out

    def __call__(self, G: torch.nn.Module) -> dict[str, float]:
        out = self.compute(G) if self.rank == 0 else None
        if self.world_size > 1 and torch.distributed.is_initialized():
            box = [out]
            torch.distributed.broadcast_object_list(box, src=0)
            out = box[0]
        return out
