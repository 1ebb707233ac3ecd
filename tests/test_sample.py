"""The sampling demo run as a user runs it, and the grid writer (~15 s: three script runs)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import checkpoint as ck
from fastgan import images
from fastgan.config import Config, ModelConfig, save, to_dict
from fastgan.models import build
from runs import run_sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def run_files(tmp_path):
    """A work_dir as training leaves it: config.json, ckpt/iter_N.pt, generator.safetensors."""
    cfg = Config(work_dir=str(tmp_path), model=ModelConfig(preset="mmgen", resolution=32, channels=3,
                                                           base_channels=4))
    G, D = build(cfg.model)
    G(torch.randn(8, G.noise_size))         # move the BN running statistics off their init
    save(cfg, tmp_path / "config.json")
    ck.save({"iteration": 3, "G": G.state_dict(), "D": D.state_dict(), "opt_g": {}, "opt_d": {},
             "config": to_dict(cfg)}, tmp_path / "ckpt" / "iter_3.pt")
    ck.save_generator(G, cfg, tmp_path / "generator.safetensors")
    return tmp_path


def test_sample_from_pt_and_safetensors(run_files, tmp_path):
    a, b = tmp_path / "from_pt.png", tmp_path / "from_st.png"
    out = run_sample(run_files / "config.json", run_files / "ckpt" / "iter_3.pt",
                     "--num-samples", 6, "--nrow", 3, "--seed", 5, "--out", a, "--each", tmp_path / "each")
    assert "6 samples" in out.stdout
    run_sample(run_files / "config.json", run_files / "generator.safetensors",
               "--num-samples", 6, "--nrow", 3, "--seed", 5, "--out", b, "--device", "cpu")
    grid = np.asarray(Image.open(a))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)          # 2 rows x 3 columns of 32 px, 2 px padding
    assert np.array_equal(grid, np.asarray(Image.open(b)))     # same weights, same seed, same images
    each = sorted((tmp_path / "each").iterdir())
    assert [p.name for p in each] == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(each[0]).size == (32, 32)
    assert np.array_equal(np.asarray(Image.open(each[4])), grid[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32])
    assert grid.std() > 1                                     # not a blank image


def test_sample_errors(run_files, tmp_path):
    out = run_sample(run_files / "config.json", tmp_path / "nope.pt", check=False)
    assert out.returncode != 0 and "checkpoint not found" in out.stderr
    out = run_sample(ROOT / "configs" / "quickstart.py", run_files / "generator.safetensors",
                     "--out", tmp_path / "x.png", check=False)
    assert out.returncode != 0 and "does not fit the configured model" in out.stderr
    assert not (tmp_path / "x.png").exists()


def test_make_grid_layout():
    x = torch.rand(5, 1, 4, 6) * 2 - 1
    grid = images.make_grid(x, nrow=2, padding=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 1)
    tiles = images.to_uint8(x)
    assert np.array_equal(grid[1:5, 8:14], tiles[1])          # row 0, column 1
    assert np.array_equal(grid[11:15, 1:7], tiles[4])         # row 2, column 0
    assert grid[0].max() == 0 and grid[11:15, 8:14].max() == 0   # padding and the empty last cell
    assert images.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 7.0]).view(1, 1, 1, 4)).ravel().tolist() == [0, 128, 255, 255]
