"""The decoded cache: reuse, invalidation, damage, killed builds, holes (~6 s)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgan.config import load
from fastgan.data import build_loader, cache, synthetic
from fastgan.data.torch_loader import decode

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.py"


@pytest.fixture
def setup(tmp_path):
    synthetic.ensure(tmp_path / "faces", 20, num_workers=0, log=lambda *a: None)
    (tmp_path / "faces" / synthetic.MARKER).unlink()
    cfg = load(QUICKSTART, [f"--data.root={tmp_path / 'faces'}", "--data.source=folder", "--data.loader=torch",
                            "--data.cache=host", f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_workers=0",
                            "--batch_size=4"])
    return tmp_path / "faces", tmp_path / "cache", cfg


def run(cfg):
    logs = []
    loader = build_loader(cfg, log=logs.append)
    how = "built" if any("built cache" in line for line in logs) else "loaded" if any(
        "loaded cache" in line for line in logs) else "?"
    return loader, how


def caches(cache_dir):
    return sorted(p.name for p in cache_dir.glob("*.npy"))


def test_cache_is_reused_and_holds_the_decoded_images(setup):
    faces, cache_dir, cfg = setup
    first, how = run(cfg)
    assert how == "built" and len(caches(cache_dir)) == 1
    npy = next(cache_dir.glob("*.npy"))
    stamp = npy.stat().st_mtime_ns
    second, how = run(cfg)
    assert how == "loaded" and npy.stat().st_mtime_ns == stamp
    assert torch.equal(first.images, second.images)
    files = sorted(faces.glob("*.jpg"))
    for i in (0, 7, 19):   # row i is file i, decoded by the recipe
        assert np.array_equal(second.images[i].numpy(), decode(files[i], 3, 32, "resize", None))
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert (meta["count"], meta["listed"], meta["holes"], meta["skipped"]) == (20, 20, [], [])
    # another resolution or recipe is another cache; the first one stays
    cfg.data.recipe = "center_crop"
    assert run(cfg)[1] == "built" and len(caches(cache_dir)) == 2


@pytest.mark.parametrize("change", ["touch", "replace", "add", "remove"])
def test_changed_files_rebuild_the_cache(setup, change):
    faces, cache_dir, cfg = setup
    before, _ = run(cfg)
    target = faces / synthetic.file_name(3)
    if change == "touch":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "replace":
        synthetic.face_image(500).save(target, quality=90)
    elif change == "add":
        synthetic.face_image(501).save(faces / "zz_new.jpg")
    else:
        target.unlink()
    after, how = run(cfg)
    assert how == "built" and len(caches(cache_dir)) == 2
    assert after.num_images == {"add": 21, "remove": 19}.get(change, 20)
    if change == "replace":
        assert not torch.equal(after.images[3], before.images[3])
        assert torch.equal(after.images[4], before.images[4])
        assert np.array_equal(after.images[3].numpy(), decode(target, 3, 32, "resize", None))


@pytest.mark.parametrize("damage", ["truncate", "bad_json", "no_json"])
def test_damaged_cache_is_rebuilt(setup, damage):
    faces, cache_dir, cfg = setup
    good, _ = run(cfg)
    npy = next(cache_dir.glob("*.npy"))
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size - 100)
    elif damage == "bad_json":
        npy.with_suffix(".json").write_text('{"format": 1, "key": ')
    else:
        npy.with_suffix(".json").unlink()
    again, how = run(cfg)
    assert how == "built" and torch.equal(again.images, good.images)


def test_a_killed_build_leaves_no_cache_and_its_leftovers_are_cleaned(setup, monkeypatch):
    faces, cache_dir, cfg = setup
    real = cache.np.lib.format.open_memmap

    def dies_half_way(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        out[:3] = 7
        out.flush()
        shutil.copy(path, f"{path}".replace(f"-{os.getpid()}.tmp", "-999999999.tmp"))   # a dead build's file
        raise KeyboardInterrupt   # what Ctrl-C mid-build raises
    monkeypatch.setattr(cache.np.lib.format, "open_memmap", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert caches(cache_dir) == [] and not list(cache_dir.glob("*.json"))
    assert [p.name.rsplit("-", 1)[-1] for p in cache_dir.glob("*.tmp")] == ["999999999.tmp"]
    monkeypatch.setattr(cache.np.lib.format, "open_memmap", real)
    loader, how = run(cfg)
    assert how == "built" and loader.num_images == 20
    assert not list(cache_dir.glob("*.tmp"))   # the dead build's temp file is gone


def test_files_that_fail_to_decode_become_holes(setup, monkeypatch):
    faces, cache_dir, cfg = setup
    import fastgan.data.torch_loader as tl
    real = tl.decode

    def fails_on_five(path, *spec):
        if Path(path).name == synthetic.file_name(5):
            raise OSError("broken data stream when reading image file")
        return real(path, *spec)
    monkeypatch.setattr(tl, "decode", fails_on_five)
    logs = []
    loader = build_loader(cfg, log=logs.append)
    assert loader.num_images == 19 and list(loader.rows) == [r for r in range(20) if r != 5]
    assert [line for line in logs if line.startswith("warning")] == [
        f"warning: data: skipped 1 of 20 image files in {faces} that cannot be read: "
        f"{synthetic.file_name(5)} (decode failed: OSError: broken data stream when reading image file)"]
    served = torch.cat([b for _, b in zip(range(10 * loader.batches_per_epoch), loader)])
    assert not (served == -1).flatten(1).all(1).any()   # the hole's row (never written: zeros) never shows
