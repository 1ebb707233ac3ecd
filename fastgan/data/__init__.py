"""fastgan's data path: images from a folder, an idx file or the synthetic generator, decoded once
into a cache (GPU or host memory) or streamed, served as (B, C, R, R) batches in [-1, 1].

    loader = build_loader(cfg, rank=0, world_size=1, device=torch.device("cuda"), start_iter=0)
    loader.name, loader.num_images, loader.batches_per_epoch
    for real in loader: ...      # forever; iteration k is the same batch in every run (sampler.py)

Which path (logged as loader.name):
    data.cache=gpu|host  decode every image once (DALI, or PIL when data.loader=torch or DALI is
                         absent), keep the uint8 array on disk (cache.py) and in GPU or host memory,
                         index it per batch. gpu without a GPU means host.
    data.cache=off       decode every batch: DALI (dali.DaliStream) or a torch DataLoader with PIL
                         (torch_loader.TorchStream). Also chosen when the cache would not fit.
Unusable files are found before any decoder sees them, skipped, and named in one warning.
With torch.distributed initialised, local rank 0 of each node writes synthetic images and
builds the cache while the other ranks wait; an error on one rank is raised on all of them.

The files, in reading order:
    build.py         build_loader: which path a config takes, who prepares the data, what is logged
    sources.py       where images come from: folder listing, idx files, the check for unusable files
    transforms.py    the crop/resize recipes and the uint8 -> [-1, 1] normalisation
    sampler.py       Schedule (the batch order, per rank) and ArrayLoader (batches from memory)
    cache.py         the decoded-dataset cache on disk: key, build, load
    torch_loader.py  PIL decoding: the cache build without DALI, and TorchStream
    dali.py          NVIDIA DALI decoding: the cache build, and DaliStream
    synthetic.py     the synthetic faces (data.source=synthetic)
"""

from . import cache, dali, synthetic, transforms
from .build import build_loader
from .sampler import Loader, Schedule
from .sources import DataError

__all__ = ["build_loader", "DataError", "Loader", "Schedule", "cache", "dali", "synthetic", "transforms"]
