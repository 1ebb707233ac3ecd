"""The BatchNorm finalize kernels (kernels/batchnorm.py) and the BN statistics path of the fused
layer op: batch mean / biased variance / invstd, the running-statistics update (unbiased
variance, momentum), the backward reductions, and deterministic vs atomic accumulation."""

import pytest
import torch
import torch.nn.functional as F

from fastgan.kernels.batchnorm import bn_grad, bn_stats
from parity import TOL, assert_close, generator

pytestmark = pytest.mark.usefixtures("on_device")


def partial_sums(y: torch.Tensor, shift: torch.Tensor, tiles: int) -> torch.Tensor:
    """[tiles, 2, C] sums of (y - shift) and (y - shift)^2 over row chunks, as the epilogues write."""
    rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) - shift
    return torch.stack([torch.stack([c.sum(0), (c * c).sum(0)]) for c in rows.chunk(tiles)])


@pytest.mark.parametrize("n, c, hw, tiles", [(1, 3, 2, 1), (3, 7, 4, 5), (2, 130, 8, 9)])
def test_bn_stats_matches_batch_norm(n, c, hw, tiles):
    gen = generator(n * 100 + c)
    y = torch.randn(n, c, hw, hw, generator=gen) * 2 + torch.randn(c, 1, 1, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    mean, invstd, new_rm, new_rv = bn_stats(partial_sums(y, rm, tiles), y.numel() // c, rm, rm, rv,
                                            eps=1e-5, momentum=0.1)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    F.batch_norm(y, ref_rm, ref_rv, training=True, momentum=0.1, eps=1e-5)
    var = y.var((0, 2, 3), unbiased=False)
    tol = TOL[torch.float32]
    assert_close(mean, y.mean((0, 2, 3)), tol, "mean")
    assert_close(invstd, (var + 1e-5).rsqrt(), tol, "invstd")
    assert_close(new_rm, ref_rm, tol, "running_mean")
    assert_close(new_rv, ref_rv, tol, "running_var")


def test_bn_stats_survive_a_large_mean():
    """mean 1e4, std 1: unshifted sums would lose the variance to cancellation in fp32
    (E[y^2] ~ 1e8, ulp ~ 8); shifted by the running mean it stays exact to ~1e-6."""
    gen = generator(1)
    y = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) + 1e4
    shift = torch.full((3,), 1e4 - 0.3, dtype=torch.float64)
    part = partial_sums(y, shift, 4).float()
    mean, invstd, _, _ = bn_stats(part, y.numel() // 3, shift.float(), None, None, eps=1e-5, momentum=0.1)
    var = y.var((0, 2, 3), unbiased=False)
    assert_close(invstd, (var + 1e-5).rsqrt().float(), 1e-5, "invstd")
    assert_close(mean, y.mean((0, 2, 3)).float(), 1e-6, "mean")


def test_bn_stats_needs_two_values():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_stats(torch.zeros(1, 2, 4), 1, None, None, None, eps=1e-5, momentum=0.1)


def test_bn_grad_matches_autograd():
    """(S1, S2) = (sum dz, sum dz (x - mean)) -> gradients of (x - mean) * invstd * gamma + beta."""
    gen = generator(2)
    c = 6
    x, dz = torch.randn(3, c, 4, 4, generator=gen), torch.randn(3, c, 4, 4, generator=gen)
    params = [torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
              torch.randn(c, generator=gen), torch.randn(c, generator=gen)]
    m, i, g, b = (p.clone().requires_grad_() for p in params)
    z = (x - m[:, None, None]) * i[:, None, None] * g[:, None, None] + b[:, None, None]
    (z * dz).sum().backward()
    xc = x - params[0][:, None, None]
    part = torch.stack([torch.stack([dz[k].sum((1, 2)), (dz[k] * xc[k]).sum((1, 2))]) for k in range(3)])
    dmean, dinvstd, dgamma, dbeta = bn_grad(part, params[1], params[2])
    tol = TOL[torch.float32]
    for got, want, name in [(dmean, m.grad, "dmean"), (dinvstd, i.grad, "dinvstd"),
                            (dgamma, g.grad, "dgamma"), (dbeta, b.grad, "dbeta")]:
        assert_close(got, want, tol, name)


def layer_outputs(deterministic: bool, x, w, rm, rv):
    return torch.ops.fastgan.conv_layer(
        x, w, None, None, None, None, None, running_mean=rm, running_var=rv, transposed=False, stride=2,
        padding=1, in_act=None, slope=0.0, stats=True, tanh=False, momentum=0.1, eps=1e-5,
        deterministic=deterministic, dtype=torch.float32, allow_tf32=False)


def test_atomic_and_deterministic_statistics_agree():
    import fastgan.kernels.layer  # noqa: F401  (registers the op)
    gen = generator(3)
    x, w = torch.randn(4, 5, 32, 32, generator=gen), torch.randn(7, 5, 4, 4, generator=gen) * 0.1
    rm, rv = torch.randn(7, generator=gen), torch.rand(7, generator=gen) + 0.5
    det = layer_outputs(True, x, w, rm, rv)
    atomic = layer_outputs(False, x, w, rm, rv)
    for a, d, name in zip(atomic, det, ["y", "mean", "invstd", "running_mean", "running_var"]):
        assert_close(a, d, TOL[torch.float32], name)
    again = layer_outputs(True, x, w, rm, rv)
    assert all(torch.equal(a, b) for a, b in zip(det, again)), "deterministic mode must reproduce bit for bit"
