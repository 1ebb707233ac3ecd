"""FID, KID and IS from Inception outputs (features (N, D), logits (N, K)), in float64 torch.

- FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). tr (S1 S2)^1/2 is the sum
  of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a symmetric PSD matrix: two eigh calls,
  no scipy.sqrtm and no complex parts to discard.
- KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel (x.y / D + 1)^3, averaged
  over 100 random subsets of 1000 per set (torch-fidelity's defaults; fewer if there are fewer).
- IS (Salimans et al. 2016): exp E KL(p(y|x) || p(y)) over 10 splits, as torch-fidelity computes it.
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    f = feats.double()
    if f.shape[0] < 2:
        raise ValueError("FID needs at least 2 images")
    mu = f.mean(dim=0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"FID: statistics do not fit: mu {tuple(mu1.shape)} {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} {tuple(sigma2.shape)}")
    s1 = _sqrt_psd(sigma1)
    middle = s1 @ sigma2 @ s1
    middle = (middle + middle.T) / 2          # symmetric up to rounding; eigh reads one triangle
    tr_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_sqrt)


def fid(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(real_feats), *gaussian_stats(fake_feats))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between two equally sized samples, kernel (x.y / D + coef0)^degree: the
    diagonals of K_xx and K_yy are left out, K_xy is kept whole (torch-fidelity's "unbiased")."""
    x, y = x.double(), y.double()
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"KID: samples must be (m, D) of one shape with m >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    k = lambda a, b: (a @ b.T / d + coef0) ** degree                # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid(real_feats: torch.Tensor, fake_feats: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """Mean and std of the unbiased polynomial MMD^2 over random subsets (without replacement).
    Runs where the features are: 100 subsets at D = 2048 are ~1.2 TFLOP in float64."""
    size = min(subset_size, real_feats.shape[0], fake_feats.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 images per set")
    if size == real_feats.shape[0] == fake_feats.shape[0]:
        subsets = 1                        # every "subset" is the whole of both sets: one value
    rng = np.random.RandomState(seed)      # torch-fidelity's draws: the same features give its numbers
    vals = []
    for _ in range(subsets):
        a = real_feats[torch.from_numpy(rng.choice(real_feats.shape[0], size, replace=False)).to(real_feats.device)]
        b = fake_feats[torch.from_numpy(rng.choice(fake_feats.shape[0], size, replace=False)).to(fake_feats.device)]
        vals.append(polynomial_mmd2(a, b))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False))


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Mean and std over `splits` of exp(mean KL(p(y|x) || p(y))); samples shuffled first."""
    n = logits.shape[0]
    splits = min(splits, n)
    if n < 1:
        raise ValueError("IS needs at least 1 image")
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n))     # as torch-fidelity shuffles
    logits = logits[perm.to(logits.device)].double()
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]
        log_q = lp.exp().mean(dim=0).log()
        scores.append((lp.exp() * (lp - log_q)).sum(dim=1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))
