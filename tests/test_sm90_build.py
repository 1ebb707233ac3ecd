"""Every kernel launch of a training iteration and a sampling call, traced by torch.compile as on
a GPU, builds for an H100 (sm_90).

The interpreter runs the kernels' arithmetic but not the GPU compiler: tl.dot's shape and dtype
rules, register allocation and shared memory are only checked by a real build. bench/sm90.py
records the launches with the GPU code paths and block sizes and compiles each one with the
ptxas in Triton's wheel, so this runs on a machine without a GPU. It found that fp32 (tf32)
dgrad kernels asked for 258 KiB of shared memory per program (Hopper allows 227 KiB): fp32
training on an H100 would have stopped with "out of resources".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "build.json"
    # the train steps as the GPU runs them: through torch.compile (aot_eager traces the triton_ops
    # and wrap_triton calls as inductor would, short of its codegen)
    runs = [["--presets", "mmgen", "--amps", "bf16", "fp32", "--compile", "aot_eager"],
            ["--presets", "pytorch_examples", "--amps", "bf16", "--modes", "train", "--compile", "aot_eager"],
            ["--presets", "mmgen", "--amps", "bf16", "--modes", "train", "--deterministic"]]
    rows, logs = [], []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args in runs:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90.py"), *args, "--out", str(out)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
        logs.append(proc.stdout + proc.stderr[-3000:])
        if proc.returncode == 2:            # bench/sm90.py: no ptxas/cuobjdump in this triton wheel
            pytest.skip(proc.stderr.strip().splitlines()[-1])
        assert out.exists(), f"bench/sm90.py wrote no report (exit {proc.returncode}):\n{logs[-1]}"
        built = json.loads(out.read_text())
        rows += [dict(r, smem_limit=built["smem_limit"]) for r in built["rows"]]
        out.unlink()
    return rows, "\n".join(logs)


def test_every_kernel_builds_for_sm90(report):
    rows, log = report
    failed = [f"{r['where']} {r['kernel']} {r['role']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed) + "\n" + log


def test_shared_memory_fits_hopper(report):
    rows, log = report
    over = [f"{r['where']} {r['kernel']} {r['role']} {r['blocks']}: {r['smem']} bytes" for r in rows
            if r["smem"] > r["smem_limit"]]
    assert not over, "\n".join(over)


def test_gemms_use_tensor_cores(report):
    rows, _ = report
    gemms = [r for r in rows if r["kernel"] in ("conv", "convT", "wgrad")]
    assert {r["kernel"] for r in gemms} == {"conv", "convT", "wgrad"}
    assert {"mmgen train b128 bf16", "mmgen train b128 fp32", "mmgen sample b1024 bf16",
            "pytorch_examples train b128 bf16", "mmgen train b128 bf16 deterministic"} <= {r["where"] for r in rows}
    # both reductions of the split-K wgrad: fp32 atomics (default) and per-split partials
    wgrad_atomic = {"atomic" in r["role"].split() for r in gemms if r["kernel"] == "wgrad"}
    assert wgrad_atomic == {True, False}
    no_mma = [f"{r['where']} {r['kernel']} {r['role']} {r['blocks']}" for r in gemms if not (r["hgmma"] or r["hmma"])]
    assert not no_mma, "GEMMs on CUDA cores:\n" + "\n".join(no_mma)
    # Hopper's wgmma for every GEMM whose tile has >= 64 rows per warpgroup (a 16-row tile cannot)
    big = [r for r in gemms if int(r["blocks"].split("x")[0]) >= 64]
    assert big and all(r["hgmma"] for r in big), [r for r in big if not r["hgmma"]]


def test_weights_are_packed_for_the_gemm(report):
    """Weight tiles load as contiguous runs of the compute dtype: for bf16, the B operand's shared
    memory per stage is half what fp32 weights took (kernels/utils.pack_weight)."""
    rows, _ = report
    fwd = [r for r in rows if r["where"].startswith("mmgen train") and r["kernel"] == "conv"
           and r["role"].startswith("pro:bn+act stats") and r["blocks"] == "128x128x64"]
    assert fwd, [(r["where"], r["kernel"], r["role"], r["blocks"]) for r in rows]
    # 3 stages x (A 128x64 + B 64x128) bf16 = 96 KiB (+ 2 KiB of epilogue scratch); fp32 B made it 130
    assert all(r["smem"] <= 100 * 1024 for r in fwd), [r["smem"] for r in fwd]
