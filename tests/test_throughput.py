"""bench/throughput.py as a user runs it (CPU: toy sizes, Triton interpreter, ~3 min on 2 cores),
and its FLOP counts against the README's figures and an independent per-layer count."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"device", "date", "torch", "triton", "peak_tflops", "rows"}
ROW = {"variant", "preset", "batch", "mode", "img_per_s", "img_per_s_min", "img_per_s_max", "ms_per_iter", "mfu",
       "speedup_vs_eager", "parity_max_rel_err"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench/throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def conv_flops(net: str, preset: str, resolution: int, base: int | None, channels: int = 3) -> list[int]:
    """Forward FLOPs per image of each conv layer, from the layer table in the README (kernel 4;
    a conv costs 2 Cin Cout 16 per output pixel, a conv-transpose the same per input pixel).
    The input and weight gradients of a layer cost the same again each."""
    base = base or {"mmgen": 128, "pytorch_examples": 64}[preset]
    stages = int(math.log2(resolution)) - 2
    if net == "G":
        widths = [base * 2 ** i for i in reversed(range(stages))]
        layers = [(100, widths[0], 1)] + [(widths[i], widths[i + 1], 4 * 2 ** i) for i in range(stages - 1)]
        layers.append((widths[-1], channels, resolution // 2))            # (cin, cout, input side)
    else:
        widths = [base * 2 ** i for i in range(stages)]
        layers = [(channels, widths[0], resolution // 2)] + \
                 [(widths[i], widths[i + 1], resolution // 2 ** (i + 2)) for i in range(stages - 1)]
        layers.append((widths[-1], 1, 1))                                 # (cin, cout, output side)
    return [2 * cin * cout * 16 * side * side for cin, cout, side in layers]


def expected_flops(preset, recipe, mode, resolution, base) -> int:
    """Per image. g, d: one forward of G, D; g1, d1: their first layers, whose input needs no gradient.
    mmgen:            G fwd (no grad); D fwd x2 + wgrad x2 + dgrad x2 (not d1); G fwd; D fwd + dgrad;
                      G wgrad + dgrad (not g1)
    pytorch_examples: the same with one G forward."""
    G, D = conv_flops("G", preset, resolution, base), conv_flops("D", preset, resolution, base)
    g, g1, d, d1 = sum(G), G[0], sum(D), D[0]
    if mode == "sample":
        return g
    g_forwards = 2 if recipe == "mmgen" else 1
    return g_forwards * g + 2 * g - g1 + 8 * d - 2 * d1


@pytest.mark.parametrize("preset, recipe, gflop", [
    ("mmgen", "mmgen", 9.80),                        # README, "The model and the recipe"
    ("pytorch_examples", "mmgen", 2.48),             # this model under MMGen's iteration (two G forwards)
    ("pytorch_examples", "pytorch_examples", 2.27),  # its own recipe: one G forward per iteration
])
def test_flops_per_image_at_full_size(preset, recipe, gflop):
    bench = load_bench()
    args = bench.parse(["--resolution", "64"])
    args.base_channels = None   # the preset's widths
    cfg = bench.make_cfg(args, preset)
    cfg.recipe = recipe
    for batch in (2, 128):
        counted = bench.count_flops(cfg, batch, "train")
        assert counted == batch * expected_flops(preset, recipe, "train", 64, None)
        assert round(counted / batch / 1e9, 2) == gflop
    assert bench.count_flops(cfg, 128, "sample") == 128 * expected_flops(preset, recipe, "sample", 64, None)


def check_row(r):
    where = f"{r['variant']} {r['preset']} b{r['batch']} {r['mode']}"
    assert ROW <= r.keys(), f"{where}: missing {ROW - r.keys()}"
    assert "error" not in r, f"{where}: {r['error']}"
    for key in ("img_per_s", "img_per_s_min", "img_per_s_max", "ms_per_iter", "mfu", "speedup_vs_eager"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, f"{where}: {key} = {r[key]}"
    assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"], where
    assert r["ms_per_iter"] == pytest.approx(1e3 * r["batch"] / r["img_per_s"]), where
    assert r["repeats"] >= 5, where
    # parity: the bound restated here from the documented rule, not read from the row
    err = r["parity_max_rel_err"]
    assert isinstance(err, float) and math.isfinite(err) and err >= 0, f"{where}: parity {err}"
    if r["amp"] == "fp32":
        assert err <= 1e-3, f"{where}: fp32 parity {err:.2e}"
    else:
        torch_bf16 = r["parity_torch_bf16_rel_err"]
        assert 0 < torch_bf16 < 1, f"{where}: torch's bf16 autocast error {torch_bf16} (was it bf16?)"
        assert err <= min(1.0, max(3e-2, 2 * torch_bf16)), f"{where}: bf16 parity {err:.2e}, torch's {torch_bf16:.2e}"
        if r["mode"] == "train":
            assert r["parity_loss_rel_err"] <= 3e-2, f"{where}: losses off by {r['parity_loss_rel_err']:.2e}"
        else:
            assert err <= 3e-2, f"{where}: images off by {err:.2e}"
    assert r["parity_ok"] is True, where


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; a GPU runs the full sizes by hand")
def test_cpu_run_as_a_user_runs_it(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert SCHEMA <= data.keys()
    assert data["peak_tflops"] > 0 and data["torch"] == torch.__version__
    rows = data["rows"]
    keys = [(r["variant"], r["preset"], r["batch"], r["mode"]) for r in rows]
    variants = ["eager_fp32", "eager_bf16", "compile_max_autotune", "compile_reduce_overhead", "fastgan"]
    assert sorted(keys) == sorted((v, p, 4, m) for v in variants for p in ("mmgen", "pytorch_examples")
                                  for m in ("train", "sample"))
    for r in rows:
        check_row(r)
        recipe = r["preset"]
        assert r["flops_per_iter"] == r["batch"] * expected_flops(r["preset"], recipe, r["mode"], 32, 8)
        assert r["mfu"] == pytest.approx(r["flops_per_iter"] / (r["ms_per_iter"] / 1e3) / (data["peak_tflops"] * 1e12))
    assert rows[0]["speedup_vs_eager"] == 1.0
    table = proc.stdout
    assert table.count("\n| ") == len(rows) + 1, "one markdown line per row, plus the header"


def test_append_merges_rows_and_recomputes_speedups():
    """--append: a row redone replaces the old one, the others stay, speedups use whichever run
    measured eager_fp32."""
    bench = load_bench()
    def rate():
        return float(torch.empty(()).uniform_(10, 1000))

    def row(variant, img_per_s, mode="train"):
        return {"variant": variant, "preset": "mmgen", "batch": 128, "mode": mode, "img_per_s": img_per_s}

    eager, old_fast, new_fast, other = rate(), rate(), rate(), rate()
    previous = [row("fastgan", old_fast), row("eager_fp32", eager), row("eager_bf16", other, "sample")]
    merged = bench.merge(previous, [row("fastgan", new_fast)])
    assert [(r["variant"], r["mode"]) for r in merged] == [("eager_fp32", "train"), ("fastgan", "train"),
                                                           ("eager_bf16", "sample")]
    assert merged[1]["img_per_s"] == new_fast and merged[1]["speedup_vs_eager"] == pytest.approx(new_fast / eager)
    assert merged[0]["speedup_vs_eager"] == 1.0
    assert merged[2]["speedup_vs_eager"] is None   # no eager_fp32 sample row to compare with
