"""MS-SSIM: 1 for identical images, equal to a direct (windowed-sum, float64 numpy) computation of
Wang et al.'s formula with MMGen's settings, and the consecutive pairing MMGen scores. ~2 s."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from fastgan.metrics.ms_ssim import ms_ssim, ms_ssim_pairs


def direct_ms_ssim(a, b):
    """One pair, (C, H, W) float64, straight from the definition (no convolution routine)."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssims, css = [], []
    for _ in weights:
        size = min(11, a.shape[1], a.shape[2])
        sigma = size * 1.5 / 11
        t = np.arange(size) - (size - 1) / 2
        win = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
        win /= win.sum()
        avg = lambda x: (sliding_window_view(x, (size, size), axis=(1, 2)) * win).sum(axis=(-2, -1))  # noqa: E731
        mu_a, mu_b = avg(a), avg(b)
        var_a, var_b = avg(a * a) - mu_a ** 2, avg(b * b) - mu_b ** 2
        cov = avg(a * b) - mu_a * mu_b
        cs = (2 * cov + c2) / (var_a + var_b + c2)
        lum = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
        ssims.append(max((lum * cs).mean(), 0))
        css.append(max(cs.mean(), 0))
        a = (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]) / 4
        b = (b[:, 0::2, 0::2] + b[:, 1::2, 0::2] + b[:, 0::2, 1::2] + b[:, 1::2, 1::2]) / 4
    return np.prod([c ** w for c, w in zip(css[:-1], weights[:-1])]) * ssims[-1] ** weights[-1]


def related_pairs(n, size=32, strength=40, seed=0):
    """uint8 image pairs that share structure (so every term is positive and nontrivial)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 255, size=(size, size),
                                           mode="bilinear", align_corners=False)
    x = (base + strength * torch.randn(base.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    y = (base + strength * torch.randn(base.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return x, y


def test_identical_images_score_one():
    x, _ = related_pairs(3)
    assert torch.allclose(ms_ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-5)


def test_matches_direct_computation():
    x, y = related_pairs(3, size=32)
    got = ms_ssim(x, y).numpy()
    want = np.array([direct_ms_ssim(x[i].double().numpy(), y[i].double().numpy()) for i in range(3)])
    assert 0.05 < want.min() and want.max() < 0.99          # a case where the value means something
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_more_noise_less_similar():
    scores = [ms_ssim(*related_pairs(4, strength=s, seed=1)).mean().item() for s in (5, 30, 90)]
    assert scores[0] > scores[1] > scores[2]


def test_pairs_are_consecutive_images():
    x, y = related_pairs(2, seed=2)
    images = torch.stack([x[0], x[0], y[1], x[1]])               # pairs (0, 1) and (2, 3)
    want = (1.0 + ms_ssim(y[1:2], x[1:2]).item()) / 2
    assert ms_ssim_pairs(images) == pytest.approx(want, rel=1e-6)
    assert ms_ssim_pairs(torch.cat([images, x[:1]]), batch_size=3) == pytest.approx(want, rel=1e-6)  # odd one out


def test_rejects_float_and_tiny_images():
    with pytest.raises(ValueError, match="uint8"):
        ms_ssim_pairs(torch.rand(4, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 16"):
        ms_ssim(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
