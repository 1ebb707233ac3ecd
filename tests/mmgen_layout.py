"""MMGeneration's DCGAN written out by hand (mmcv naming, trained in BGR), and its checkpoint files.

The modules follow mmgen/models/architectures/dcgan/generator_discriminator.py: mmcv's ConvModule
holds `conv`, `bn` (its name for a BN norm layer) and `activate`; bias='auto' gives a conv a bias
exactly when no norm follows. Weights, BN affine parameters and running statistics are random, so
eval mode uses non-trivial statistics and no channel is like another.

Checkpoints are written the way the frameworks write them:
- mmcv (MMGeneration, the released files): {'meta': {...}, 'state_dict': {...}, 'optimizer': {...}},
  keys `generator.*` / `discriminator.*` (`generator_ema.*` when the model kept an EMA copy);
  optionally with DDP's `module.` in front;
- mmengine (MMagic): the same plus 'message_hub' (mmengine.logging.HistoryBuffer objects, holding
  numpy arrays), 'param_schedulers'; an EMA is `generator_ema.module.*` plus `generator_ema.steps`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types

import numpy as np
import torch
from torch import nn


class ConvModule(nn.Module):
    def __init__(self, cin, cout, stride, padding, *, transposed, norm, act):
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(cin, cout, 4, stride, padding, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.norm = norm
        self.activate = act

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class DCGANGenerator(nn.Module):
    def __init__(self, output_scale=64, out_channels=3, base_channels=1024, noise_size=100):
        super().__init__()
        ups = int(math.log2(output_scale // 4))
        self.noise2feat = ConvModule(noise_size, base_channels, 1, 0, transposed=True, norm=True, act=nn.ReLU())
        ch, blocks = base_channels, []
        for _ in range(ups - 1):
            blocks.append(ConvModule(ch, ch // 2, 2, 1, transposed=True, norm=True, act=nn.ReLU()))
            ch //= 2
        self.upsampling = nn.Sequential(*blocks)
        self.output_layer = ConvModule(ch, out_channels, 2, 1, transposed=True, norm=False, act=nn.Tanh())

    def forward(self, noise):
        return self.output_layer(self.upsampling(self.noise2feat(noise[:, :, None, None])))


class DCGANDiscriminator(nn.Module):
    def __init__(self, input_scale=64, in_channels=3, base_channels=128, out_channels=1):
        super().__init__()
        n = int(math.log2(input_scale // 4))
        self.downsamples = nn.Sequential(*[
            ConvModule(in_channels if i == 0 else base_channels * 2 ** (i - 1), base_channels * 2 ** i, 2, 1,
                       transposed=False, norm=i > 0, act=nn.LeakyReLU()) for i in range(n)])
        self.output_layer = ConvModule(base_channels * 2 ** (n - 1), out_channels, 1, 0, transposed=False,
                                       norm=False, act=None)

    def forward(self, x):
        return self.output_layer(self.downsamples(x)).view(x.shape[0], -1)


class StaticUnconditionalGAN(nn.Module):
    """generator / discriminator (and generator_ema) as MMGen's model holds them."""

    def __init__(self, scale=64, channels=3, g_base=1024, d_base=128, ema=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.generator = DCGANGenerator(scale, channels, g_base)
        self.discriminator = DCGANDiscriminator(scale, channels, d_base)
        if ema == "mmgen":        # MMGen 0.x: a deep copy of the generator
            self.generator_ema = DCGANGenerator(scale, channels, g_base)
        elif ema == "mmagic":     # mmengine's ExponentialMovingAverage wraps it and counts its steps
            self.generator_ema = nn.Module()
            self.generator_ema.module = DCGANGenerator(scale, channels, g_base)
            self.generator_ema.register_buffer("steps", torch.tensor(123))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    m.weight.normal_(0, 0.05)
                    if m.bias is not None:
                        m.bias.normal_(0, 0.3)
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(300000)
        self.eval()

    def ema_generator(self) -> nn.Module:
        ema = self.generator_ema
        return ema.module if hasattr(ema, "module") else ema


@contextlib.contextmanager
def fake_mmengine():
    """A class importable as mmengine.logging.history_buffer.HistoryBuffer while saving; it is gone
    afterwards, as it is where fastgan loads files (mmengine is not installed)."""
    names = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([0.69, 0.71], dtype=np.float64)
            self._count_history = np.array([1, 1])
            self.max_length = 1000000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = names[-1], "HistoryBuffer"
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]].HistoryBuffer = HistoryBuffer
    try:
        yield HistoryBuffer
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def save(model: StaticUnconditionalGAN, path, layout="mmcv", ddp=False):
    """Write `model` as MMGeneration (layout 'mmcv') or MMagic ('mmengine') would."""
    sd = {("module." if ddp else "") + k: v for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    if layout == "mmcv":
        state = {"meta": {"mmcv_version": "1.3.1", "time": "Thu Apr  8 16:16:07 2021", "epoch": 1, "iter": 300000,
                          "config": "model = dict(type='StaticUnconditionalGAN', ...)",
                          "hook_msgs": {"best_score": np.float64(23.26), "last_ckpt": "work_dirs/iter_300000.pth"}},
                 "state_dict": sd, "optimizer": {"generator": opt.state_dict()}}
        torch.save(state, path)
        return
    with fake_mmengine() as HistoryBuffer:
        state = {"meta": {"mmengine_version": "0.10.4", "epoch": 0, "iter": 1500000, "seed": 2022,
                          "experiment_name": "dcgan", "dataset_meta": {}},
                 "state_dict": sd,
                 "message_hub": {"log_scalars": {"train/loss_gen": HistoryBuffer()},
                                 "runtime_info": {"iter": 1500000, "max_iters": 1500002},
                                 "resumed_keys": {"train/loss_gen": True}},
                 "optimizer": {"generator": opt.state_dict()}, "param_schedulers": []}
        torch.save(state, path)
