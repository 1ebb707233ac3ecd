"""Test setup. Without a GPU, Triton kernels run on CPU tensors through the interpreter, which
must be switched on before any @triton.jit function is defined, so before fastgan.kernels loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
