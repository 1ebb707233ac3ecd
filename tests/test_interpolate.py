"""Latent walks: slerp/lerp, walks that start and end at G of their end latents, and
`sample.py --interpolate` as a user runs it (~10 s, most of it two script runs)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastgan import checkpoint as ck
from fastgan import images, interpolate
from fastgan.config import Config, ModelConfig, save
from fastgan.models import build
from parity import fresh_seed
from runs import run_sample

ROOT = Path(__file__).resolve().parents[1]


def trained_looking_G(seed: int):
    """A tiny G in eval mode with images of std ~0.4 (at its N(0, 0.02) init they are ~1e-4, too
    flat to tell a walk's images apart): wider weights, BN running statistics of one batch."""
    torch.manual_seed(seed)
    G, _ = build(ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=4))
    for m in G.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0, 1 / (m.weight.shape[0] * 4) ** 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None          # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        G(torch.randn(64, G.noise_size))
    return G.eval()


def test_slerp_and_lerp():
    gen = torch.Generator().manual_seed(fresh_seed())
    a, b = torch.randn(5, 100, generator=gen), torch.randn(5, 100, generator=gen)
    t = torch.linspace(0, 1, 7)
    for fn in (interpolate.slerp, interpolate.lerp):
        path = fn(a, b, t)
        assert path.shape == (5, 7, 100)
        assert torch.equal(path[:, 0], a) and torch.equal(path[:, -1], b)
    torch.testing.assert_close(interpolate.lerp(a, b, t)[:, 3], (a + b) / 2)
    # slerp between unit vectors stays on the sphere, its angle to the start growing linearly in t.
    ua, ub = (x.double() / x.double().norm(dim=1, keepdim=True) for x in (a, b))
    path = interpolate.slerp(ua, ub, t)
    omega = torch.acos((ua * ub).sum(1))
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(5, 7, dtype=torch.float64))
    for k in range(7):
        angle = torch.acos((path[:, k] * ua).sum(1).clamp(-1, 1))
        torch.testing.assert_close(angle, omega * float(t[k]), rtol=0, atol=1e-6)
    mid = interpolate.slerp(torch.eye(2)[:1], torch.eye(2)[1:], torch.tensor([0.0, 0.5, 1.0]))[0, 1]
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # Parallel ends (sin(omega) = 0) fall back to lerp instead of dividing by zero.
    same = interpolate.slerp(a[:1], 2 * a[:1], t)
    torch.testing.assert_close(same, interpolate.lerp(a[:1], 2 * a[:1], t))


@pytest.mark.parametrize("mode", interpolate.MODES)
def test_walks_start_and_end_at_G_of_their_end_latents(mode):
    seed = fresh_seed()
    G = trained_looking_G(seed)
    n, k = 3, 5
    z = interpolate.walk_latents(G, n, k, seed=seed, mode=mode)
    walks = interpolate.draw(G, z, "cpu", batch_size=4).view(n, k, 3, 32, 32)   # chunks cut across walks
    ends = G.sample_noise(2 * n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        starts, stops = G(ends[:n]), G(ends[n:])
    # Same latents, G in eval mode: equal up to float summation order across batch sizes.
    torch.testing.assert_close(walks[:, 0], starts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(walks[:, -1], stops, rtol=1e-5, atol=1e-6)
    middle = walks[:, k // 2]
    assert starts.std() > 0.1 and (middle - starts).abs().mean() > 0.02 and (middle - stops).abs().mean() > 0.02
    with pytest.raises(ValueError, match="at least 2 steps"):
        interpolate.walk_latents(G, 1, 1)


def test_sample_interpolate_grid_and_gif(tmp_path):
    seed = int(torch.randint(0, 1000, ()))
    G = trained_looking_G(seed)
    cfg = Config(model=ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=4))
    save(cfg, tmp_path / "config.json")
    ck.save_generator(G, cfg, tmp_path / "generator.safetensors")
    out = run_sample(tmp_path / "config.json", tmp_path / "generator.safetensors", "--interpolate", 3, "--steps", 4,
                     "--seed", seed, "--out", tmp_path / "walk.png")
    assert "3 slerp walks of 4 images" in out.stdout
    grid = np.asarray(Image.open(tmp_path / "walk.png")).astype(int)
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)                 # a row per walk, a column per step
    ends = G.sample_noise(6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = images.to_uint8(torch.cat([G(ends[:3]), G(ends[3:])])).astype(int)
    for w in range(3):
        first, last = grid[2 + 34 * w:34 + 34 * w, 2:34], grid[2 + 34 * w:34 + 34 * w, 2 + 3 * 34:34 + 3 * 34]
        assert np.abs(first - want[w]).max() <= 1 and np.abs(last - want[3 + w]).max() <= 1   # rounding to 8 bits

    run_sample(tmp_path / "config.json", tmp_path, "--interpolate", 5, "--steps", 6, "--lerp", "--seed", seed,
               "--out", tmp_path / "walk.gif")
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 6 + 4                                  # there and back: 0..5, 4..1
        assert gif.size == (3 * 34 + 2, 2 * 34 + 2)                   # 5 walks in a 3 x 2 grid


@pytest.mark.parametrize("args, message", [
    (["--steps", "4"], "--steps and --lerp go with --interpolate N"),
    (["--lerp"], "--steps and --lerp go with --interpolate N"),
    (["--interpolate", "2", "--steps", "1"], "--steps must be at least 2"),
    (["--interpolate", "0"], "--interpolate must be at least 1"),
])
def test_sample_interpolate_errors(args, message, capsys):
    from fastgan.sample import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["config.json", "ckpt", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
