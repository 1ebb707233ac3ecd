"""build_loader: from a config to the loader the training loop iterates, by one of three paths:
an idx file read whole (_idx_loader), images decoded once into the cache (_cached_loader), or
decoded every batch (_stream_loader); the package docstring says when each is taken. Local rank 0
of each node prepares the data (synthetic images, the cache) while the other ranks wait
(_on_builders); an error on one rank is raised on all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import cache, dali, synthetic, transforms
from .sampler import ArrayLoader, Loader, Schedule
from .sources import DataError, check_file, check_files, download_hint, list_folder, read_idx
from .torch_loader import TorchStream, decode_into

GPU_CACHE_SHARE = 0.5    # the cache may take this share of free GPU memory (the nets need the rest)
HOST_CACHE_SHARE = 0.5   # and this share of physical host memory


def build_loader(cfg, rank: int = 0, world_size: int = 1, device=torch.device("cpu"), start_iter: int = 0,
                 log=None, dtype: torch.dtype = torch.float32) -> Loader:
    """The training batches for this rank. log: a print-like callable (rank 0 only; default print)."""
    device = torch.device(device)
    log = (log or print) if rank == 0 else _quiet
    d, m = cfg.data, cfg.model
    if d.crop_size is not None and d.crop_size < 1:
        raise DataError(f"data.crop_size must be at least 1, got {d.crop_size}")
    ctx = _Context(cfg, rank, world_size, device, start_iter, dtype, log)
    if d.source == "idx":
        return _idx_loader(ctx)
    root = Path(d.root).expanduser()
    if d.source == "synthetic":
        _on_builders(lambda: synthetic.ensure(root, d.synthetic_count, d.num_workers, log, rank == 0), log)
        paths = [root / synthetic.file_name(i) for i in range(d.synthetic_count)]
    else:
        paths = list_folder(root)
        if not paths:
            raise DataError(f"no .jpg/.jpeg/.png files in {root} (data.source=folder){download_hint(root)}")
    place = _placement(d.cache, device, len(paths) * m.channels * m.resolution ** 2, ctx.kind, log)
    loader = _stream_loader(ctx, root, paths) if place == "off" else _cached_loader(ctx, root, paths, place)
    log(f"data: {loader.num_images} images in {root}, {d.recipe} -> {m.resolution}x{m.resolution}x{m.channels}; "
        f"loader: {loader.name}")
    return loader


class _Context:
    """What every path needs: the config's data spec, this rank's schedule, the decoder choice."""

    def __init__(self, cfg, rank, world_size, device, start_iter, dtype, log):
        d, m = cfg.data, cfg.model
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.start_iter, self.dtype, self.log = start_iter, dtype, log
        self.spec = (m.channels, m.resolution, d.recipe, d.crop_size)
        self.kind = _kind(d.loader) if d.source != "idx" else "torch"
        self.mixed = self.kind == "dali" and device.type == "cuda"
        self.device_id = (device.index or 0) if self.mixed else None
        self.decoder = (f"dali {'mixed' if self.mixed else 'cpu'}" if self.kind == "dali"
                        else f"pil ({d.num_workers} workers)")
        self.threads = max(2, d.num_workers)

    def check_gpu_decoder(self, paths: list[Path], checks=None) -> None:
        """Before DALI decodes on the GPU: one good file through the GPU decoder; if that fails,
        DALI decodes on the CPU instead (dali.gpu_decoder_works logs why, once)."""
        if not self.mixed:
            return
        checks = checks if checks is not None else (check_file(p) for p in paths[:64])
        probe = next((p for p, (why, ok) in zip(paths, checks) if not why and ok), None)
        if probe is not None and not dali.gpu_decoder_works(probe, self.spec, self.device_id, self.log):
            self.mixed, self.device_id, self.decoder = False, None, "dali cpu"

    def schedule(self, n: int) -> Schedule:
        return Schedule(n, self.cfg.batch_size, self.cfg.seed, self.rank, self.world_size, self.cfg.data.flip)


def _idx_loader(ctx: _Context) -> Loader:
    d, m = ctx.cfg.data, ctx.cfg.model
    raw = read_idx(d.root)
    images = transforms.apply_array(raw, m.resolution, m.channels, d.recipe, d.crop_size)
    where = ctx.device if d.cache == "gpu" and ctx.device.type == "cuda" else torch.device("cpu")
    loader = ArrayLoader(torch.from_numpy(images).to(where), ctx.schedule(len(images)), ctx.device, ctx.start_iter,
                         ctx.dtype, name=f"idx in {'gpu' if where.type == 'cuda' else 'host'} memory")
    ctx.log(f"data: {len(images)} images of {raw.shape[1]}x{raw.shape[2]} from {d.root} -> "
            f"{m.resolution}x{m.resolution}x{m.channels}; loader: {loader.name}")
    return loader


def _stream_loader(ctx: _Context, root: Path, paths: list[Path]) -> Loader:
    """No cache: check every file, then decode every batch (DALI or a torch DataLoader)."""
    checks = check_files(paths, show=ctx.rank == 0)
    skipped = [(str(p), why) for p, (why, _) in zip(paths, checks) if why]
    if ctx.kind == "dali":   # DALI gets JPEG/PNG with a complete tail; PIL-only files stay out
        skipped += [(str(p), "only PIL decodes it; use data.cache=host to include it")
                    for p, (why, ok) in zip(paths, checks) if not why and not ok]
    good = [p for p, (why, ok) in zip(paths, checks) if not why and (ok or ctx.kind == "torch")]
    _warn_skipped(skipped, len(paths), root, ctx.log)
    if not good:
        raise DataError(f"no usable image in {root}: all {len(paths)} image files are unreadable")
    args = (good, ctx.spec, ctx.schedule(len(good)), ctx.device, ctx.start_iter, ctx.dtype)
    if ctx.kind == "dali":
        ctx.check_gpu_decoder(paths, checks)
        loader = dali.DaliStream(*args, ctx.threads, gpu_decode=ctx.mixed)
    else:
        loader = TorchStream(*args, ctx.cfg.data.num_workers)
    loader.skipped = skipped
    return loader


def _cached_loader(ctx: _Context, root: Path, paths: list[Path], place: str) -> Loader:
    """Decode once into the on-disk cache (builders only), load it into host or GPU memory."""
    k = cache.key(paths, root, ctx.spec)
    stem = cache.location(ctx.cfg.data.cache_dir, root, ctx.spec, k)

    def ensure_cache():
        if cache.load(stem, k, ctx.spec) is not None:
            return "loaded"
        ctx.check_gpu_decoder(paths)
        ctx.log(f"data: decoding {len(paths)} files in {root} once into {stem}.npy")
        cache.build(paths, root, stem, k, ctx.spec, _decode(ctx), ctx.decoder, show=ctx.rank == 0)
        return "built"

    how = _on_builders(ensure_cache, ctx.log) or "loaded"
    found = cache.load(stem, k, ctx.spec)
    if found is None:
        raise DataError(f"decoded cache {stem}.npy is missing or damaged after it was built "
                        "(is data.cache_dir on a filesystem every rank sees?)")
    images, meta = found
    _warn_skipped(meta["skipped"], meta["listed"], root, ctx.log)
    holes = set(meta["holes"])
    rows = np.array([r for r in range(len(images)) if r not in holes]) if holes else None
    loader = ArrayLoader(cache.to_memory(images, ctx.device if place == "gpu" else torch.device("cpu")),
                         ctx.schedule(len(images) - len(holes)), ctx.device, ctx.start_iter, ctx.dtype, rows,
                         name=f"{'torch' if ctx.kind == 'torch' else ctx.decoder} + {place} cache")
    loader.skipped = [(str(root / f), why) for f, why in meta["skipped"]]
    ctx.log(f"data: {how} cache {stem}.npy ({images.nbytes / 2**20:.0f} MiB, decoded by {meta['decoder']})")
    return loader


def _decode(ctx: _Context):
    """The cache builder's decode(files, out, rows, progress, dali_ok) -> {row: error}."""
    workers, spec = ctx.cfg.data.num_workers, ctx.spec

    def decode(files, out, rows, bar, dali_ok):
        if ctx.kind == "torch":
            return decode_into(files, out, rows, spec, workers, bar)
        pil = lambda f, o, r: decode_into(f, o, r, spec, 1)  # noqa: E731  (DALI's fallback)
        mine = [i for i, ok in enumerate(dali_ok) if ok]
        rest = [i for i, ok in enumerate(dali_ok) if not ok]
        failed = dali.decode_into([files[i] for i in mine], out, [rows[i] for i in mine], spec,
                                  ctx.device_id, ctx.threads, bar, ctx.log, pil)
        failed.update(decode_into([files[i] for i in rest], out, [rows[i] for i in rest], spec, workers, bar))
        return failed
    return decode


def _kind(choice: str) -> str:
    if choice == "torch":
        return "torch"
    if dali.available():
        return "dali"
    if choice == "dali":
        raise DataError("data.loader=dali, but NVIDIA DALI is not installed: pip install 'fastgan[dali]'")
    return "torch"


def _placement(choice: str, device: torch.device, nbytes: int, kind: str, log) -> str:
    """gpu | host | off, and why when it is not what data.cache asked for."""
    if choice == "gpu" and device.type != "cuda":
        log("data: data.cache=gpu without a GPU: the decoded images live in host memory")
        choice = "host"
    if choice == "gpu":
        free = torch.cuda.mem_get_info(device)[0]
        if nbytes > GPU_CACHE_SHARE * free:
            choice = "off" if kind == "dali" else "host"
            log(f"data: the decoded dataset ({nbytes / 2**30:.1f} GiB) does not fit in GPU memory "
                f"({free / 2**30:.1f} GiB free): {'streaming through DALI' if kind == 'dali' else 'host memory'}")
    if choice == "host":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if nbytes > HOST_CACHE_SHARE * total:
            log(f"data: the decoded dataset ({nbytes / 2**30:.1f} GiB) does not fit in host memory "
                f"({total / 2**30:.1f} GiB): decoding every batch")
            choice = "off"
    return choice


def _on_builders(fn, log):
    """Run fn on local rank 0 of every node (every process without torch.distributed); the others
    wait. An error anywhere is raised everywhere, so no rank hangs on a barrier."""
    builder = not _distributed() or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    result, error = None, None
    if builder:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks hear about it
            error = e
    if _distributed():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        other = next((e for e in errors if e), None)
        if other and error is None:
            raise DataError(f"data preparation failed on another rank: {other}")
    if error is not None:
        raise error
    return result


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _warn_skipped(skipped: list, listed: int, root, log) -> None:
    if skipped:
        named = ", ".join(f"{Path(f).name} ({why})" for f, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log(f"warning: data: skipped {len(skipped)} of {listed} image files in {root} that cannot be "
            f"read: {named}{more}")


def _quiet(*args, **kwargs):
    pass
