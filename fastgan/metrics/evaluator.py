"""Evaluator: the metrics of a generator against the real data, for the training loop and evaluate.py.

    ev = Evaluator(cfg, device, rank, world_size)   # real-data statistics: computed once, cached
    scores = ev(G)                                  # {"swd": ..., "swd_64": ..., "ms_ssim": ..., "fid": ...}

Rank 0 does the work; with torch.distributed initialised the other ranks help read the real
images once, then wait in a broadcast and return the same dict. Fakes come from a fixed noise seed, so two evaluations of one generator agree
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
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastgan import files
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
    """Whole or not at all, under a temp name of this process's own (ranks of several nodes may
    write the same statistics into a shared folder)."""
    files.atomic_write(path, lambda f: np.savez(f, **arrays), unique=True)


class Evaluator:
    """Metrics of a generator; see the module docstring. Keyword arguments override cfg.eval.*
    (metrics, num_samples, inception_weights) and the batch size (default cfg.batch_size).
    `real_batches`: an iterable of float [-1, 1] image batches to use instead of the configured
    dataset, in one process (nothing is cached then).

    Under torch.distributed every rank must construct it and call it (the data loader and the
    result broadcast are collectives); an error on rank 0 is raised on every rank."""

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
        if any(m in NEEDS_FEATURES for m in self.metrics):   # a missing file fails before any slow work
            self.net = self._on_rank0(lambda: feature_net(inception_weights, cfg.eval.inception_weights,
                                                          cfg.data.cache_dir).to(self.device))
        if not any(m in ("swd", "fid", "kid") for m in self.metrics):
            return                                           # MS-SSIM and IS need no real data
        cache = real_batches is None
        if not self._on_rank0(lambda: self._load_cached_reals() if cache else False, share=True):
            images = self._collect_reals(real_batches)
            self._on_rank0(lambda: self._store_reals(images, cache))
        if "fid" in self.metrics or "kid" in self.metrics:
            self._on_rank0(lambda: self._prepare_features(cache))

    # -- running on rank 0 ---------------------------------------------------------------------

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _on_rank0(self, fn, share: bool = False):
        """fn() on rank 0; its error is raised on every rank, so none waits in a collective forever.
        share=True also hands rank 0's (small) result to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:          # re-raised below, after the other ranks hear of it
                error = e
        if self._distributed():
            box = [None if error is None else f"{type(error).__name__}: {error}", result if share else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                raise RuntimeError(f"evaluation failed on rank 0: {box[0]}")
            result = box[1] if share else result
        if error is not None:
            raise error
        return result

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

    def _load_cached_reals(self) -> bool:
        path = self._cache("")
        if not path.is_file():
            return False
        with np.load(path) as z:
            self.reals = torch.from_numpy(z["images"])
        return True

    def _collect_reals(self, real_batches) -> list[torch.Tensor]:
        """This rank's share of num_samples real images (uint8, CPU); all of them in one process."""
        want = self.num_samples
        if real_batches is None:
            from fastgan.data import build_loader
            cfg = copy.deepcopy(self.cfg)
            cfg.data.flip = False             # statistics of the data itself
            cfg.batch_size = self.batch_size
            real_batches = build_loader(cfg, self.rank, self.world_size, self.device, start_iter=0)
            if real_batches.num_images < self.num_samples and self.rank == 0:
                print(f"eval: the data has {real_batches.num_images} images, fewer than the "
                      f"{self.num_samples} compared: some real images count more than once", flush=True)
            want = -(-want // self.world_size)
        got, out = 0, []
        bar = Progress(want, desc="real images", enabled=self.progress)
        for batch in real_batches:
            out.append(quantize(batch[:want - got]).cpu())
            got += out[-1].shape[0]
            bar.update(out[-1].shape[0])
            if got >= want:
                break
        bar.close()
        if got < want:
            raise ValueError(f"the real data gave {got} images; {want} are needed")
        if not self._distributed():
            return out
        parts = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(torch.cat(out).numpy(), parts, dst=0)
        return [torch.from_numpy(p) for p in parts] if self.rank == 0 else []

    def _store_reals(self, parts: list[torch.Tensor], cache: bool) -> None:
        self.reals = torch.cat(parts)[:self.num_samples]
        if cache:
            _save_npz(self._cache(""), images=self.reals.numpy())

    def _prepare_features(self, cache: bool) -> None:
        path = self._cache(f"_{self.net.name}") if cache else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                self.real_feats = torch.from_numpy(z["features"])
            return
        self.real_feats, _ = extract(self.net, self.reals, self.batch_size, self.device,
                                     "real features", self.progress)
        if path is not None:
            _save_npz(path, features=self.real_feats.numpy())

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
            feats, logits = extract(self.net, fakes, self.batch_size, self.device, "fake features", self.progress)
            if "fid" in self.metrics:
                out["fid"] = fid_mod.fid(self.real_feats, feats)
            if "kid" in self.metrics:
                out["kid"], out["kid_std"] = fid_mod.kid(self.real_feats.to(self.device), feats.to(self.device))
            if "is" in self.metrics:
                out["is"], out["is_std"] = fid_mod.inception_score(logits)
        return out

    def __call__(self, G: torch.nn.Module) -> dict[str, float]:
        """The same dict on every rank."""
        return self._on_rank0(lambda: self.compute(G), share=True)
