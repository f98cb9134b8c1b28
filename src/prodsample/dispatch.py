"""Which implementation of the fused sampling pass runs on a device.

Every backend implements `prodsample.sampling.reference_fused_sample`'s contract and draws the same token
under the same keyed noise. "auto" picks the fastest backend verified on this device.
"""

from __future__ import annotations

import torch

from .sampling import FusedSampler, reference_fused_sample

__all__ = ["fused_sampler", "BACKENDS"]

BACKENDS = ("auto", "reference")


def fused_sampler(device: torch.device, backend: str = "auto") -> FusedSampler:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return reference_fused_sample
