"""fastgan/selfcheck.py: the check a CUDA run makes of the fused kernels before it trains, and what
the run does when it fails. Each failure is forced for real on the CPU (Triton's interpreter; on a
GPU machine these run on CUDA): a kernel that raises, a kernel off by 1%, a step whose capture
fails; and a draw that misses by a rounding-level activation flip, drawn again. Tiny models
(32x32, width 4, batch 2): about a minute on 2 cores."""

import copy
import dataclasses

import pytest
import torch

from fastgan import distrib, fused, selfcheck
from fastgan.config import Config
from fastgan.cuda_graph import GraphedStep
from fastgan.models import build
from parity import DEVICE, fresh_seed

pytestmark = pytest.mark.usefixtures("on_device")


def tiny(backend="auto", amp="fp32"):
    cfg = Config(recipe="mmgen", amp=amp, backend=backend, batch_size=2, num_samples=4)
    cfg.model.resolution, cfg.model.base_channels = 32, 4
    return cfg


def nets(cfg, seed=None):
    seed = fresh_seed() if seed is None else seed
    torch.manual_seed(seed)
    G, D = build(cfg.model, "triton")
    G.seed = seed       # for a failure's message
    return G.to(DEVICE), D.to(DEVICE)


def settle(cfg, G, D, graph=True):
    lines = []
    cfg, backend = selfcheck.settle(cfg, distrib.Dist(device=DEVICE), G, D, lines.append, graph=graph)
    return cfg, backend, lines


def test_passes_and_leaves_the_run_untouched():
    cfg = tiny()
    G, D = nets(cfg)
    state = copy.deepcopy((G.state_dict(), D.state_dict()))
    rng = torch.get_rng_state()
    new, backend, lines = settle(cfg, G, D)
    assert (new, backend) == (cfg, "triton") and G.backend == D.backend == "triton", (lines, G.seed)
    assert len(lines) == 1 and lines[0].startswith("self-check passed"), lines
    assert torch.equal(torch.get_rng_state(), rng), "the check drew from the run's random stream"
    for before, net in zip(state, (G, D)):
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), f"the check changed {k}"


def test_a_kernel_that_raises_means_the_torch_backend(monkeypatch):
    from triton.runtime.errors import OutOfResources

    def broken(net, x):
        raise OutOfResources(262144, 232448, "shared memory")
    monkeypatch.setattr(fused, "forward", broken)
    cfg = tiny()
    G, D = nets(cfg)
    new, backend, lines = settle(cfg, G, D)
    assert backend == "torch" and new.backend == "torch" and G.backend == D.backend == "torch"
    assert new == dataclasses.replace(cfg, backend="torch")
    assert lines == [lines[0]] and "OutOfResources" in lines[0] and lines[0].endswith("training on the torch backend")

    with pytest.raises(selfcheck.SelfCheckError) as info:     # explicit: fails loudly, in one line
        settle(tiny("triton"), *nets(cfg))
    message = str(info.value)
    assert "\n" not in message and "OutOfResources" in message and "--backend=torch" in message


def test_a_kernel_one_percent_off_means_the_torch_backend(monkeypatch):
    """1% on every fused layer's output: ten times the fp32 bound, far below what a broken kernel
    gives (~1). BatchNorm undoes a uniform scale, so the losses move by only ~1e-3; the gradients
    and the (eval-mode) samples must show it."""
    real_forward = fused.forward
    monkeypatch.setattr(fused, "forward", lambda net, x: real_forward(net, x) * 1.01)
    cfg = tiny()
    G, D = nets(cfg)
    new, backend, lines = settle(cfg, G, D)
    assert backend == "torch" and G.backend == "torch" and len(lines) == 1
    assert "differ from torch" in lines[0] and "grads" in lines[0] and "sample" in lines[0], lines


# Weights (tiny() models from this seed) whose first check draw puts one of D's LeakyReLU inputs
# within rounding of 0 (6e-10 against a scale of 1.2e-2, after the D step): the fused kernels and
# torch round it to opposite sides, and G's fp32 gradients differ by up to 6% (Triton's interpreter
# on a CPU; a GPU rounds elsewhere, so there the first draw may simply pass).
ROUNDING_FLIP_SEED = 731383829


def test_a_rounding_level_flip_is_drawn_again_and_passes():
    cfg = tiny()
    G, D = nets(cfg, seed=ROUNDING_FLIP_SEED)
    report = selfcheck.check(cfg, G, D, DEVICE)
    assert report.failed is None, report.why
    if DEVICE.type == "cpu":
        assert report.redrawn and "grads" in report.redrawn, report.redrawn
        new, backend, lines = settle(cfg, G, D)
        assert backend == "triton" and "on a second draw: the first missed, grads" in lines[0], lines


def test_a_miss_on_one_draw_only_is_not_a_failure_but_on_both_it_is(monkeypatch):
    """The second draw decides; a kernel off on every draw fails with both misses in its line."""
    real_parity = selfcheck.parity
    off = set()

    def parity(cfg, G, D, device, seed=selfcheck.SEEDS[0]):
        items = real_parity(cfg, G, D, device, seed)
        if seed in off:
            items["sample"].err = 2 * items["sample"].bound
        return items
    monkeypatch.setattr(selfcheck, "parity", parity)
    cfg = tiny()
    G, D = nets(cfg)
    off.add(selfcheck.SEEDS[0])
    report = selfcheck.check(cfg, G, D, DEVICE)
    assert report.failed is None and report.redrawn.startswith("sample "), report
    off.update(selfcheck.SEEDS)
    report = selfcheck.check(cfg, G, D, DEVICE)
    assert report.failed == "parity" and report.why.count("sample ") == 2, report.why
    assert "on 2 draws" in report.why


def test_a_capture_error_means_the_eager_step(monkeypatch):
    def capture_fails(self, real, z):
        raise RuntimeError("capturing the training iteration in a CUDA graph failed (operation not "
                           "permitted when stream is capturing); run with --cuda_graph=false to train without one")
    monkeypatch.setattr(GraphedStep, "step", capture_fails)
    cfg = dataclasses.replace(tiny(), compile=True)
    G, D = nets(cfg)
    new, backend, lines = settle(cfg, G, D)
    assert backend == "triton" and G.backend == "triton"
    assert new == dataclasses.replace(cfg, cuda_graph=False, compile=False)
    assert len(lines) == 1 and "CUDA graph failed" in lines[0] and "eager step" in lines[0], lines

    monkeypatch.setattr(selfcheck, "parity", lambda *a: {})    # passed above; the step is what fails
    with pytest.raises(selfcheck.SelfCheckError, match="--cuda_graph=false"):
        settle(dataclasses.replace(tiny("triton"), compile=True), *nets(cfg))


def test_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    """An OOM in the check (its kernels or its step) is the batch not fitting: it goes up as itself
    for train.py's one line, rather than a fallback to the torch backend or the eager step."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cfg = tiny()
    G, D = nets(cfg)
    real_forward = fused.forward
    monkeypatch.setattr(fused, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError):
        settle(cfg, G, D)
    monkeypatch.setattr(fused, "forward", real_forward)   # not undo(): on_device's settings stay
    monkeypatch.setattr(selfcheck, "parity", lambda *a: {})
    monkeypatch.setattr(GraphedStep, "step", oom)
    with pytest.raises(torch.OutOfMemoryError):
        settle(cfg, G, D)
    assert G.backend == D.backend == "triton"


def test_every_rank_takes_the_most_cautious_outcome(monkeypatch):
    """Two ranks: this one passes, the other's kernels failed: both train on the torch backend
    (a rank on another backend or step would hang DDP's first all-reduce)."""
    monkeypatch.setattr(selfcheck, "check", lambda *a, **k: selfcheck.Report({}, step="eager step"))
    monkeypatch.setattr(distrib, "gather_objects",
                        lambda d, obj: [obj, ("parity", "the fused kernels raised CompilationError: at 12:4")])
    cfg = tiny()
    G, D = nets(cfg)
    lines = []
    new, backend = selfcheck.settle(cfg, distrib.Dist(rank=0, world_size=2, device=DEVICE), G, D, lines.append)
    assert backend == "torch" and G.backend == "torch"
    assert lines == ["self-check on rank 1: the fused kernels raised CompilationError: at 12:4; "
                     "training on the torch backend"]


def test_train_reports_a_failed_check_in_one_line(monkeypatch, capsys):
    import fastgan.train as train_mod

    def fails(cfg, d, resume=None):
        raise selfcheck.SelfCheckError("self-check of the triton backend failed: the fused kernels raised X")
    monkeypatch.setattr(train_mod, "train", fails)
    from fastgan import errors
    from runs import ROOT
    celeba = str(ROOT / "configs" / "dcgan" / "dcgan_celeba-cropped_64_b128x1_300k.py")
    with pytest.raises(SystemExit) as info:
        errors.main(train_mod.main, [celeba, "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: self-check of the triton backend failed: the fused kernels raised X"]
