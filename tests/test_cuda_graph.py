"""fastgan/cuda_graph.py: GraphedStep against TrainStep.

CPU (about 1 minute on 2 cores, half of it the aot_eager compile; tiny models: 32x32,
base_channels 8, batch 4): the uncaptured function equals TrainStep exactly for both recipes,
across checkpoints loaded either way; the flat-bucket all-reduce equals DDP on 2 gloo processes;
torch.compile traces it; build_step's choice and log line.
CUDA only (skipped here): captured replay against the uncaptured step and TrainStep for 10
iterations, backends torch and triton, fp32 and bf16; no host sync in replays; NCCL capture.
"""

import copy
import dataclasses
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgan import config as C
from fastgan.cuda_graph import GraphedStep, build_step, why_not
from fastgan.models import build
from fastgan.step import OUTPUTS, TrainStep
from parity import fresh_seed

B = 4
CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(recipe="mmgen", **kw) -> C.Config:
    return C.Config(recipe=recipe, batch_size=B, model=C.ModelConfig(preset=recipe, resolution=32, base_channels=8),
                    **kw)


def nets(cfg, device=CPU, backend="torch", seed=None):
    torch.manual_seed(fresh_seed() if seed is None else seed)
    G, D = build(cfg.model, backend)
    for net in (G, D):
        net.deterministic = True
    return G.to(device), D.to(device)


def copies(G, D):
    return copy.deepcopy(G), copy.deepcopy(D)


def run(steps, iters: int, seed: int, device=CPU) -> list[list[torch.Tensor]]:
    """The same fresh real batches and z through every step; losses per step per iteration."""
    gens = [torch.Generator(device).manual_seed(seed) for _ in steps]
    out = [[] for _ in steps]
    for _ in range(iters):
        for i, (s, g) in enumerate(zip(steps, gens)):
            real = torch.rand(B, 3, 32, 32, generator=g, device=device) * 2 - 1
            out[i].append(s.step(real, s.noise(B, g)))
    return out


def assert_same(a: TrainStep, b: TrainStep, rtol=0.0, atol=0.0) -> None:
    """Parameters, BN buffers and Adam state of two steps' models (exact by default)."""
    for net_a, net_b in ((a.G, b.G), (a.D, b.D)):
        for (name, x), y in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for key in ("opt_g", "opt_d"):
        sa, sb = getattr(a, key).state_dict()["state"], getattr(b, key).state_dict()["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sb[i][k].cpu(), sa[i][k].cpu(), rtol=rtol, atol=atol,
                                           msg=lambda m, i=i, k=k: f"{key} param {i} {k}: {m}")


def through_checkpoint(state: dict) -> dict:
    """What train.py's checkpoint round trip does to a step's state (torch.save, load to the CPU)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


# -- CPU: the function, uncaptured -------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_matches_trainstep_exactly_and_across_checkpoints(recipe):
    cfg, seed = tiny(recipe), fresh_seed()
    G, D = nets(cfg)
    ref, graphed = TrainStep(cfg, *copies(G, D), CPU), GraphedStep(cfg, G, D, CPU)
    assert not graphed.capture
    losses = run([ref, graphed], 3, seed)
    for i, (a, b) in enumerate(zip(*losses)):
        assert torch.equal(a, b), f"iteration {i}: {a} != {b} (seed {seed})"
    assert len({tuple(x.tolist()) for x in losses[0]}) == 3         # training moves
    assert_same(ref, graphed)

    # TrainStep's checkpoint into a new GraphedStep, GraphedStep's into a new TrainStep: same again.
    graphed2 = GraphedStep(cfg, graphed.G, graphed.D, CPU)
    ref2 = TrainStep(cfg, ref.G, ref.D, CPU)
    graphed2.load_state_dict(through_checkpoint(ref.state_dict()))
    ref2.load_state_dict(through_checkpoint(graphed.state_dict()))
    assert_same(ref2, graphed2)
    for a, b in zip(*run([ref2, graphed2], 2, seed + 1)):
        assert torch.equal(a, b), f"after the round trip: {a} != {b} (seed {seed})"
    assert_same(ref2, graphed2)
    assert all(p.grad is not None and p.grad._base is graphed2._grads_g for p in graphed2.G.parameters())


def test_compiled_function_matches_eager():
    cfg, seed = tiny(), fresh_seed()
    G, D = nets(cfg)
    eager = GraphedStep(cfg, *copies(G, D), CPU)
    # aot_eager: dynamo + AOT autograd trace it as inductor would, in seconds instead of minutes.
    compiled = GraphedStep(dataclasses.replace(cfg, compile=True), G, D, CPU, compile_backend="aot_eager")
    for a, b in zip(*run([eager, compiled], 3, seed)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)    # decompositions may reorder float sums
    # Parameters: Adam's first steps are ~lr * sign(g); where a gradient lies within rounding of 0
    # the reordered sums can flip the sign, moving that weight by up to 2 lr per iteration. Such
    # elements are rare; everywhere else the two agree to rounding.
    lr = cfg.optim.lr_g
    for net_a, net_b in ((eager.G, compiled.G), (eager.D, compiled.D)):
        for (name, x), y in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            diff = (y.float() - x.float()).abs()
            assert diff.max() <= 3 * 2 * lr * 1.001, f"{name}: {diff.max():.2e} beyond 3 iterations of 2 lr"
            assert (diff > 1e-5).float().mean() <= 0.02, f"{name}: {(diff > 1e-5).float().mean():.1%} differ"


def test_build_step_says_which_runs():
    lines = []
    step = build_step(tiny(), *nets(tiny()), CPU, log=lines.append)
    assert type(step) is TrainStep and lines == ["step: eager (no CUDA graph: device is cpu)"]
    build_step(tiny(compile=True), *nets(tiny()), CPU, log=lines.append)
    assert lines[-1].startswith("step: compiled (no CUDA graph")
    cuda = torch.device("cuda", 0)
    assert why_not(tiny(), cuda) is None
    assert "GradScaler" in why_not(tiny(amp="fp16"), cuda)
    assert why_not(tiny(cuda_graph=False), cuda) == "cuda_graph=false"
    with pytest.raises(ValueError, match="amp=fp16"):
        GraphedStep(tiny(amp="fp16"), *nets(tiny()), CPU)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphedStep(tiny(), *nets(tiny()), CPU, capture=True)


class FakeGraph:
    """torch.cuda.graph's context manager, without a GPU: the body runs; `end_error` is what
    capture_end raises on leaving after a failed body (CUDA's "operation failed due to a previous
    error during capture")."""

    def __init__(self, end_error=None):
        self.end_error = end_error

    def __call__(self, graph, **kw):
        return self

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if value is not None and self.end_error is not None:
            raise self.end_error
        return False


@pytest.mark.parametrize("end_error", [None, RuntimeError("CUDA error: operation failed due to a previous error "
                                                          "during capture")], ids=["body", "capture_end"])
def test_out_of_memory_in_capture_stays_out_of_memory(monkeypatch, end_error):
    """An OOM while capturing goes up as itself (train.py then advises a smaller batch), also when
    capture_end raises its own error on the way out; any other failure says --cuda_graph=false."""
    cfg = tiny()
    step = GraphedStep(cfg, *nets(cfg), CPU)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FakeGraph(end_error))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fails(real, z, error=oom):
        raise error
    step._fn = fails
    with pytest.raises(torch.OutOfMemoryError) as info:
        step._capture()
    assert info.value is oom
    step._fn = lambda real, z: fails(real, z, RuntimeError("operation not permitted when stream is capturing"))
    with pytest.raises(RuntimeError, match=r"CUDA graph failed .*--cuda_graph=false") as info:
        step._capture()
    assert not isinstance(info.value, torch.OutOfMemoryError)


# -- CPU, 2 processes: the flat-bucket all-reduce against DDP ------------------------------------

def _ddp_worker(rank: int, world: int, init: str, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for recipe in ("mmgen", "pytorch_examples"):
            cfg = tiny(recipe)
            G, D = nets(cfg, seed=seed + rank)          # different per rank: both start from rank 0's
            ddp = TrainStep(cfg, *copies(G, D), CPU, distributed=True)
            flat = GraphedStep(cfg, G, D, CPU, distributed=True)
            losses = run([ddp, flat], 3, seed + 100 + rank)                 # each rank its own data
            for a, b in zip(*losses):
                assert torch.equal(a, b), f"{recipe} rank {rank}: {a} != {b} (seed {seed})"
            assert_same(ddp, flat)
            mine = torch.cat([p.detach().flatten() for p in flat.G.parameters()] + [losses[1][-1]])
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            n = mine.numel() - losses[1][-1].numel()   # parameters, then this rank's losses and D outputs
            assert torch.equal(every[0][:n], every[1][:n]), "parameters differ across ranks"
            assert not torch.equal(every[0][n:], every[1][n:]), "ranks saw the same data"
            del ddp, flat              # DDP's reducer goes before its process group does
        # The EMA generator starts from rank 0's G too (it is copied before the broadcast).
        cfg = tiny(ema=C.EMAConfig(enabled=True))
        flat = GraphedStep(cfg, *nets(cfg, seed=seed + rank), CPU, distributed=True)
        mine = torch.cat([t.flatten().float() for t in flat.ema.module.state_dict().values()])
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        assert torch.equal(every[0], every[1]), "the EMA generator differs across ranks"
        assert torch.equal(mine, torch.cat([t.flatten().float() for t in flat.G.state_dict().values()]))
        dist.barrier()                 # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_flat_bucket_all_reduce_equals_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", fresh_seed()), nprocs=2)


# -- CUDA (a GPU session runs these) --------------------------------------------------------------

@pytest.fixture
def deterministic_cuda():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@cuda_only
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("recipe", ["mmgen", "pytorch_examples"])
def test_replay_equals_uncaptured_and_trainstep(deterministic_cuda, backend, amp, recipe):
    """10 iterations: 3 warm-up, capture, 7 replays. Deterministic kernels run the same launches
    captured or not, so fp32 is exact; bf16 gets 1e-3 of slack on losses and states (Adam moves
    each weight by about lr = 2e-4 per step, so a real divergence shows within a few steps)."""
    dev, seed = deterministic_cuda, fresh_seed()
    cfg = tiny(recipe, amp=amp)
    G, D = nets(cfg, dev, backend)
    ref = TrainStep(cfg, *copies(G, D), dev)
    eager = GraphedStep(cfg, *copies(G, D), dev, capture=False)
    graphed = GraphedStep(cfg, G, D, dev)
    tol = {"rtol": 0.0, "atol": 0.0} if amp == "fp32" else {"rtol": 1e-3, "atol": 1e-3}
    losses = run([ref, eager, graphed], 10, seed, dev)
    assert graphed._graph is not None
    for i in range(10):
        for other in (losses[0][i], losses[1][i]):
            torch.testing.assert_close(losses[2][i], other, **tol, msg=lambda m, i=i: f"iteration {i}: {m}")
    assert_same(eager, graphed, **tol)
    assert_same(ref, graphed, **tol)
    assert all(s["step"].device == dev for s in graphed.opt_g.state.values())


@cuda_only
def test_replays_never_sync_the_host(deterministic_cuda):
    dev = deterministic_cuda
    cfg = tiny(amp="bf16")
    step = GraphedStep(cfg, *nets(cfg, dev, "triton"), dev)
    gen = torch.Generator(dev).manual_seed(fresh_seed())
    batches = [(torch.rand(B, 3, 32, 32, device=dev, generator=gen) * 2 - 1, step.noise(B, gen)) for _ in range(8)]
    acc = torch.zeros(len(OUTPUTS), device=dev)
    for real, z in batches[:4]:            # warm-up, capture, first replay
        acc += step.step(real, z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for real, z in batches[4:]:
            acc += step.step(real, z)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(acc).all()


@cuda_only
def test_compiled_capture_matches_eager(deterministic_cuda):
    dev, seed = deterministic_cuda, fresh_seed()
    cfg = tiny(amp="bf16")
    G, D = nets(cfg, dev, "triton")
    eager = GraphedStep(cfg, *copies(G, D), dev, capture=False)
    graphed = GraphedStep(dataclasses.replace(cfg, compile=True), G, D, dev)
    for a, b in zip(*run([eager, graphed], 6, seed, dev)):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)    # inductor fuses the bf16 casts differently
    assert graphed._graph is not None


@cuda_only
def test_nccl_all_reduce_captured(deterministic_cuda, tmp_path):
    """One rank with NCCL: the all-reduce (AVG over 1 rank: identity) is captured with the rest."""
    dev, seed = deterministic_cuda, fresh_seed()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            device_id=dev)
    try:
        cfg = tiny()
        G, D = nets(cfg, dev, "triton")
        eager = GraphedStep(cfg, *copies(G, D), dev, capture=False)
        graphed = GraphedStep(cfg, G, D, dev, distributed=True)
        for a, b in zip(*run([eager, graphed], 10, seed, dev)):
            assert torch.equal(a, b)
        assert graphed._graph is not None
        assert_same(eager, graphed)
    finally:
        dist.destroy_process_group()


@cuda_only
def test_checkpoints_cross_between_steps_on_cuda(deterministic_cuda):
    """A GraphedStep checkpoint resumes in TrainStep (and on the CPU's format), and back."""
    dev, seed = deterministic_cuda, fresh_seed()
    cfg = tiny()
    G, D = nets(cfg, dev)
    graphed = GraphedStep(cfg, *copies(G, D), dev)
    ref = TrainStep(cfg, G, D, dev)
    run([ref, graphed], 5, seed, dev)
    state = through_checkpoint(graphed.state_dict())
    assert not any(g["capturable"] for g in state["opt_g"]["param_groups"])
    ref.load_state_dict(state)
    graphed.load_state_dict(through_checkpoint(ref.state_dict()))
    assert graphed._graph is None and all(g["capturable"] for g in graphed.opt_d.param_groups)
    for a, b in zip(*run([ref, graphed], 5, seed + 1, dev)):
        assert torch.equal(a, b)
    assert_same(ref, graphed)
