"""FID against closed forms for Gaussians, KID's unbiasedness, IS on toy logits. ~3 s."""

import math

import numpy as np
import pytest
import torch

from fastgan.metrics.fid import fid, frechet_distance, gaussian_stats, inception_score, kid, polynomial_mmd2


def random_spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fid_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    want = 1 + 0 + 4 + ((v1.sqrt() - v2.sqrt()) ** 2).sum().item()    # |dmu|^2 + sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_fid_general_covariances_match_eigenvalues_of_product():
    g = torch.Generator().manual_seed(0)
    d = 16
    s1, s2 = random_spd(d, g), random_spd(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # tr sqrt(S1 S2) = sum of square roots of the (real, positive) eigenvalues of S1 S2
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1.numpy() @ s2.numpy()).real).sum()
    want = ((mu1 - mu2) ** 2).sum().item() + torch.trace(s1).item() + torch.trace(s2).item() - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_of_gaussian_samples_approaches_closed_form():
    g = torch.Generator().manual_seed(1)
    d, n = 4, 200_000
    s1, s2 = random_spd(d, g), random_spd(d, g)
    mu2 = torch.full((d,), 0.5, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T + mu2
    want = frechet_distance(torch.zeros(d), s1, mu2, s2)
    assert fid(x, y) == pytest.approx(want, rel=0.03)
    mu, cov = gaussian_stats(x)
    assert torch.allclose(cov, s1, atol=0.02)


def test_kid_is_unbiased():
    """Samples drawn with replacement from two small finite sets: the estimator's mean over many
    draws must equal the exact MMD^2 of the two uniform distributions (diagonals included)."""
    g = torch.Generator().manual_seed(2)
    d = 4
    A, B = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(5, d, generator=g, dtype=torch.float64) + 0.3
    k = lambda a, b: (a @ b.T / d + 1) ** 3                                    # noqa: E731
    exact = (k(A, A).mean() + k(B, B).mean() - 2 * k(A, B).mean()).item()
    m, trials = 8, 3000
    est, biased = [], []
    for _ in range(trials):
        x, y = A[torch.randint(5, (m,), generator=g)], B[torch.randint(5, (m,), generator=g)]
        est.append(polynomial_mmd2(x, y))
        biased.append((k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item())
    est, biased = np.array(est), np.array(biased)
    se = est.std() / math.sqrt(trials)
    assert abs(est.mean() - exact) < 4 * se
    assert abs(biased.mean() - exact) > 4 * se          # the naive estimate would fail this test


def test_kid_near_zero_for_one_distribution_and_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, _ = kid(x, y, subsets=20, subset_size=200)
    shifted, std = kid(x, y + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.05 * shifted and shifted > 0 and std >= 0


def test_inception_score_toy_cases():
    n, k = 700, 7
    confident = torch.full((n, 10), -30.0)
    confident[torch.arange(n), torch.arange(n) % k] = 30.0                 # sure, and spread evenly over 7 classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    mean, std = inception_score(confident)                                 # 10 shuffled splits of 70: uneven
    assert 6.0 < mean < k and std > 0
    one_class = torch.full((n, 10), -30.0)
    one_class[:, 3] = 30.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(n, 10)                                           # unsure about everything
    assert inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_definition():
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    p = torch.softmax(logits, 1).numpy()
    py = p.mean(0)
    want = math.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1)))
    assert inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-9)
