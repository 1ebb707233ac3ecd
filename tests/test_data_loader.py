"""Batch order: exact resume from any iteration, sharding over ranks, flips (~10 s)."""

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgan.config import load
from fastgan.data import DataError, Schedule, build_loader, dali, synthetic, transforms

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.py"
PATHS = [("torch", "off"), ("torch", "host"), ("dali", "host"), ("dali", "off")]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    synthetic.ensure(folder, 44, num_workers=0, log=lambda *a: None)
    return folder


def loader_for(folder, cache_dir, kind, cache, rank=0, world=1, start_iter=0, *more):
    cfg = load(QUICKSTART, [f"--data.root={folder}", "--data.source=folder", f"--data.loader={kind}",
                            f"--data.cache={cache}", f"--data.cache_dir={cache_dir}", "--data.num_workers=2",
                            "--batch_size=8", "--data.flip=true", "--seed=11", *more])
    return build_loader(cfg, rank=rank, world_size=world, start_iter=start_iter, log=lambda *a: None)


@pytest.mark.parametrize("kind,cache", PATHS, ids=[f"{k}-{c}" for k, c in PATHS])
def test_start_iter_resumes_the_exact_batch_sequence(faces, tmp_path, kind, cache):
    if kind == "dali" and not dali.available():
        pytest.skip("NVIDIA DALI is not importable here")
    full = list(islice(loader_for(faces, tmp_path, kind, cache), 13))   # 5 batches per epoch: 2.6 epochs
    assert not torch.equal(full[0], full[5])                            # a new epoch reshuffles
    for k in (3, 5, 9):   # inside epoch 0, on the epoch boundary, inside epoch 1
        resumed = list(islice(loader_for(faces, tmp_path, kind, cache, 0, 1, k), 13 - k))
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[k:])), k
    again = list(islice(loader_for(faces, tmp_path, kind, cache), 13))
    assert all(torch.equal(a, b) for a, b in zip(again, full))
    other_seed = next(iter(loader_for(faces, tmp_path, kind, cache, 0, 1, 0, "--seed=12")))
    assert not torch.equal(other_seed, full[0])


@pytest.mark.parametrize("n,world,batch", [(64, 2, 8), (70, 2, 8), (71, 3, 5), (40, 4, 10)])
def test_ranks_take_disjoint_shards_covering_each_image_once_per_epoch(n, world, batch):
    for epoch in range(3):
        shards = [Schedule(n, batch, 5, r, world, flip=True).rank_epoch(epoch)[0] for r in range(world)]
        bpe = (n // world) // batch
        assert all(len(s) == bpe * batch for s in shards)
        taken = np.concatenate(shards)
        assert len(np.unique(taken)) == len(taken)                # no image twice in an epoch
        if n % (world * batch) == 0:
            assert np.array_equal(np.sort(taken), np.arange(n))   # every image exactly once
        # the shards are DALI's: rank r reads [n*r//W, n*(r+1)//W) of the epoch's permutation
        perm, _ = Schedule(n, batch, 5, 0, world).epoch(epoch)
        for r, s in enumerate(shards):
            assert np.array_equal(s, perm[n * r // world:][:bpe * batch])


def test_two_rank_loaders_serve_their_shard_with_flips(faces, tmp_path):
    per_rank = [list(islice(loader_for(faces, tmp_path, "torch", "host", r, 2), 4)) for r in range(2)]
    loader = loader_for(faces, tmp_path, "torch", "host", 1, 2)
    assert (loader.num_images, loader.batches_per_epoch) == (44, 2)
    cached = loader.images
    flipped_any = False
    for r in range(2):
        sched = Schedule(44, 8, 11, r, 2, flip=True)
        for it, batch in enumerate(per_rank[r]):
            epoch, j = sched.position(it)
            idx, flips = sched.rank_epoch(epoch)
            want = cached[idx[j * 8:(j + 1) * 8]]
            f = torch.from_numpy(flips[j * 8:(j + 1) * 8])
            want = torch.where(f.view(-1, 1, 1, 1), want.flip(-1), want)
            assert torch.equal(batch, transforms.normalize(want))
            flipped_any |= bool(f.any()) and not bool(f.all())
    assert flipped_any
    r0 = {tuple(x) for b in per_rank[0][:2] for x in b.flatten(1)[:, ::97].tolist()}
    r1 = {tuple(x) for b in per_rank[1][:2] for x in b.flatten(1)[:, ::97].tolist()}
    assert not r0 & r1   # the two ranks' epoch-0 images share nothing


def test_dtype_and_too_few_images(faces, tmp_path):
    cfg = load(QUICKSTART, [f"--data.root={faces}", "--data.source=folder", "--data.loader=torch",
                            f"--data.cache_dir={tmp_path}", "--batch_size=8"])
    batch = next(iter(build_loader(cfg, dtype=torch.bfloat16, log=lambda *a: None)))
    assert batch.dtype == torch.bfloat16 and batch.shape == (8, 3, 32, 32)
    cfg.batch_size = 23
    with pytest.raises(DataError, match="fewer than one batch of 23"):
        build_loader(cfg, rank=1, world_size=2, log=lambda *a: None)
