"""SWD: exact pieces (descriptor windows, 1-D Wasserstein, pyramid levels) and its behaviour
(0 for a set against itself, growing with a known perturbation). ~5 s on 2 CPU cores."""

import pytest
import torch

import fastgan.metrics.swd as swd_mod
from fastgan.metrics.swd import descriptors, laplacian_pyramid, resolutions, sliced_wasserstein, swd


def smooth_images(n, size=32, seed=0):
    """Random low-frequency colour images in [-1, 1]: structure at every pyramid level."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def test_resolutions_follow_mmgen():
    assert resolutions(64) == [64, 32, 16]
    assert resolutions(32) == [32, 16]
    assert resolutions(128) == [128, 64, 32, 16]
    with pytest.raises(ValueError, match="16x16"):
        resolutions(8)


def test_descriptors_are_7x7_windows_of_their_own_image():
    n, c, h, w = 3, 3, 20, 24
    # every pixel encodes (image, channel, row, column)
    code = (torch.arange(n).view(n, 1, 1, 1) * 1_000_000 + torch.arange(c).view(1, c, 1, 1) * 10_000
            + torch.arange(h).view(1, 1, h, 1) * 100 + torch.arange(w).view(1, 1, 1, w)).double()
    d = descriptors(code, torch.Generator().manual_seed(1), per_image=50)
    assert d.shape == (n * 50, c, 7, 7)
    corner = d[:, :, :1, :1]
    rel = d - corner
    assert torch.equal(rel[0, 0], (torch.arange(7).view(7, 1) * 100 + torch.arange(7).view(1, 7)).double())
    assert torch.equal(rel, rel[:1].expand_as(rel))                      # contiguous windows, all channels
    img = (corner[:, 0, 0, 0] // 1_000_000).long()
    assert torch.equal(img, torch.arange(n).repeat_interleave(50))      # 50 from each image, in order
    row, col = (corner[:, 0, 0, 0] % 10_000) // 100, corner[:, 0, 0, 0] % 100
    assert row.min() >= 0 and row.max() <= h - 7 and col.min() >= 0 and col.max() <= w - 7
    assert len(set(zip(row.tolist(), col.tolist()))) > 100              # positions really vary


def test_one_dimensional_sliced_wasserstein_is_w1():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1000, 1, generator=g)
    b = torch.randn(1000, 1, generator=g) * 2 + 0.5
    w1 = (a.flatten().sort().values - b.flatten().sort().values).abs().mean().item()
    # in 1-D every unit direction is +1 or -1, and both give W1
    assert sliced_wasserstein(a, b, torch.Generator().manual_seed(3)) == pytest.approx(w1, rel=1e-5)


def test_laplacian_pyramid_shapes_and_flat_interior():
    x = torch.full((2, 3, 32, 32), 0.3)
    pyr = laplacian_pyramid(x, 2)
    assert [tuple(p.shape) for p in pyr] == [(2, 3, 32, 32), (2, 3, 16, 16)]
    assert pyr[0][..., 8:-8, 8:-8].abs().max() < 1e-6                    # no band-pass detail in a flat image
    assert pyr[1][..., 4:-4, 4:-4].sub(0.3).abs().max() < 1e-6


def test_swd_zero_for_identical_sets_and_grows_with_noise():
    real = smooth_images(32)
    same = swd(real, real.clone())
    assert set(same) == {"swd_32", "swd_16", "swd"}
    assert all(v == 0 for v in same.values())
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(real.shape, generator=g)
    scores = [swd(real, (real + s * noise).clamp(-1, 1))["swd"] for s in (0.02, 0.1, 0.4)]
    assert 0 < scores[0] < scores[1] < scores[2]
    assert scores[2] > 5 * scores[0]


def test_swd_accepts_uint8_and_matches_float():
    real, fake = smooth_images(8, seed=1), smooth_images(8, seed=2)
    q = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)             # noqa: E731
    a = swd(q(real), q(fake))
    b = swd(q(real).float() / 127.5 - 1, q(fake).float() / 127.5 - 1)
    assert a == pytest.approx(b, rel=1e-6)
    assert swd(real, fake, seed=0) == swd(real, fake, seed=0)           # seeded: repeatable


def test_swd_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="one shape"):
        swd(torch.zeros(4, 3, 32, 32), torch.zeros(5, 3, 32, 32))
    assert swd_mod.NHOODS_PER_IMAGE == 128 and swd_mod.DIR_REPEATS * swd_mod.DIRS_PER_REPEAT == 512
