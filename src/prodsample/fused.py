"""The fused sampling pass's contract: what it reads (`FusedInputs`), what it returns (`ProductSample`), the
protocol every backend implements (`FusedSampler`), and the eager reference that defines it
(`reference_fused_sample`).

A leaf of the core: it imports only `mixing` and `noise`, so the sampler pipeline (`prodsample.sampling`),
the dispatcher (`prodsample.dispatch`) and the kernels (`prodsample.kernels`) all import it and none of
them imports another to learn the contract. The math is in `prodsample.sampling`'s module docstring.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch

from .mixing import weighted_logprob_sum
from .noise import log_exponential_noise

__all__ = ["FusedInputs", "ProductSample", "FusedSampler", "reference_fused_sample", "mixed_logits"]


class FusedInputs(NamedTuple):
    """Everything one fused pass reads. Logits `[B, V]` (fp32, fp16 or bf16; −inf = masked), the rest `[B]`."""

    plain_logits: torch.Tensor
    guide_logits: torch.Tensor
    lam: torch.Tensor  # float32, λ ∈ [0, 1]
    temperature: torch.Tensor  # float32, 0 = greedy
    threshold: torch.Tensor | None  # float32, in units of z; tokens below it are dropped (None = no filter)
    keys: torch.Tensor  # int64 noise keys (`prodsample.noise.row_keys`)


class ProductSample(NamedTuple):
    """What one sampling step drew, and from what. All `[B]`."""

    token_ids: torch.Tensor  # int64
    logprobs: torch.Tensor  # log q_t(o_t), float32
    plain_logprobs: torch.Tensor  # log_softmax(plain / T)(o_t)
    guide_logprobs: torch.Tensor  # log_softmax(guide / T)(o_t)
    log_normalizer: torch.Tensor  # see prodsample.sampling's module docstring


class FusedSampler(Protocol):
    """A backend of the fused pass: the outputs of `reference_fused_sample` for the same inputs, and the same
    token under the same keyed noise (up to float rounding at a near-tie)."""

    def __call__(self, inputs: FusedInputs, /) -> ProductSample: ...


def mixed_logits(
    plain_logits: torch.Tensor, guide_logits: torch.Tensor, lam: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """z = (λ·a + (1−λ)·b)/T in float32 `[B, V]` (T = 0 rows use T = 1; a weight-0 context has no say)."""
    weights = torch.stack([lam, 1.0 - lam], dim=1)
    inverse_temperature = torch.where(temperature > 0, 1.0 / temperature.clamp_min(1e-30), 1.0).unsqueeze(1)
    return weighted_logprob_sum([plain_logits.float(), guide_logits.float()], weights) * inverse_temperature


def kept_mixed_logits(inputs: FusedInputs) -> torch.Tensor:
    """z with the tokens the filters drop set to −inf."""
    z = mixed_logits(inputs.plain_logits, inputs.guide_logits, inputs.lam, inputs.temperature)
    return z if inputs.threshold is None else torch.where(z >= inputs.threshold.unsqueeze(1), z, -math.inf)


def reference_fused_sample(inputs: FusedInputs) -> ProductSample:
    """The eager reference of the fused pass: what the compiled and Triton backends must reproduce."""
    z = kept_mixed_logits(inputs)
    raced = z - log_exponential_noise(inputs.keys, z.shape[1])
    token_ids = torch.where(inputs.temperature == 0, z.argmax(dim=-1), raced.argmax(dim=-1))
    return outputs_at(inputs, z, token_ids)


def outputs_at(inputs: FusedInputs, z: torch.Tensor, token_ids: torch.Tensor) -> ProductSample:
    """Every output for given tokens, from the kept mixed logits z. Greedy rows give log q = 0 to the argmax
    (and −inf to any other token)."""
    lam, temperature = inputs.lam, inputs.temperature
    greedy = temperature == 0
    inverse_temperature = torch.where(greedy, 1.0, 1.0 / temperature.clamp_min(1e-30))
    plain = inputs.plain_logits.float()
    guide = inputs.guide_logits.float()
    chosen = token_ids.unsqueeze(1)
    z_chosen = z.gather(1, chosen).squeeze(1)
    log_mass = torch.logsumexp(z, dim=-1)
    expert_lse = weighted_logprob_sum(
        [torch.logsumexp(plain, dim=-1, keepdim=True), torch.logsumexp(guide, dim=-1, keepdim=True)],
        torch.stack([lam, 1.0 - lam], dim=1),
    ).squeeze(1)
    is_argmax = z_chosen >= z.max(dim=-1).values
    log_normalizer = torch.where(greedy, z_chosen, log_mass) - expert_lse * inverse_temperature
    logprobs = torch.where(greedy, torch.where(is_argmax, 0.0, -math.inf), z_chosen - log_mass)

    def tempered_logprob(logits: torch.Tensor) -> torch.Tensor:
        scaled = logits * inverse_temperature.unsqueeze(1)
        return scaled.gather(1, chosen).squeeze(1) - torch.logsumexp(scaled, dim=-1)

    return ProductSample(token_ids, logprobs, tempered_logprob(plain), tempered_logprob(guide), log_normalizer)
