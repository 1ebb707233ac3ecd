"""Fused Triton kernels for DCGAN layers (installed as fastgan.kernels)."""
