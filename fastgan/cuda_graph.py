"""The CUDA-graph step: the training iteration of fastgan/step.py, captured whole in one CUDA
graph and replayed.

At batch 128 the MMGen iteration is ~1.6 ms of math spread over a few hundred kernel launches
(bench/NOTES.md); launched one by one from Python, the gaps between them cost as much as the math.
GraphedStep runs the same function (D step and G step, both recipes, bf16/fp32 autocast) and:

- iterations 1..WARMUP_ITERS run for real, uncaptured, on a side stream: they train as TrainStep
  would and let every lazy thing happen outside capture (Adam's state, cuBLAS workspaces, the NCCL
  communicator, torch.compile's compilation and autotuning);
- the next call captures the function into one torch.cuda.CUDAGraph (capture runs nothing), then
  replays it; from then on `step(real, z)` is two copies into static buffers, one replay and a
  clone of the outputs (the next replay overwrites them).
  z is still drawn by the caller from its generator, so resume stays exact;
- Adam(fused=True, capturable=True): its step counter lives on the device;
- grads are views into one flat buffer per network, zeroed before each backward (0 + g == g,
  so the math matches TrainStep's set_to_none), so capture sees fixed addresses;
- DDP without a DDP wrapper: the flat buffer is all-reduced inside the captured function (NCCL
  collectives are capturable). BN running statistics stay per rank, as with TrainStep.

It does not apply (build_step says so and uses TrainStep) off CUDA, with amp=fp16, or with
cuda_graph=false. fp16 stays out of the graph because it has never been run under capture on a GPU:
whether the GradScaler's state (its scale, made on first use, and growth tracker) and its update
replay correctly is unverified, and a wrong scale would skip or corrupt steps silently. (found_inf
is not the obstacle: fused Adam takes it as a device tensor, with no host read.)
On a CPU, GraphedStep runs its function uncaptured (capture=False), which is how its math is
tested against TrainStep.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from fastgan.step import TrainStep

WARMUP_ITERS = 3   # eager iterations before capture (the PyTorch CUDA-graph docs' example uses 3)
COMPILE_MODE = "max-autotune-no-cudagraphs"   # the graph is ours; inductor's would nest in it


def why_not(cfg, device: torch.device) -> str | None:
    """Why the iteration cannot run as a CUDA graph with this config; None when it can."""
    if not cfg.cuda_graph:
        return "cuda_graph=false"
    if device.type != "cuda":
        return f"device is {device.type}"
    if cfg.amp == "fp16":
        return "amp=fp16: the GradScaler is not verified under CUDA-graph capture"
    return None


def build_step(cfg, G: nn.Module, D: nn.Module, device: torch.device, distributed: bool = False,
               log=print) -> TrainStep:
    """GraphedStep where it applies, else TrainStep; logs which one runs, once."""
    reason = why_not(cfg, device)
    if reason is None:
        log(f"step: cuda graph ({f'compiled, {COMPILE_MODE}; ' if cfg.compile else ''}"
            f"{WARMUP_ITERS} eager warm-up iterations, then one replay per iteration)")
        return GraphedStep(cfg, G, D, device, distributed=distributed)
    log(f"step: {'compiled' if cfg.compile else 'eager'} (no CUDA graph: {reason})")
    return TrainStep(cfg, G, D, device, distributed=distributed)


def _flat_grads(module: nn.Module) -> torch.Tensor:
    """One zeroed buffer holding every parameter's .grad as a view (parameter order)."""
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


class GraphedStep(TrainStep):
    """TrainStep's interface (`step`, `noise`, `state_dict`, `load_state_dict`, `opt_g`, `opt_d`,
    `scaler`) and math, replayed from one CUDA graph.

    capture: None = on CUDA. False runs the same function uncaptured (tests; CPU with gloo).
    compile_backend: torch.compile backend when cfg.compile ("aot_eager" in CPU tests).
    """

    def __init__(self, cfg, G: nn.Module, D: nn.Module, device: torch.device, distributed: bool = False,
                 *, capture: bool | None = None, warmup: int = WARMUP_ITERS, compile_backend: str = "inductor"):
        if cfg.amp == "fp16":
            raise ValueError("GraphedStep does not run amp=fp16: the GradScaler is not verified under CUDA-graph "
                             "capture; use TrainStep (fastgan.cuda_graph.build_step picks it)")
        cuda = device.type == "cuda"
        # No DDP wrapper (the flat gradient buffers are all-reduced inside the graph) and no compile
        # of TrainStep's own: the function is compiled below, as the graph will capture it.
        super().__init__(dataclasses.replace(cfg, compile=False), G, D, device, capturable=cuda)
        self.capture = cuda if capture is None else capture
        if self.capture and not cuda:
            raise ValueError(f"CUDA graph capture needs a CUDA device, got {device}")
        self.warmup = warmup
        self.distributed = distributed
        if distributed:
            self.world_size = dist.get_world_size()
            # NCCL averages inside the reduction; gloo has no AVG. DDP's own order is the second:
            # grad * (1 / W) into the bucket, then SUM (bit-identical to it for W = 2).
            self._nccl_avg = dist.get_backend() == "nccl"
            # DDP starts from rank 0's parameters and buffers; so do we, and the EMA generator
            # (super().__init__ copied it from this rank's G before this broadcast).
            ema = self.ema.module.state_dict().values() if self.ema is not None else []
            with torch.no_grad():
                for t in [*G.state_dict().values(), *D.state_dict().values(), *ema]:
                    dist.broadcast(t, src=0)
        self._grads_g, self._grads_d = _flat_grads(G), _flat_grads(D)
        if cfg.compile:
            kw = {"mode": COMPILE_MODE} if compile_backend == "inductor" else {}
            self._fn = torch.compile(self._fn, backend=compile_backend, **kw)
        self._stream = torch.cuda.Stream(device) if self.capture else None
        self._reset_graph()

    def _reset_graph(self) -> None:
        self._graph = None
        self._warm = 0
        self._real = self._z = self._out = None

    # -- the iteration ---------------------------------------------------------------------------

    def step(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One iteration; the losses and D outputs (step.OUTPUTS) as a device tensor. No host sync."""
        if not self.capture:
            return self._fn(real, z)
        if self._real is None:
            self._real = torch.empty(real.shape, dtype=real.dtype, device=self.device)
            self._z = torch.empty(z.shape, dtype=z.dtype, device=self.device)
        elif real.shape != self._real.shape or z.shape != self._z.shape:
            raise ValueError(f"the CUDA graph was captured for real {tuple(self._real.shape)} and z "
                             f"{tuple(self._z.shape)}; got {tuple(real.shape)} and {tuple(z.shape)}")
        self._real.copy_(real, non_blocking=True)
        self._z.copy_(z, non_blocking=True)
        if self._graph is None:
            if self._warm < self.warmup:
                return self._warm_step()
            self._capture()
        self._graph.replay()
        return self._out.clone()   # _out is rewritten by the next replay

    def _warm_step(self) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            out = self._fn(self._real, self._z)
        main.wait_stream(self._stream)
        out.record_stream(main)   # allocated on the side stream, read on main by the caller
        self._warm += 1
        return out

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        # The warm-up's stream again (handles and workspaces are cached per stream);
        # thread_local: DALI's and the NCCL watchdog's threads may touch CUDA meanwhile.
        try:
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                out = self._fn(self._real, self._z)
        except RuntimeError as e:
            # Out of memory is not the graph's fault: the OOM itself goes up (train.py advises a
            # smaller batch). capture_end may raise its own error, with the OOM as its context.
            oom = next((x for x in (e, e.__context__) if isinstance(x, torch.OutOfMemoryError)), None)
            if oom is not None:
                raise oom
            raise RuntimeError(f"capturing the training iteration in a CUDA graph failed ({e}); "
                               "run with --cuda_graph=false to train without one") from e
        self._graph, self._out = graph, out

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        grads = self._grads_g if opt is self.opt_g else self._grads_d
        grads.zero_()
        loss.backward()          # accumulates into the views: 0 + g
        if self.distributed:
            self._all_reduce(grads)
        opt.step()

    @torch.compiler.disable   # a graph break costs nothing under replay; collectives stay eager
    def _all_reduce(self, grads: torch.Tensor) -> None:
        if self._nccl_avg:
            dist.all_reduce(grads, op=dist.ReduceOp.AVG)
        else:
            grads.mul_(1.0 / self.world_size)
            dist.all_reduce(grads)

    # -- checkpoint state: TrainStep's format ------------------------------------------------------

    def state_dict(self) -> dict:
        state = super().state_dict()
        for key in ("opt_g", "opt_d"):   # a saved group's flags override the loader's own
            for group in state[key]["param_groups"]:
                group["capturable"] = False
        return state

    def load_state_dict(self, state: dict) -> list[str]:
        if self.capture:
            torch.cuda.synchronize(self.device)   # replays in flight still read the old state
        changed = super().load_state_dict(state)
        if self.capturable:
            for opt in (self.opt_g, self.opt_d):
                for group in opt.param_groups:
                    group.update(fused=True, capturable=True)
                    for p in group["params"]:
                        s = opt.state.get(p)
                        if s:   # a CPU TrainStep keeps `step` on the host; capturable wants it here
                            s["step"] = s["step"].to(device=p.device, dtype=torch.float32)
        self._reset_graph()      # the optimizer state tensors are new: warm up and capture again
        return changed
