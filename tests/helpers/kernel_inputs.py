"""Inputs of a fused sampling backend (`prodsample.fused.FusedInputs`), shared by the compiled-path and
Triton-kernel tests so that both face the same cases."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from prodsample import noise
from prodsample.fused import FusedInputs, mixed_logits


def noise_keys(rows: int, seed: int = 0) -> torch.Tensor:
    return noise.row_keys(torch.full((rows,), seed), torch.arange(rows), torch.full((rows,), 5))


def fused_inputs(draw, rows: int, vocab: int) -> FusedInputs:
    """The inputs of a fused backend, drawn to reach every code path: λ ∈ {0, 1} or inside, greedy rows,
    −inf logits, a per-row threshold, half-precision inputs, ties."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from([0.0, 1.0, 4.0, 30.0]))  # 0: every logit equal, all ties
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    plain = (scale * torch.randn(rows, vocab, generator=generator)).to(dtype)
    guide = (scale * torch.randn(rows, vocab, generator=generator)).to(dtype)
    mask_rate = draw(st.sampled_from([0.0, 0.3, 0.9]))
    plain = plain.masked_fill(torch.rand(rows, vocab, generator=generator) < mask_rate, -math.inf)
    guide = guide.masked_fill(torch.rand(rows, vocab, generator=generator) < mask_rate, -math.inf)
    shared = torch.randint(0, vocab, (rows, 1), generator=generator)  # one token every context keeps
    plain.scatter_(1, shared, 0.0)
    guide.scatter_(1, shared, 0.0)
    lam = torch.tensor([draw(st.sampled_from([0.0, 1.0]) | st.floats(1e-3, 1 - 1e-3)) for _ in range(rows)])
    temperature = torch.tensor([draw(st.sampled_from([0.0, 1.0]) | st.floats(0.3, 2.0)) for _ in range(rows)])
    threshold = None
    if draw(st.booleans()):
        z = mixed_logits(plain, guide, lam, temperature)
        keep = torch.randint(1, vocab + 1, (rows, 1), generator=generator)
        threshold = torch.sort(z, dim=1, descending=True).values.gather(1, keep - 1).squeeze(1)
    return FusedInputs(plain, guide, lam, temperature, threshold, noise_keys(rows, draw(st.integers(0, 2**40))))


def chi_square_logits():
    """Plain and guide disagree (the product differs from either); one token masked in the plain context."""
    plain = torch.tensor([2.0, 1.5, 0.0, -1.0, 0.5, -0.5, 1.0, -math.inf])
    guide = torch.tensor([-1.0, 0.5, 2.0, 1.5, 0.0, 1.0, -0.5, 0.3])
    return plain, guide


CHI_SQUARE_FILTERS = [dict(temperature=0.8), dict(temperature=1.2, top_k=5)]
