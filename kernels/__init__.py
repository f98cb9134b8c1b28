"""Fused Triton kernels, shipped as prodsample.kernels."""
