"""Test setup. Without a GPU, Triton kernels run on CPU tensors through the interpreter, which
must be switched on before any @triton.jit function is defined, so before fastgan.kernels loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(params=[True, False], ids=["flat_k", "tap_loop"])
def k_loop(request, monkeypatch):
    """Run a kernel test with both K-loop structures (kernels/utils.flat_k): the interpreter
    would otherwise only exercise the flat one, and the GPU uses the tap loop on wide layers."""
    import fastgan.kernels.utils as utils
    monkeypatch.setattr(utils, "FORCE_FLAT_K", request.param)
    return request.param
