"""The bad-file battery through every loader path (~8 s).

Unusable files (zero bytes, truncated, random bytes, HTML saved as .jpg, a dangling link) are
skipped and named in one warning; grayscale, RGBA, CMYK, palette and 16-bit images are converted
and used; other files are ignored; nothing usable is a clear error naming the folder.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan.config import load
from fastgan.data import DataError, build_loader, dali, synthetic

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.py"
UNUSABLE = {"zero.jpg": "empty file", "truncated.jpg": "truncated", "random.jpg": "not an image",
            "page.jpg": "not an image", "dangling.jpg": "broken link"}
CONVERTED = ["gray.jpg", "rgba.png", "cmyk.jpg", "palette.png", "sixteen.png", "png_named.jpg"]
PATHS = [("torch", "off"), ("torch", "host"), ("dali", "host"), ("dali", "off")]


def write_battery(folder: Path, good: int = 24) -> None:
    rng = np.random.default_rng(7)
    synthetic.ensure(folder / "faces", good, num_workers=0, log=lambda *a: None)
    face = synthetic.face_image(1000)
    odd = folder / "odd"
    odd.mkdir()
    (odd / "zero.jpg").touch()
    data = (folder / "faces" / synthetic.file_name(0)).read_bytes()
    (odd / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (odd / "random.jpg").write_bytes(rng.bytes(6000))
    (odd / "page.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    os.symlink(odd / "gone.jpg", odd / "dangling.jpg")
    face.convert("L").save(odd / "gray.jpg")
    face.convert("RGBA").save(odd / "rgba.png")
    face.convert("CMYK").save(odd / "cmyk.jpg")
    face.convert("P").save(odd / "palette.png")
    grey16 = (np.asarray(face.convert("L"), np.uint32) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(odd / "sixteen.png")
    face.save(odd / "png_named.jpg", format="PNG")      # the content, not the name, decides
    for name in ["notes.txt", ".DS_Store", "list_attr_celeba.csv", "README"]:
        (odd / name).write_text("not an image\n")
    (odd / "sub").mkdir()
    (odd / "sub" / "manifest.json").write_text("{}")


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("battery")
    write_battery(folder)
    return folder


@pytest.mark.parametrize("kind,cache", PATHS, ids=[f"{k}-{c}" for k, c in PATHS])
def test_bad_files_are_skipped_named_once_and_odd_modes_used(battery, tmp_path, kind, cache):
    if kind == "dali" and not dali.available():
        pytest.skip("NVIDIA DALI is not importable here")
    cfg = load(QUICKSTART, [f"--data.root={battery}", "--data.source=folder", f"--data.loader={kind}",
                            f"--data.cache={cache}", f"--data.cache_dir={tmp_path}", "--data.num_workers=2",
                            "--batch_size=10", "--data.flip=true"])
    logs = []
    loader = build_loader(cfg, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning")]
    assert len(warnings) == 1, logs
    assert f"skipped {len(UNUSABLE)} of 35 image files" in warnings[0]
    assert sorted(Path(f).name for f, _ in loader.skipped) == sorted(UNUSABLE)
    assert {Path(f).name: why for f, why in loader.skipped} == UNUSABLE
    assert loader.num_images == 24 + len(CONVERTED) and loader.batches_per_epoch == 3
    seen = 0
    for i, batch in zip(range(4), loader):   # past one epoch
        assert batch.shape == (10, 3, 32, 32) and torch.isfinite(batch).all()
        assert batch.min() >= -1 and batch.max() <= 1
        seen += 1
    assert seen == 4


def test_nothing_usable_is_a_clear_error(tmp_path):
    def loader_for(folder, cache="host"):
        cfg = load(QUICKSTART, [f"--data.root={folder}", "--data.source=folder", f"--data.cache={cache}",
                                f"--data.cache_dir={tmp_path / 'cache'}", "--data.loader=torch"])
        return build_loader(cfg, log=lambda *a: None)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"no .jpg/.jpeg/.png files in {tmp_path / 'empty'}"):
        loader_for(tmp_path / "empty")
    with pytest.raises(DataError, match="is not a folder"):
        loader_for(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").touch()
    (broken / "b.png").write_text("<html></html>")
    for cache in ("host", "off"):
        with pytest.raises(DataError, match=f"no usable image in {broken}") as err:
            loader_for(broken, cache)
        assert isinstance(err.value, ValueError)
    assert not list((tmp_path / "cache").glob("*.npy"))   # a failed build leaves no cache behind
