"""Timing on the device, shared by the benchmarks: device names, device-side timing (CUDA events,
perf_counter on a CPU), the bf16 matmul peak, kernel counts, and a CUDA-graph-captured call."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn, iters: int, device: torch.device) -> float:
    """Seconds for `iters` calls of fn(i): CUDA events around the block, or perf_counter."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    for i in range(iters):
        fn(i)
    return time.perf_counter() - t


def peak_tflops(device: torch.device, n: int, repeats: int = 5) -> float:
    """bf16 matmul TFLOP/s on random n x n operands (median of blocks; never zeros: a matmul on zeros
    runs faster than on real data)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    iters = 20 if device.type == "cuda" else 1
    secs = [time_block(lambda i: a @ b, iters, device) / iters for _ in range(repeats)]
    return 2 * n ** 3 / statistics.median(secs) / 1e12


def count_kernels(fn, device: torch.device) -> dict:
    """GPU kernels and host-side launch calls of one call of fn (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(0)
        sync(device)
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU
                   and e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                                  "cudaGraphLaunch"))
    return {"kernels_per_iter": kernels, "launch_calls_per_iter": launches}


class GraphedSample:
    """A sampling function captured in one CUDA graph: copy z in, replay (the PyTorch docs' recipe:
    warm up on a side stream, then capture)."""

    def __init__(self, fn, z: torch.Tensor, warmup: int = 3):
        self.z = z.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.z)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.z)

    def __call__(self, z):
        self.z.copy_(z)
        self.graph.replay()
        return self.out
