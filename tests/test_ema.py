"""The EMA generator: its update against a plain loop written from StyleGAN2-ADA's formula, the
CUDA-graph step's function (uncaptured) against TrainStep, a fullgraph trace with no host sync,
exact resume with it on, and the outputs that use it (~20 s, tiny models)."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fastgan import checkpoint as ck
from fastgan import config as C
from fastgan import images
from fastgan.distrib import Dist
from fastgan.cuda_graph import GraphedStep
from fastgan.models import build
from fastgan.step import TrainStep
from fastgan.train import train
from runs import tiny_args

B = 4
CPU = torch.device("cpu")


def tiny(recipe="mmgen", **ema) -> C.Config:
    return C.Config(recipe=recipe, batch_size=B, model=C.ModelConfig(preset=recipe, resolution=32, base_channels=4),
                    ema=C.EMAConfig(enabled=True, **ema))


def batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, B, 100, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_update_matches_plain_loop(recipe):
    """StyleGAN2-ADA: h = min(half_life, rampup * images seen); ema = lerp(G, ema, 0.5 ** (B / h));
    BN buffers copied; a copy of G before start_iter. The reference runs in float64; fp32's lerp
    and weight differ from it by a few ulps per update, so 8 updates stay within rtol 1e-5."""
    half_life_kimg, rampup, start = 0.024, 0.5, 2          # h = 24 images: 6 iterations of 4
    cfg = tiny(recipe, half_life_kimg=half_life_kimg, rampup=rampup, start_iter=start)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    G, D = build(cfg.model)
    plain_G, plain_D = copy.deepcopy(G), copy.deepcopy(D)
    step = TrainStep(cfg, G, D, CPU)
    plain = TrainStep(dataclasses.replace(cfg, ema=C.EMAConfig()), plain_G, plain_D, CPU)
    assert plain.ema is None
    ref = {k: v.double() for k, v in plain_G.state_dict().items()}
    params = dict(plain_G.named_parameters())
    for it, (real, z) in enumerate(batches(int(torch.randint(0, 2**31, ())), 8)):
        z = z[: plain.num_noise]
        step.step(real, z)
        plain.step(real, z)
        half_life = min(half_life_kimg * 1000, rampup * it * B)
        beta = 0.0 if it < start else 0.5 ** (B / max(half_life, 1e-8))
        for k, v in plain_G.state_dict().items():
            ref[k] = torch.lerp(v.double(), ref[k], beta) if k in params else v.double()
        got = step.ema.module.state_dict()
        for k, v in plain_G.state_dict().items():
            assert torch.equal(G.state_dict()[k], v), f"the EMA changed training: {k}"
            if it < start or k not in params:
                assert torch.equal(got[k], v), f"iteration {it}: {k} is not G's"
            else:
                torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-7, msg=f"iteration {it}: {k}")
        if it == start:       # from here on the average differs from G
            assert not torch.equal(got["noise2feat.conv.weight"], plain_G.noise2feat.conv.weight)
    assert int(step.ema.iteration) == 8 and not step.ema.module.training


def test_graphed_function_and_checkpoint_state():
    cfg = tiny(half_life_kimg=0.02, rampup=None)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    G, D = build(cfg.model)
    a = TrainStep(cfg, G, D, CPU)
    b = GraphedStep(cfg, copy.deepcopy(G), copy.deepcopy(D), CPU, capture=False)
    for real, z in batches(5, 3):
        a.step(real, z)
        b.step(real, z)
    for k, v in a.ema.module.state_dict().items():
        assert torch.equal(b.ema.module.state_dict()[k], v), k
    # The average travels in the step's state (hence in ckpt/iter_N.pt), in place on load.
    state = a.state_dict()
    assert {"G_ema", "ema_iteration"} <= set(state) and int(state["ema_iteration"]) == 3
    fresh = TrainStep(cfg, *build(cfg.model), CPU)
    address = fresh.ema.module.noise2feat.conv.weight.data_ptr()
    assert fresh.load_state_dict(state) == []
    assert fresh.ema.module.noise2feat.conv.weight.data_ptr() == address
    assert torch.equal(fresh.ema.module.noise2feat.conv.weight, a.ema.module.noise2feat.conv.weight)
    # A checkpoint without an average: it starts from G, at the checkpoint's iteration, and says so.
    notes = fresh.load_state_dict({**{k: state[k] for k in ("opt_g", "opt_d", "scaler")}, "iteration": 7})
    assert notes == ["ema on (the checkpoint has no EMA generator: it starts from G)"]
    assert int(fresh.ema.iteration) == 7


def test_update_traces_whole_without_host_sync():
    """fullgraph=True fails on a graph break, and reading a device value on the host is one."""
    cfg = tiny(start_iter=3)
    step = TrainStep(cfg, *build(cfg.model), CPU)
    torch._dynamo.reset()
    update = torch.compile(step.ema.update, fullgraph=True, backend="eager")
    for _ in range(4):
        update()
    assert int(step.ema.iteration) == 4


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return tiny_args(tmp_path_factory.mktemp("data"), "--model.base_channels=4", "--batch_size=4",
                     "--data.synthetic_count=32", "--ckpt_interval=2", "--sample_interval=100", "--ema.enabled=true",
                     "--ema.half_life_kimg=0.02", f"--seed={int(torch.randint(0, 1000, ()))}")


def test_resume_is_exact_and_outputs_use_the_average(tmp_path, data_args):
    from pathlib import Path
    quick = Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"
    run = lambda work, *extra: train(C.load(quick, [f"--work_dir={work}", *data_args, *extra]), Dist())  # noqa: E731
    run(tmp_path / "a", "--total_iters=5")
    run(tmp_path / "b", "--total_iters=2")
    run(tmp_path / "b", "--total_iters=5")
    a, b = ck.load(tmp_path / "a/ckpt/iter_5.pt"), ck.load(tmp_path / "b/ckpt/iter_5.pt")
    assert int(a["ema_iteration"]) == int(b["ema_iteration"]) == 5
    for net in ("G", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k}"
    assert not torch.equal(a["G_ema"]["noise2feat.conv.weight"], a["G"]["noise2feat.conv.weight"])
    work = tmp_path / "a"
    # generator.safetensors holds the average and says so; sample.py's loader picks it, --raw the G.
    with safe_open(str(work / "generator.safetensors"), framework="pt") as f:
        assert f.metadata()["generator"] == "ema"
    assert all(torch.equal(v, a["G_ema"][k]) for k, v in ck.load_generator(work).state_dict().items())
    assert all(torch.equal(v, a["G"][k]) for k, v in ck.load_generator(work, raw=True).state_dict().items())
    # The last sample grid is the average's, from the run's fixed noise.
    cfg = C.load(work / "config.json")
    z = ck.load_generator(work).sample_noise(cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        grid = images.make_grid(ck.load_generator(work)(z), nrow=int(math.isqrt(cfg.num_samples)))
    assert np.array_equal(np.asarray(Image.open(work / "training_samples" / "iter_5.png")), grid)
    assert json.loads((work / "config.json").read_text())["ema"]["enabled"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_update_equals_uncaptured_without_host_sync():
    """On a GPU: the update inside the CUDA graph (3 warm-up iterations, capture, replays) equals
    the uncaptured function's exactly (fp32, deterministic cuDNN), and replays never sync."""
    dev = torch.device("cuda", torch.cuda.current_device())
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        cfg = tiny(half_life_kimg=0.02, start_iter=2)
        torch.manual_seed(int(torch.randint(0, 2**31, ())))
        G, D = build(cfg.model)
        G, D = G.to(dev), D.to(dev)
        eager = GraphedStep(cfg, copy.deepcopy(G), copy.deepcopy(D), dev, capture=False)
        graphed = GraphedStep(cfg, G, D, dev)
        data = [(r.to(dev), z.to(dev)) for r, z in batches(11, 9)]
        for i, (real, z) in enumerate(data):
            eager.step(real, z)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if i >= 5 else 0)    # replays from the 5th call
            graphed.step(real, z)
            torch.cuda.set_sync_debug_mode(0)
        assert graphed._graph is not None and int(graphed.ema.iteration) == 9
        for k, v in eager.ema.module.state_dict().items():
            assert torch.equal(graphed.ema.module.state_dict()[k], v), k
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
