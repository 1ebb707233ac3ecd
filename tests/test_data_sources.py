"""Data sources: synthetic faces, folder listing, idx files, recipes, mode conversion (~6 s)."""

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan.config import load
from fastgan.data import DataError, build_loader, synthetic, transforms
from fastgan.data.sources import convert, list_folder, read_idx

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.py"


def cfg_for(tmp_path, *overrides):
    return load(QUICKSTART, [f"--data.cache_dir={tmp_path / 'cache'}", "--data.num_workers=0", *overrides])


def test_synthetic_faces_are_celeba_like_deterministic_and_idempotent(tmp_path):
    logs = []
    paths = synthetic.ensure(tmp_path / "faces", 48, num_workers=2, log=logs.append)
    assert [p.name for p in paths[:2]] == ["000001.jpg", "000002.jpg"] and len(logs) == 1
    sizes = [p.stat().st_size for p in paths]
    assert 5_000 < np.mean(sizes) < 11_000, np.mean(sizes)       # CelebA's JPEGs: ~7-10 KB
    images = [Image.open(p) for p in paths]
    assert all(im.size == (178, 218) and im.format == "JPEG" and im.mode == "RGB" for im in images)
    arrays = np.stack([np.asarray(im, np.float32) for im in images])
    # varied: every pair of faces differs clearly, and colours spread widely across the set
    flat = arrays[:, ::4, ::4].reshape(len(arrays), -1)
    dist = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert dist[~np.eye(len(arrays), dtype=bool)].min() > 10
    assert arrays.mean(axis=(1, 2)).std(axis=0).min() > 15
    # the face sits in the middle: the centre differs from the background corners in most images
    centre = arrays[:, 105:135, 70:108].mean(axis=(1, 2))
    corners = arrays[:, :20, :20].mean(axis=(1, 2))
    assert (np.abs(centre - corners).sum(-1) > 30).mean() > 0.8
    # deterministic: the same index draws the same image, byte for byte once encoded
    again = io.BytesIO()
    synthetic.face_image(5).save(again, format="JPEG", quality=90)
    assert again.getvalue() == paths[5].read_bytes()
    # idempotent: nothing rewritten; a lost file (and marker) comes back byte for byte
    stamps = [p.stat().st_mtime_ns for p in paths]
    synthetic.ensure(tmp_path / "faces", 48, log=logs.append)
    assert [p.stat().st_mtime_ns for p in paths] == stamps and len(logs) == 1
    data = paths[7].read_bytes()
    paths[7].unlink()
    (tmp_path / "faces" / synthetic.MARKER).unlink()
    synthetic.ensure(tmp_path / "faces", 48, log=logs.append)
    assert paths[7].read_bytes() == data and paths[8].stat().st_mtime_ns == stamps[8]
    assert not list((tmp_path / "faces").glob("*.tmp"))


def test_synthetic_source_through_build_loader(tmp_path):
    cfg = cfg_for(tmp_path, f"--data.root={tmp_path / 'syn'}", "--data.synthetic_count=80", "--batch_size=16",
                  "--data.loader=torch", "--data.cache=off")
    loader = build_loader(cfg, log=lambda *a: None)
    assert (loader.num_images, loader.batches_per_epoch, loader.name) == (80, 5, "torch (0 workers)")
    batch = next(iter(loader))
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == torch.float32
    assert -1 <= batch.min() < -0.5 and 0.5 < batch.max() <= 1


def test_folder_listing_is_recursive_sorted_and_ignores_other_files(tmp_path):
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    for rel in ["b/2.JPG", "a/1.jpeg", "a/deep/3.png", "0.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / rel, format="PNG" if rel.endswith("png") else "JPEG")
    for rel in ["notes.txt", ".DS_Store", "a/labels.csv", "b/thumbs.db", "a/x.gif"]:
        (tmp_path / rel).write_bytes(b"\x00\x01 not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in list_folder(tmp_path)] == \
        ["0.jpg", "a/1.jpeg", "a/deep/3.png", "b/2.JPG"]
    with pytest.raises(DataError, match="is not a folder"):
        list_folder(tmp_path / "missing")


def write_idx(path, images, compress):
    data = b"\x00\x00\x08\x03" + struct.pack(">3I", *images.shape) + images.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("channels", [1, 3])
def test_idx_source(tmp_path, channels):
    rng = np.random.default_rng(channels)
    train = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), False)
    assert np.array_equal(read_idx(tmp_path), train)     # a folder: the training file
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (30, 28, 28)
    cfg = cfg_for(tmp_path, "--data.source=idx", f"--data.root={tmp_path}", f"--model.channels={channels}",
                  "--batch_size=8")
    loader = build_loader(cfg, log=lambda *a: None)
    assert (loader.num_images, loader.batches_per_epoch) == (40, 5)
    batch = next(iter(loader))
    assert batch.shape == (8, channels, 32, 32)
    idx, _ = loader.schedule.rank_epoch(0)
    want = np.asarray(Image.fromarray(train[idx[0]]).resize((32, 32), Image.BILINEAR), np.float32)
    assert torch.equal(batch[0, -1], transforms.normalize(torch.from_numpy(want.astype(np.uint8))))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*-images-idx3-ubyte"):
        read_idx(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("recipe,crop,box", [
    ("resize", None, (0, 0, 178, 218)),
    ("center_crop", None, (0, 20, 178, 198)),
    ("center_crop", 140, (19, 39, 159, 179)),
    ("center_crop", 500, (0, 20, 178, 198)),
])
def test_recipes(recipe, crop, box):
    assert transforms.crop_box(178, 218, recipe, crop) == box
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8))
    out = transforms.apply(img, 64, recipe, crop)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    ref = np.asarray(img.crop(box).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(out, ref)


def test_normalize_maps_uint8_onto_minus_one_one():
    x = torch.arange(256, dtype=torch.uint8)
    y = transforms.normalize(x)
    assert y[0] == -1 and y[255] == 1 and torch.all(y[1:] > y[:-1])
    assert torch.allclose(y, x.double().div(127.5).sub(1).float(), atol=1.2e-7)
    assert transforms.normalize(x, torch.bfloat16).dtype == torch.bfloat16


def test_modes_convert_to_the_configured_channels():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    g16 = rng.integers(0, 65536, (6, 5)).astype(np.uint16)
    cases = {
        "L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "CMYK": rgb.convert("CMYK"),
        "P": rgb.convert("P"), "1": rgb.convert("1"), "I;16": Image.fromarray(g16), "F": rgb.convert("F"),
        "LA": rgb.convert("LA"),
    }
    for mode, img in cases.items():
        for channels, want in ((3, "RGB"), (1, "L")):
            out = convert(img, channels)
            assert out.mode == want and out.size == (5, 6), (mode, channels)
    assert np.array_equal(np.asarray(convert(cases["RGBA"], 3)), np.asarray(rgb))     # alpha dropped
    scaled = np.asarray(convert(cases["I;16"], 1)).astype(int)
    assert np.array_equal(scaled, (g16.astype(int) * 255 + 32767) // 65535)          # scaled, not clipped
    grey = np.asarray(convert(cases["L"], 3))
    assert np.array_equal(grey[..., 0], grey[..., 2]) and grey.std() > 10
