"""Parity of the weight-gradient GEMM (kernels/wgrad.py), its split-K modes and the bias-gradient
reduction, against torch autograd of conv2d / conv_transpose2d on explicitly formed operands
(the activation a = act(norm(x)) and the BN-backward dy that the kernels form on load)."""

import pytest
import torch
import torch.nn.functional as F

import fastgan.kernels.wgrad as wgrad_mod
from fastgan.kernels.fusion import PRO_DY_STATS, PRO_DY_TANH, Prologue
from fastgan.kernels.wgrad import channel_sum, wgrad
from parity import TOL, apply_prologue, assert_close, generator, random_prologue

pytestmark = pytest.mark.usefixtures("on_device")


def dy_prologue(kind: str, y: torch.Tensor, gen) -> Prologue:
    c = y.shape[1]
    if kind == "tanh":
        return Prologue(PRO_DY_TANH, aux=y)
    if kind == "stats":
        vecs = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
                torch.randn(c, generator=gen), torch.randn(c, generator=gen))
        return Prologue(PRO_DY_STATS, vecs=vecs, aux=y, inv_count=1.0 / (y.numel() // c))
    return Prologue()


def apply_dy(g: torch.Tensor, pro: Prologue) -> torch.Tensor:
    if pro.mode == PRO_DY_TANH:
        return g * (1 - pro.aux ** 2)
    if pro.mode == PRO_DY_STATS:
        m, i, dm, di = (v[None, :, None, None] for v in pro.vecs)
        return g + dm * pro.inv_count - di * i ** 3 * pro.inv_count * (pro.aux - m)
    return g


def reference_dw(transposed, x, pro, g, dpro, stride, padding):
    w = torch.zeros((x.shape[1], g.shape[1], 4, 4) if transposed else (g.shape[1], x.shape[1], 4, 4),
                    dtype=torch.float64, requires_grad=True)
    f = F.conv_transpose2d if transposed else F.conv2d
    out = f(apply_prologue(x.double(), pro), w, stride=stride, padding=padding)
    (out * apply_dy(g.double(), dpro)).sum().backward()
    return w.grad


CASES = [  # transposed, stride, padding, x size, dy size
    (False, 2, 1, 8, 4), (False, 1, 0, 4, 1), (True, 2, 1, 4, 8), (True, 1, 0, 1, 4)]


@pytest.mark.parametrize("transposed, stride, padding, size, out_size", CASES)
@pytest.mark.parametrize("mode, dy", [("none", "none"), ("norm_act", "stats"), ("act", "tanh")])
def test_wgrad(transposed, stride, padding, size, out_size, mode, dy, k_loop):
    gen = generator(hash((transposed, stride, mode)) % 2**31)
    n, cin, cout = 3, 5, 6
    x = torch.randn(n, cin, size, size, generator=gen)
    g = torch.randn(n, cout, out_size, out_size, generator=gen)
    y = torch.tanh(torch.randn(g.shape, generator=gen))
    pro, dpro = random_prologue(mode, cin, gen), dy_prologue(dy, y, gen)
    if transposed:
        dw = wgrad(x, pro, g, dpro, stride=stride, padding=padding, dtype=torch.float32)
    else:
        dw = wgrad(g, dpro, x, pro, stride=stride, padding=padding, dtype=torch.float32)
    assert_close(dw, reference_dw(transposed, x, pro, g, dpro, stride, padding), TOL[torch.float32], "dW")


@pytest.mark.parametrize("deterministic", [True, False])
def test_wgrad_split_k(monkeypatch, deterministic, k_loop):
    """Rows split over programs: per-split partials summed in order, or fp32 atomics."""
    monkeypatch.setattr(wgrad_mod, "_target_programs", lambda device: 10_000)
    monkeypatch.setattr(wgrad_mod, "INTERPRET", False)         # GPU row blocks (64), so rows split
    gen = generator(3)
    x, g = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 5, 16, 16, generator=gen)
    assert wgrad_mod.split_rows(4 * 16 * 16, 64, 16, x.device)[0] == 4
    pro = random_prologue("norm_act", 3, gen)
    run = lambda: wgrad(g, Prologue(), x, pro, stride=2, padding=1, dtype=torch.float32,  # noqa: E731
                        deterministic=deterministic)
    dw = run()
    assert_close(dw, reference_dw(False, x, pro, g, Prologue(), 2, 1), TOL[torch.float32], "dW split-K")
    if deterministic:
        assert torch.equal(dw, run()), "deterministic split-K must reproduce bit for bit"


@pytest.mark.parametrize("dtype, tol", [(torch.float16, TOL[torch.float16]), (torch.bfloat16, TOL[torch.bfloat16])])
def test_wgrad_half(dtype, tol):
    gen = generator(4)
    x, g = torch.randn(2, 5, 8, 8, generator=gen), torch.randn(2, 7, 16, 16, generator=gen)
    pro = random_prologue("norm_act", 5, gen)
    dw = wgrad(x.to(dtype), pro, g.to(dtype), Prologue(), stride=2, padding=1, dtype=dtype)
    assert_close(dw, reference_dw(True, x, pro, g, Prologue(), 2, 1), tol, f"dW {dtype}")


@pytest.mark.parametrize("dy", ["none", "tanh", "stats"])
def test_channel_sum(dy):
    gen = generator(5)
    g = torch.randn(3, 7, 8, 8, generator=gen)
    y = torch.tanh(torch.randn(g.shape, generator=gen))
    dpro = dy_prologue(dy, y, gen)
    assert_close(channel_sum(g, dpro), apply_dy(g, dpro).sum((0, 2, 3)), TOL[torch.float32], "bias grad")
