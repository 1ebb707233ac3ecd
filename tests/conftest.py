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


@pytest.fixture
def on_device(monkeypatch):
    """Kernel tests: tensors on the GPU when there is one (DEVICE in tests/parity.py), and fp32
    GEMMs in IEEE fp32 on both sides of a parity check (torch defaults cuDNN convolutions to tf32;
    tests that want tf32 turn it back on)."""
    from parity import DEVICE
    if DEVICE.type == "cpu":      # already the default; the device mode would slow every torch call
        yield DEVICE
        return
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(DEVICE)
    yield DEVICE
    torch.set_default_device(None)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
