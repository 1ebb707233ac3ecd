"""DCGAN generator and discriminator: the reference (plain PyTorch) model and its presets.

Module and parameter names are MMGeneration's DCGANGenerator / DCGANDiscriminator exactly
(mmgen/models/architectures/dcgan/generator_discriminator.py): G `noise2feat`, `upsampling.{i}`,
`output_layer` (the tutorial's to_rgb); D `downsamples.{i}` (block 0 is the tutorial's img2feat),
`output_layer` (its decision head); `conv` and `bn` inside each block, as in mmcv's ConvModule.
So the state_dict of either backend loads in the other, and an MMGen state_dict loads once its
`generator.` / `discriminator.` prefix is stripped (fastgan/convert.py does that, and BGR -> RGB).

backend="torch" runs these modules as written; backend="triton" runs the same parameters and
buffers through the fused kernels (fastgan/fused.py). Switch at any time: `G.backend = "triton"`;
`G.deterministic = True` makes the fused kernels reduce BN statistics without atomics.

Widths: `base_channels` is the width at full resolution (G's last hidden layer, D's first);
it doubles towards 4x4. MMGen at 64x64: G 1024-512-256-128, D 128-256-512-1024.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BACKENDS = ("torch", "triton")
BACKEND_CHOICES = ("auto", *BACKENDS)     # what a config or --backend may say; resolve_backend picks for auto
RESOLUTIONS = (32, 64, 128)               # 4x4 doubled 3, 4 or 5 times
CHANNELS = (1, 3)                         # grayscale, RGB


@dataclass(frozen=True)
class Preset:
    base_channels: int
    noise_size: int
    d_slope: float          # LeakyReLU slope in D
    out_bias: bool          # bias on G.output_layer, D.downsamples.0 and D.output_layer
    bn_weight_mean: float   # BN weight init N(mean, std)
    bn_weight_std: float


PRESETS = {
    # MMGen uses plain nn.LeakyReLU (slope 0.01) and nn.init.normal_ on BN weights (N(0, 1)).
    "mmgen": Preset(base_channels=128, noise_size=100, d_slope=0.01, out_bias=True,
                    bn_weight_mean=0.0, bn_weight_std=1.0),
    "pytorch_examples": Preset(base_channels=64, noise_size=100, d_slope=0.2, out_bias=False,
                               bn_weight_mean=1.0, bn_weight_std=0.02),
}


class ConvModule(nn.Module):
    """conv (k4) -> optional BatchNorm -> optional activation, named like mmcv's ConvModule."""

    def __init__(self, cin, cout, *, transposed, stride, padding, bias, norm, act, slope=0.0):
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(cin, cout, 4, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if norm else None   # eps 1e-5, momentum 0.1
        self.act, self.slope = act, slope                  # act: None | relu | leaky_relu | tanh
        self.transposed, self.stride, self.padding = transposed, stride, padding

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act == "relu":
            x = torch.relu(x)
        elif self.act == "leaky_relu":
            x = nn.functional.leaky_relu(x, self.slope)
        elif self.act == "tanh":
            x = torch.tanh(x)
        return x

    def extra_repr(self):
        return f"act={self.act}" + (f", slope={self.slope}" if self.act == "leaky_relu" else "")


def _num_stages(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {resolution}")
    return int(math.log2(resolution)) - 2       # 4x4 -> resolution in stride-2 steps


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def _check(channels, backend):
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(map(str, CHANNELS))}, got {channels}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _init(module: nn.Module, p: Preset):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, p.bn_weight_mean, p.bn_weight_std)
            nn.init.zeros_(m.bias)


class _DCGAN(nn.Module):
    """What G and D share: the preset, the widths per stage, the attributes the training loop and
    the fused backend read, and running blocks() in either backend."""

    def __init__(self, preset, resolution, channels, backend):
        super().__init__()
        _check(channels, backend)
        self.preset, self.resolution, self.channels, self.backend = preset, resolution, channels, backend
        self.deterministic = False           # fused kernels: no atomics when True

    def _plan(self, base_channels: int | None) -> tuple[Preset, list[int]]:
        """The preset and the widths from full resolution (R/2) down to 4x4."""
        p = _preset(self.preset)
        base = base_channels or p.base_channels
        return p, [base * 2 ** i for i in range(_num_stages(self.resolution))]

    def blocks(self) -> list[ConvModule]:
        raise NotImplementedError

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x)


def run_blocks(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net.blocks() on net.backend; a 1x1 output (D's logits) comes back as (N, C)."""
    if net.backend == "triton":
        from fastgan import fused
        return fused.forward(net, x)
    for blk in net.blocks():
        x = blk(x)
    return x.flatten(1) if x.shape[2:] == (1, 1) else x


class Generator(_DCGAN):
    """z (N, noise_size) or (N, noise_size, 1, 1) -> images (N, channels, R, R) in [-1, 1]."""

    def __init__(self, preset="mmgen", resolution=64, channels=3, base_channels=None, backend="torch"):
        super().__init__(preset, resolution, channels, backend)
        p, widths = self._plan(base_channels)
        widths = widths[::-1]                                              # 4x4 ... R/2
        self.noise_size = p.noise_size
        self.noise2feat = ConvModule(p.noise_size, widths[0], transposed=True, stride=1, padding=0,
                                     bias=False, norm=True, act="relu")
        self.upsampling = nn.Sequential(*[
            ConvModule(widths[i], widths[i + 1], transposed=True, stride=2, padding=1,
                       bias=False, norm=True, act="relu") for i in range(len(widths) - 1)])
        self.output_layer = ConvModule(widths[-1], channels, transposed=True, stride=2, padding=1,
                                       bias=p.out_bias, norm=False, act="tanh")      # the tutorial's to_rgb
        _init(self, p)

    def blocks(self) -> list[ConvModule]:
        return [self.noise2feat, *self.upsampling, self.output_layer]

    def sample_noise(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.noise_size, device=device, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.shape[1:] != (self.noise_size, 1, 1):
            raise ValueError(f"noise must be (N, {self.noise_size}) or (N, {self.noise_size}, 1, 1), got {tuple(z.shape)}")
        return self._run(z)


class Discriminator(_DCGAN):
    """images (N, channels, R, R) -> logits (N, 1)."""

    def __init__(self, preset="mmgen", resolution=64, channels=3, base_channels=None, backend="torch"):
        super().__init__(preset, resolution, channels, backend)
        p, widths = self._plan(base_channels)                              # R/2 ... 4x4
        # Block 0 (the tutorial's img2feat) has a bias and no BN, as in MMGen.
        self.downsamples = nn.Sequential(*[
            ConvModule(channels if i == 0 else widths[i - 1], widths[i], transposed=False, stride=2, padding=1,
                       bias=p.out_bias if i == 0 else False, norm=i > 0, act="leaky_relu", slope=p.d_slope)
            for i in range(len(widths))])
        self.output_layer = ConvModule(widths[-1], 1, transposed=False, stride=1, padding=0,
                                       bias=p.out_bias, norm=False, act=None)         # the decision head
        _init(self, p)

    def blocks(self) -> list[ConvModule]:
        return [*self.downsamples, self.output_layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect = (self.channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"images must be (N, {', '.join(map(str, expect))}), got {tuple(x.shape)}")
        return self._run(x)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """auto -> triton on CUDA, torch elsewhere."""
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {name!r}")
    return name


def model_kwargs(model_cfg, backend: str = "torch") -> dict:
    """Generator's and Discriminator's arguments from a ModelConfig (fastgan.config)."""
    return dict(preset=model_cfg.preset, resolution=model_cfg.resolution, channels=model_cfg.channels,
                base_channels=model_cfg.base_channels, backend=backend)


def build(model_cfg, backend: str = "torch") -> tuple[Generator, Discriminator]:
    """G and D from a ModelConfig (fastgan.config)."""
    kw = model_kwargs(model_cfg, backend)
    return Generator(**kw), Discriminator(**kw)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
