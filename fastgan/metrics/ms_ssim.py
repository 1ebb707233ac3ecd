"""MS-SSIM between image pairs, with the settings MMGeneration (after PGGAN and Wang et al. 2003)
uses to measure the diversity of a generator: images as uint8 values (max_val 255), an 11x11
Gaussian window with sigma 1.5 ("valid" filtering; both shrink to the image at coarse scales),
k1 0.01, k2 0.03, five scales joined by 2x2 averaging, weights 0.0448 0.2856 0.3001 0.2363 0.1333,
SSIM and contrast terms averaged over channels and pixels of each pair and clipped at 0.

`ms_ssim_pairs(images)` scores consecutive pairs (0, 1), (2, 3), ... of generated images, as
MMGen's MS_SSIM metric does: unrelated samples look alike when the generator has collapsed,
so lower is more diverse (MMGen's DCGAN on CelebA-cropped 64: 0.2899).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang et al.; they do not sum to 1


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised size x size Gaussian; an even size is centred between pixels."""
    half = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float64) - half
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, max_val: float, size: int, sigma: float,
             k1: float, k2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and contrast-structure term of each pair: (N,), (N,)."""
    h, w = x.shape[-2:]
    size_ = min(size, h, w)
    sigma_ = size_ * sigma / size            # sigma shrinks with the window
    c = x.shape[1]
    win = gaussian_window(size_, sigma_).to(x).expand(c, 1, size_, size_)
    blur = lambda t: F.conv2d(t, win, groups=c)                     # noqa: E731  "valid"
    mu1, mu2 = blur(x), blur(y)
    s11 = blur(x * x) - mu1 * mu1
    s22 = blur(y * y) - mu2 * mu2
    s12 = blur(x * y) - mu1 * mu2
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    v1, v2 = 2 * s12 + c2, s11 + s22 + c2
    ssim = ((2 * mu1 * mu2 + c1) * v1) / ((mu1 * mu1 + mu2 * mu2 + c1) * v2)
    return ssim.mean(dim=(1, 2, 3)), (v1 / v2).mean(dim=(1, 2, 3))


def _halve(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) * 0.25


def ms_ssim(x: torch.Tensor, y: torch.Tensor, max_val: float = 255.0, size: int = 11, sigma: float = 1.5,
            k1: float = 0.01, k2: float = 0.03, weights=WEIGHTS) -> torch.Tensor:
    """MS-SSIM of each pair x[i], y[i]: (N, C, H, W) with values in [0, max_val] -> (N,) float."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"MS-SSIM needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < 2 ** (len(weights) - 1):
        raise ValueError(f"MS-SSIM with {len(weights)} scales needs images of at least "
                         f"{2 ** (len(weights) - 1)} pixels a side, got {tuple(x.shape[-2:])}")
    x, y = x.float(), y.float()
    ssims, css = [], []
    for _ in weights:
        s, cs = _ssim_cs(x, y, max_val, size, sigma, k1, k2)
        ssims.append(s.clamp(min=0))          # clipped, or a negative term to a fractional power is NaN
        css.append(cs.clamp(min=0))
        x, y = _halve(x), _halve(y)
    w = torch.tensor(weights, dtype=torch.float64, device=x.device)
    cs = torch.stack(css[:-1]).double() ** w[:-1, None]
    return cs.prod(dim=0) * ssims[-1].double() ** w[-1]


@torch.no_grad()
def ms_ssim_pairs(images: torch.Tensor, batch_size: int = 512) -> float:
    """Mean MS-SSIM over the pairs (0, 1), (2, 3), ... of uint8 images (N, C, H, W); an odd last
    image is left out."""
    if images.dtype != torch.uint8:
        raise ValueError(f"ms_ssim_pairs takes uint8 images, got {images.dtype}")
    pairs = images.shape[0] // 2
    if pairs < 1:
        raise ValueError("MS-SSIM needs at least 2 images")
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    batch_size -= batch_size % 2
    for i in range(0, 2 * pairs, batch_size):
        chunk = images[i:min(i + batch_size, 2 * pairs)]
        total += ms_ssim(chunk[0::2], chunk[1::2]).sum()
    return total.item() / pairs
