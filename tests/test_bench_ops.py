"""pytest-benchmark microbenchmarks: each fused op against its torch equivalent at MMGen batch-128
shapes, bf16. GPU only; a CPU run skips the module (the interpreter times nothing
useful), so the default `pytest` pays nothing for it.

    pytest tests/test_bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each timed call runs the op CALLS times, then synchronizes once (the host timer pytest-benchmark
uses would otherwise time a launch, not the kernel); extra_info holds the median per op in us and,
for GEMMs, TFLOP/s. Every benchmark first checks the fused result against torch's (|a-b|_2/|b|_2 <=
3e-2, the number tests/parity.py allows bf16 on its max-norm measure), so a fast wrong kernel fails.

The torch side is what the reference model runs under bf16 autocast, channels_last (cuDNN's fast
layout): a block is BatchNorm (batch statistics) -> activation -> conv; the fused block is one
fastgan::conv_layer, whose prologue applies the previous BN with given statistics and whose
epilogue and finalize produce this layer's statistics, so both sides compute one set of statistics,
one normalisation, one activation and one GEMM.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("microbenchmarks time CUDA kernels; no GPU here", allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (extra 'test')")

import torch.nn.functional as F  # noqa: E402

from fastgan.kernels import layer  # noqa: E402,F401  (registers torch.ops.fastgan.*)
from fastgan.kernels.batchnorm import bn_stats  # noqa: E402
from fastgan.kernels.conv import conv2d  # noqa: E402
from fastgan.kernels.conv_transpose import conv_transpose2d  # noqa: E402
from fastgan.kernels.fusion import Epilogue, Prologue  # noqa: E402
from fastgan.kernels.utils import channels_last_empty  # noqa: E402
from fastgan.kernels.wgrad import wgrad  # noqa: E402

DEV, BF16, N = torch.device("cuda"), torch.bfloat16, 128
CALLS, ROUNDS = 20, 25
TOL = 3e-2
# MMGen 64x64 layers: (cin, cout, input side, transposed, activation before it, slope)
G_BLOCK = (1024, 512, 4, True, "relu", 0.0)        # G upsampling.0: 4x4 -> 8x8
D_BLOCK = (256, 512, 16, False, "leaky_relu", 0.01)  # D downsamples.2: 16x16 -> 8x8
CONVT = (512, 256, 8)                              # G upsampling.1
CONV = (128, 256, 32)                              # D downsamples.1


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def run(benchmark, fn, group: str, flops: float = 0.0):
    """Time CALLS calls of fn per round; record per-call median (and TFLOP/s) in extra_info."""
    def block():
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    benchmark.group = group
    benchmark.pedantic(block, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:   # None under --benchmark-disable
        per_call = benchmark.stats.stats.median / CALLS
        benchmark.extra_info["us_per_call"] = round(per_call * 1e6, 2)
        if flops:
            benchmark.extra_info["tflops"] = round(flops / per_call / 1e12, 1)


def randn(*shape, scale=1.0, dtype=torch.float32, channels_last=False):
    t = torch.randn(shape, device=DEV) * scale
    t = t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def conv_weight(cin, cout, transposed):
    return randn(*((cin, cout) if transposed else (cout, cin)), 4, 4, scale=(2 / (16 * cin)) ** 0.5)


def out_side(side, transposed):
    return side * 2 if transposed else side // 2


def gemm_flops(cin, cout, side, transposed):
    return 2 * N * cin * cout * 16 * (side if transposed else side // 2) ** 2


# ---------------------------------------------------------------------------------------------
# a whole block: previous BN + activation -> conv(-transpose) -> this layer's statistics

class Block:
    def __init__(self, cin, cout, side, transposed, act, slope):
        self.transposed, self.act, self.slope = transposed, act, slope
        self.x = (randn(N, cin, side, side, channels_last=True) * 1.5 + 0.3).to(BF16)
        self.w = conv_weight(cin, cout, transposed).requires_grad_()
        self.gamma = (torch.rand(cin, device=DEV) + 0.5).requires_grad_()
        self.beta = randn(cin, scale=0.3).requires_grad_()
        self.rm, self.rv = torch.zeros(cout, device=DEV), torch.ones(cout, device=DEV)
        so = out_side(side, transposed)
        self.grad_y = randn(N, cout, so, so, dtype=BF16, channels_last=True)
        self.flops = gemm_flops(cin, cout, side, transposed)

    def stats(self, x):
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        return mean, (var + 1e-5).rsqrt()

    def fused(self, x, mean, invstd):
        return torch.ops.fastgan.conv_layer(
            x, self.w, None, in_mean=mean, in_invstd=invstd, in_gamma=self.gamma, in_beta=self.beta,
            running_mean=self.rm, running_var=self.rv, transposed=self.transposed, stride=2, padding=1,
            in_act=self.act, slope=self.slope, stats=True, tanh=False, momentum=0.1, eps=1e-5,
            deterministic=False, dtype=BF16, allow_tf32=False)[0]

    def torch(self, x):
        with torch.autocast("cuda", BF16):
            a = F.batch_norm(x, None, None, self.gamma, self.beta, training=True, eps=1e-5)
            a = F.relu(a) if self.act == "relu" else F.leaky_relu(a, self.slope)
            conv = F.conv_transpose2d if self.transposed else F.conv2d
            return conv(a, self.w, stride=2, padding=1)

    def check(self):
        """Forward and every gradient; the fused side gets its statistics through autograd from x,
        as the previous layer's op would deliver them."""
        outs = []
        for fused in (True, False):
            x = self.x.detach().float().requires_grad_()
            for t in (self.w, self.gamma, self.beta):
                t.grad = None
            xb = x.to(BF16).contiguous(memory_format=torch.channels_last)
            y = self.fused(xb, *self.stats(xb)) if fused else self.torch(xb)
            (y.float() * self.grad_y.float()).sum().backward()
            outs.append([y, x.grad, self.w.grad, self.gamma.grad, self.beta.grad])
        for name, a, b in zip(["y", "dx", "dw", "dgamma", "dbeta"], *outs):
            assert rel(a, b) <= TOL, f"{name}: fused vs torch {rel(a, b):.2e}"


@pytest.mark.parametrize("side", ["fused", "torch"])
@pytest.mark.parametrize("name, shape", [("G block", G_BLOCK), ("D block", D_BLOCK)])
def test_block_forward(benchmark, name, shape, side):
    b = Block(*shape)
    if side == "fused":
        b.check()
        mean, invstd = b.stats(b.x)
        fn = lambda: b.fused(b.x, mean, invstd)   # noqa: E731
    else:
        fn = lambda: b.torch(b.x)   # noqa: E731
    with torch.no_grad():
        run(benchmark, fn, f"{name} forward, batch {N}", b.flops)


@pytest.mark.parametrize("side", ["fused", "torch"])
@pytest.mark.parametrize("name, shape", [("G block", G_BLOCK), ("D block", D_BLOCK)])
def test_block_forward_backward(benchmark, name, shape, side):
    b = Block(*shape)
    x = b.x.detach().requires_grad_()
    if side == "fused":
        mean, invstd = (t.requires_grad_() for t in b.stats(b.x))   # leaves: the previous layer's outputs

        def fn():
            torch.autograd.backward(b.fused(x, mean, invstd), b.grad_y)
    else:
        def fn():
            torch.autograd.backward(b.torch(x), b.grad_y)
    run(benchmark, fn, f"{name} forward+backward, batch {N}", 3 * b.flops)


# ---------------------------------------------------------------------------------------------
# single kernels

@pytest.mark.parametrize("side", ["fused", "torch"])
@pytest.mark.parametrize("transposed", [True, False], ids=["conv_transpose", "conv"])
def test_gemm(benchmark, transposed, side):
    cin, cout, s = CONVT if transposed else CONV
    so = out_side(s, transposed)
    x = randn(N, cin, s, s, dtype=BF16, channels_last=True)
    w = conv_weight(cin, cout, transposed)
    out = channels_last_empty((N, cout, so, so), BF16, DEV)
    launcher = conv_transpose2d if transposed else conv2d
    fused = lambda: launcher(x, w, out, stride=2, padding=1, pro=Prologue(), epi=Epilogue(), dtype=BF16)  # noqa: E731
    wb = w.to(BF16)   # the torch side gets its weight in bf16 up front: the op alone
    ref = lambda: (F.conv_transpose2d if transposed else F.conv2d)(x, wb, stride=2, padding=1)  # noqa: E731
    if side == "fused":
        out.fill_(float("nan"))   # every element must be written
        fused()
        assert rel(out, ref()) <= TOL
    run(benchmark, fused if side == "fused" else ref,
        f"{'conv-transpose' if transposed else 'conv'} {cin}->{cout} at {s}x{s}, batch {N}",
        gemm_flops(cin, cout, s, transposed))


@pytest.mark.parametrize("side", ["fused", "torch"])
@pytest.mark.parametrize("shape", [G_BLOCK, D_BLOCK], ids=["G", "D"])
def test_wgrad(benchmark, shape, side):
    cin, cout, s, transposed = shape[:4]
    so = out_side(s, transposed)
    x = randn(N, cin, s, s, dtype=BF16, channels_last=True)
    dy = randn(N, cout, so, so, dtype=BF16, channels_last=True)
    w = conv_weight(cin, cout, transposed).to(BF16)
    base, gathered = (x, dy) if transposed else (dy, x)
    fused = lambda: wgrad(base, Prologue(), gathered, Prologue(), stride=2, padding=1, dtype=BF16)  # noqa: E731
    ref = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
        dy, x, w, None, [2, 2], [1, 1], [1, 1], transposed, [0, 0], 1, [False, True, False])[1]
    if side == "fused":
        assert rel(fused(), ref()) <= TOL
    run(benchmark, fused if side == "fused" else ref,
        f"wgrad {'G' if transposed else 'D'} {cin}x{cout}, batch {N}", gemm_flops(cin, cout, s, transposed))


@pytest.mark.parametrize("side", ["fused", "torch"])
def test_bn_finalize(benchmark, side):
    """Per-tile sums [T, 2, C] of (y - k, (y - k)^2) -> mean, invstd, running statistics. T = 64:
    the deterministic path's tiles for 128x8x8 rows at BLOCK_M 128, C = 512 (G upsampling.0)."""
    tiles, c, rows = 64, 512, N * 8 * 8
    y = randn(rows, c) * 2 + 0.5
    k = randn(c, scale=0.1)
    d = (y - k).view(tiles, rows // tiles, c)
    part = torch.stack([d.sum(1), (d * d).sum(1)], dim=1).contiguous()
    rm, rv = k.clone(), torch.rand(c, device=DEV) + 0.5

    def ref():
        s1, s2 = part.sum(0)
        d1 = s1 / rows
        var = (s2 / rows - d1 * d1).clamp_min(0)
        mean = k + d1
        return mean, (var + 1e-5).rsqrt(), rm.lerp(mean, 0.1), rv.lerp(var * rows / (rows - 1), 0.1)

    fused = lambda: bn_stats(part, rows, k, rm, rv, 1e-5, 0.1)  # noqa: E731
    if side == "fused":
        for name, a, b in zip(["mean", "invstd", "running_mean", "running_var"], fused(), ref()):
            assert rel(a, b) <= 1e-5, name   # fp32 sums of the same partials
    run(benchmark, fused if side == "fused" else ref, f"BN finalize, {tiles} tiles x {c} channels")
