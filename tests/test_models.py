"""Reference DCGAN: parameter counts, shapes, names and each preset's init (about 5 s on 2 cores)."""

import math

import pytest
import torch
from torch import nn

from fastgan.config import ModelConfig
from fastgan.models import PRESETS, Discriminator, Generator, build, num_params, resolve_backend


def expected_params(preset: str, resolution: int, channels: int, base=None) -> tuple[int, int]:
    """Counted from the README's layer table, independently of the module code: k4 convs,
    BN (weight + bias) after every hidden conv, biases on the outer convs for mmgen."""
    p = PRESETS[preset]
    base = base or p.base_channels
    stages = int(math.log2(resolution)) - 2
    bias = 1 if p.out_bias else 0
    g_widths = [base * 2 ** i for i in reversed(range(stages))]
    g = p.noise_size * g_widths[0] * 16 + 2 * g_widths[0]
    g += sum(a * b * 16 + 2 * b for a, b in zip(g_widths, g_widths[1:]))
    g += g_widths[-1] * channels * 16 + bias * channels
    d_widths = [base * 2 ** i for i in range(stages)]
    d = channels * d_widths[0] * 16 + bias * d_widths[0]
    d += sum(a * b * 16 + 2 * b for a, b in zip(d_widths, d_widths[1:]))
    d += d_widths[-1] * 16 + bias
    return g, d


def test_published_parameter_counts():
    G, D = build(ModelConfig(preset="mmgen", resolution=64, channels=3))
    assert (num_params(G), num_params(D)) == (12_658_435, 11_036_289)      # the README's figures, MMGen
    G, D = build(ModelConfig(preset="pytorch_examples", resolution=64, channels=3))
    assert (num_params(G), num_params(D)) == (3_576_704, 2_765_568)        # pytorch/examples dcgan


@pytest.mark.parametrize("preset", ["mmgen", "pytorch_examples"])
@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_counts_and_shapes(preset, resolution, channels):
    base = 8      # narrow: shapes and counts do not depend on width beyond the formula
    G = Generator(preset, resolution, channels, base_channels=base)
    D = Discriminator(preset, resolution, channels, base_channels=base)
    assert (num_params(G), num_params(D)) == expected_params(preset, resolution, channels, base)
    n = int(torch.randint(1, 4, ()))
    z = G.sample_noise(n)
    assert z.shape == (n, G.noise_size)
    x = G(z)
    assert x.shape == (n, channels, resolution, resolution)
    assert x.abs().max() <= 1.0                                            # tanh
    torch.testing.assert_close(G(z[:, :, None, None]), x)                  # (N, nz, 1, 1) noise too
    logits = D(x)
    assert logits.shape == (n, 1)
    assert torch.isfinite(logits).all()


def test_module_names_follow_mmgen():
    G, D = build(ModelConfig(preset="mmgen", resolution=64, channels=3))
    g_keys, d_keys = set(G.state_dict()), set(D.state_dict())
    # MMGeneration's keys and shapes exactly (its DCGANGenerator / DCGANDiscriminator at 64x64x3).
    g_shapes = {k: list(v.shape) for k, v in G.state_dict().items()}
    d_shapes = {k: list(v.shape) for k, v in D.state_dict().items()}
    assert g_shapes["noise2feat.conv.weight"] == [100, 1024, 4, 4]
    assert g_shapes["output_layer.conv.weight"] == [128, 3, 4, 4] and g_shapes["output_layer.conv.bias"] == [3]
    assert d_shapes["downsamples.0.conv.weight"] == [128, 3, 4, 4] and d_shapes["downsamples.0.conv.bias"] == [128]
    assert d_shapes["downsamples.1.bn.running_var"] == [256]
    assert d_shapes["output_layer.conv.weight"] == [1, 1024, 4, 4] and d_shapes["output_layer.conv.bias"] == [1]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert list(g_keys) and g_keys == {"noise2feat.conv.weight", *(f"noise2feat.bn.{n}" for n in bn),
                                       *(f"upsampling.{i}.conv.weight" for i in range(3)),
                                       *(f"upsampling.{i}.bn.{n}" for i in range(3) for n in bn),
                                       "output_layer.conv.weight", "output_layer.conv.bias"}
    assert d_keys == {"downsamples.0.conv.weight", "downsamples.0.conv.bias",
                      *(f"downsamples.{i}.conv.weight" for i in range(1, 4)),
                      *(f"downsamples.{i}.bn.{n}" for i in range(1, 4) for n in bn),
                      "output_layer.conv.weight", "output_layer.conv.bias"}
    assert [b.conv.out_channels for b in G.blocks()] == [1024, 512, 256, 128, 3]
    assert [b.conv.out_channels for b in D.blocks()] == [128, 256, 512, 1024, 1]
    # Convs followed by BN carry no bias (as in MMGeneration).
    assert all(b.conv.bias is None for b in [G.noise2feat, *G.upsampling, *D.downsamples[1:]])
    slopes = {b.slope for b in D.blocks() if b.act == "leaky_relu"}
    assert slopes == {0.01}


def _sample_ok(values: torch.Tensor, mean: float, std: float):
    """Mean within 6 standard errors, std within 6 of its standard errors (sd(s) ~ s / sqrt(2n)):
    a false alarm has probability < 1e-8."""
    n = values.numel()
    assert abs(values.mean().item() - mean) < 6 * std / math.sqrt(n), (values.mean().item(), mean)
    assert abs(values.std().item() - std) < 6 * std / math.sqrt(2 * n), (values.std().item(), std)


@pytest.mark.parametrize("preset,bn_mean,bn_std", [("mmgen", 0.0, 1.0), ("pytorch_examples", 1.0, 0.02)])
def test_init_statistics(preset, bn_mean, bn_std):
    G, D = build(ModelConfig(preset=preset, resolution=64, channels=3))
    convs, bn_w = [], []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            convs.append(m.weight.detach().flatten())
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
        elif isinstance(m, nn.BatchNorm2d):
            bn_w.append(m.weight.detach())
            assert torch.count_nonzero(m.bias) == 0
            assert torch.count_nonzero(m.running_mean) == 0 and torch.all(m.running_var == 1)
    _sample_ok(torch.cat(convs), 0.0, 0.02)
    _sample_ok(torch.cat(bn_w), bn_mean, bn_std)
    # Every conv on its own too: a layer left at PyTorch's default init would stand out.
    for w in convs:
        assert abs(w.std().item() - 0.02) < 6 * 0.02 / math.sqrt(2 * w.numel()) + 1e-3


def test_base_channels_override_and_errors():
    G = Generator("mmgen", 32, 3, base_channels=16)
    assert [b.conv.out_channels for b in G.blocks()] == [64, 32, 16, 3]
    with pytest.raises(ValueError, match="resolution"):
        Generator("mmgen", 48, 3)
    with pytest.raises(ValueError, match="channels"):
        Discriminator("mmgen", 64, 2)
    with pytest.raises(ValueError, match="preset"):
        Generator("stylegan", 64, 3)
    with pytest.raises(ValueError, match="backend"):
        Generator("mmgen", 64, 3, backend="cuda")
    with pytest.raises(ValueError, match="noise"):
        G(torch.randn(2, 50))
    with pytest.raises(ValueError, match="images"):
        Discriminator("mmgen", 32, 3, base_channels=8)(torch.randn(2, 3, 64, 64))


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError):
        resolve_backend("fast", "cpu")


def test_eval_mode_uses_running_statistics():
    G = Generator("mmgen", 32, 3, base_channels=8)
    z = torch.randn(4, G.noise_size)
    G.train()
    G(torch.randn(16, G.noise_size))         # moves the running statistics
    G.eval()
    a, b = G(z[:1]), G(z)[:1]                 # eval: each image independent of its batch
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
