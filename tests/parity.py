"""Shared by the kernel parity tests: run chains of fastgan ConvModules through the torch
reference modules and through the fused ops, and compare everything.

Error measure: max |fused - reference| / max |reference| per tensor (a norm-wise relative error:
elementwise relative error is meaningless where the reference crosses zero).

Tolerances, against an fp32 torch reference:
- fp32 1e-5: both sides sum the same products in fp32 in different orders; the rounding error
  grows like sqrt(K) * 6e-8 for K <= 2048 terms per output (<= 3e-6), and BatchNorm's
  normalisation, which divides by a batch standard deviation, amplifies it by at most a few.
  Whole modules (check_module) judge fp32 against an fp64 copy of the reference, and allow 10x
  torch's own fp32 error where a small tensor sums many cancelling terms (a bias grad over 8192
  positions: the rounding is relative to the terms, not to the tiny sum).
- fp16 1e-2: GEMM inputs are rounded to fp16 (relative 2^-11 = 4.9e-4 each) at every layer, in
  forward and backward; three to five layers compound to ~3e-3 (measured 0.9e-3 for a 4-layer G;
  torch's own fp16 autocast gives 1.3e-3 on the same case).
- bf16 3e-2: the same with 2^-8 = 3.9e-3 per rounding (measured 7.9e-3 on a 4-layer G; torch's
  bf16 autocast 9.6e-3). The interpreter cannot do bf16 arithmetic, so the kernels round to bf16
  on the bits and compute in fp32 there (kernels/operands.py): the numerics a tensor core gives.

Half-precision gradients are checked op by op (check_layer_op), on identical inputs, against an
fp64 autograd reference. Through a whole chain they are not comparable with an fp32 run: the
pre-activations differ by rounding, so ReLU's / LeakyReLU's derivative flips wherever one lies
within rounding of 0, and each flip moves a gradient sum by a whole term. torch's own bf16
autocast shows the same 0.1-0.2 gradient error on the same chains (measured), so chains in half
precision compare forward outputs (train and eval) only.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from fastgan.models import run_blocks

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# Kernels run where Triton runs: CUDA when there is a GPU, else CPU tensors through the
# interpreter. Tests using parity take the `on_device` fixture (tests/conftest.py): DEVICE is the
# default device for their tensors, and fp32 is IEEE fp32 (no tf32) on both sides.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fresh_seed() -> int:
    """A new seed per call: torch seeds itself at random in each process, so each run draws fresh inputs."""
    return int(torch.randint(0, 2**31, ()))


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"


class Chain(nn.Module):
    """ConvModules in sequence, run by either backend (fastgan.fused.forward needs blocks())."""

    def __init__(self, blocks, backend="torch"):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.backend, self.deterministic = backend, True

    def blocks(self):
        return list(self.layers)

    def forward(self, x):
        return run_blocks(self, x)


def randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Fresh random weights, biases, BN affine and running statistics (no 0s and 1s to hide behind)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight.shape[1 if isinstance(m, nn.Conv2d) else 0] * 16
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in / 4))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=gen) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=dtype)


def check_chain(blocks, x: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    check_module(Chain(blocks), x, dtype, seed)


def check_module(ref: nn.Module, x: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    """ref (torch backend) vs a copy on the triton backend, after fresh random parameters and
    statistics: output, input grad and every parameter grad (fp32; see the module doc for half
    precision), running statistics (after the training forward), then the eval-mode output from
    the updated statistics, which must change nothing.

    fp32 is judged against an fp64 copy of the reference (see `compare`); half precision against
    the fp32 reference, within tol or 2x the error torch's own autocast makes there."""
    gen = generator(seed)
    randomize(ref, gen)
    fused = copy.deepcopy(ref)
    fused.backend, fused.deterministic = "triton", True
    exact = copy.deepcopy(ref).double()
    half = copy.deepcopy(ref) if dtype != torch.float32 else None     # torch under autocast(dtype)
    tol = TOL[dtype]

    def compare(actual, ref32, ref64, what, ref_half=None):
        if dtype != torch.float32:
            # A D logit sums thousands of rounded terms and can cancel to far below them (one
            # draw in ~12 at width 6): torch's own autocast then misses by as much.
            own = rel_err(ref_half, ref32) if ref_half is not None else 0.0
            err = rel_err(actual, ref32)
            assert err <= max(tol, 2 * own), f"{what}: relative error {err:.3e} > max({tol:.0e}, 2 x torch's {own:.1e})"
            assert torch.isfinite(actual).all(), f"{what}: non-finite values"
            return
        # A tensor of few elements that sums many terms of both signs (a bias grad over 2*64*64
        # positions, a decision logit at batch 1) can cancel to far below its terms; fp32 rounding
        # is relative to the terms, so no bound relative to the result holds for every draw. Both
        # fp32 results are measured against fp64: fused must be within tol, or within 10x of
        # torch's own fp32 error where cancellation makes that larger.
        own = rel_err(ref32, ref64)
        err = rel_err(actual, ref64)
        assert err <= max(tol, 10 * own), f"{what}: relative error {err:.3e} > max({tol:.0e}, 10 x torch's {own:.1e})"
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"

    x_ref, x_fused, x_exact = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    out_ref, out_exact = ref(x_ref), exact(x_exact)
    with autocast(dtype):
        out_fused = fused(x_fused)
        out_half = half(x.clone()) if half is not None else None
    assert out_fused.dtype == dtype, f"output dtype {out_fused.dtype}, expected {dtype}"
    compare(out_fused, out_ref, out_exact, "output", out_half)
    if dtype == torch.float32:
        g = torch.randn(out_ref.shape, generator=gen)
        (out_ref * g).sum().backward()
        (out_exact * g.double()).sum().backward()
        (out_fused.float() * g).sum().backward()
        compare(x_fused.grad, x_ref.grad, x_exact.grad, "input grad")
        for (name, p_ref), (_, p_fused), p_exact in zip(ref.named_parameters(), fused.named_parameters(),
                                                         exact.parameters()):
            compare(p_fused.grad, p_ref.grad, p_exact.grad, f"grad of {name}")
    halves = (half if half is not None else ref).buffers()
    for (name, b_ref), (_, b_fused), b_exact, b_half in zip(ref.named_buffers(), fused.named_buffers(),
                                                            exact.buffers(), halves):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b_fused, b_ref), f"{name}: {b_fused} != {b_ref}"
        else:
            compare(b_fused, b_ref, b_exact, name, b_half if half is not None else None)

    for net in (ref, fused, exact, half):
        if net is not None:
            net.eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with torch.no_grad(), autocast(dtype):
        out_fused = fused(x)
        out_half = half(x) if half is not None else None
    with torch.no_grad():
        out_ref, out_exact = ref(x), exact(x.double())
    compare(out_fused, out_ref, out_exact, "eval output", out_half)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"eval mode changed {k}"


# ---------------------------------------------------------------------------------------------
# prologues for the kernel tests: a random one of a kind, and its reference math

def random_prologue(mode: str, c: int, gen):
    from fastgan.kernels.fusion import ACT_LEAKY, ACT_RELU, PRO_ACT, PRO_NORM_ACT, Prologue
    if mode == "none":
        return Prologue()
    if mode == "act":
        return Prologue(PRO_ACT, ACT_LEAKY, 0.2)
    vecs = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
            torch.randn(c, generator=gen), torch.randn(c, generator=gen))
    return Prologue(PRO_NORM_ACT, ACT_RELU, 0.0, vecs)


def apply_prologue(x, pro):
    """The reference for a prologue: the activation the previous layer would have written."""
    import torch.nn.functional as F
    from fastgan.kernels.fusion import ACT_RELU, PRO_ACT, PRO_NORM_ACT
    if pro.mode == PRO_NORM_ACT:
        m, i, g, b = (v[None, :, None, None] for v in pro.vecs)
        x = (x - m) * i * g + b
    if pro.mode in (PRO_ACT, PRO_NORM_ACT):
        x = F.relu(x) if pro.act == ACT_RELU else F.leaky_relu(x, pro.slope)
    return x


# ---------------------------------------------------------------------------------------------
# one fused layer op against an fp64 reference on identical inputs (every dtype, backward too)

def reference_layer(x, weight, bias, prev, act, slope, transposed, stride, padding, stats, tanh):
    """The math of fastgan::conv_layer in plain torch: act(norm(x)) -> conv [+ bias] [-> tanh],
    and the batch mean / invstd of the output when stats."""
    import torch.nn.functional as F
    if prev is not None:
        m, i, g, b = (v[None, :, None, None] for v in prev)
        x = (x - m) * i * g + b
    if act == "relu":
        x = F.relu(x)
    elif act == "leaky_relu":
        x = F.leaky_relu(x, slope)
    conv = F.conv_transpose2d if transposed else F.conv2d
    y = conv(x, weight, bias, stride=stride, padding=padding)
    if tanh:
        y = torch.tanh(y)
    if not stats:
        return y, None, None
    return y, y.mean((0, 2, 3)), (y.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()


def check_layer_op(x_shape, weight_shape, *, transposed, stride, padding, norm, act, slope, bias,
                   stats, tanh, dtype, seed):
    """fastgan::conv_layer forward and backward vs reference_layer in fp64, both fed the same
    values (x rounded to dtype as it would be stored; vectors fp32): y, mean, invstd, the
    running-statistics update, and the gradients of x, weight, bias and the previous layer's
    (mean, invstd, gamma, beta) for random incoming gradients of y, mean and invstd."""
    import fastgan.kernels.layer  # noqa: F401  (registers torch.ops.fastgan.*)
    gen = generator(seed)
    rnd = lambda *shape, scale=1.0, shift=0.0: torch.randn(shape, generator=gen) * scale + shift  # noqa: E731
    cin = x_shape[1]
    x = rnd(*x_shape).to(dtype).float()
    weight = rnd(*weight_shape, scale=(4 / (cin * 16)) ** 0.5)
    b = rnd(weight_shape[1 if transposed else 0], scale=0.5) if bias else None
    prev = [rnd(cin, scale=0.3), rnd(cin, scale=0.3, shift=1.0).abs() + 0.2, rnd(cin, scale=0.5, shift=1.0),
            rnd(cin, scale=0.5)] if norm else None
    cout = weight_shape[1 if transposed else 0]
    running = [rnd(cout, scale=0.3), rnd(cout).abs() + 0.5] if stats else [None, None]

    leaves = [x, weight, b] + (prev or [])
    fused_in = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    ref_in = [t.double().requires_grad_() if t is not None else None for t in leaves]
    fx = fused_in[0].to(dtype).detach().requires_grad_()
    y, mean, invstd, new_rm, new_rv = torch.ops.fastgan.conv_layer(
        fx, fused_in[1], fused_in[2], *(fused_in[3:] if norm else [None] * 4), *running,
        transposed=transposed, stride=stride, padding=padding, in_act=act, slope=slope, stats=stats,
        tanh=tanh, momentum=0.1, eps=1e-5, deterministic=True, dtype=dtype, allow_tf32=False)
    ry, rmean, rinvstd = reference_layer(ref_in[0], ref_in[1], ref_in[2], ref_in[3:] if norm else None,
                                         act, slope, transposed, stride, padding, stats, tanh)
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_close(y, ry, tol, "y")
    gy = rnd(*ry.shape)
    loss_f, loss_r = (y.float() * gy).sum(), (ry * gy.double()).sum()
    if stats:
        assert_close(mean, rmean, tol, "batch mean")
        assert_close(invstd, rinvstd, tol, "batch invstd")
        n = ry.numel() // cout
        assert_close(new_rm, 0.9 * running[0].double() + 0.1 * rmean, tol, "running_mean")
        var = 1 / rinvstd.double() ** 2 - 1e-5
        assert_close(new_rv, 0.9 * running[1].double() + 0.1 * var * n / (n - 1), tol, "running_var")
        gm, gi = rnd(cout), rnd(cout, scale=0.1)
        loss_f = loss_f + (mean * gm).sum() + (invstd * gi).sum()
        loss_r = loss_r + (rmean * gm.double()).sum() + (rinvstd * gi.double()).sum()
    loss_f.backward()
    loss_r.backward()
    names = ["x", "weight", "bias", "in_mean", "in_invstd", "in_gamma", "in_beta"]
    fused_grads = [fx.grad] + [t.grad if t is not None else None for t in fused_in[1:]]
    for name, got, ref in zip(names, fused_grads, ref_in):
        if ref is not None:
            assert got is not None, f"no gradient for {name}"
            assert_close(got.float(), ref.grad, tol, f"grad of {name}")
