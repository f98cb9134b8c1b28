"""Sampling from the per-step product distribution, with the exact log-probs of what was sampled.

At step t, with a = plain logits, b = guide logits (one row each), λ ∈ [0, 1] and temperature T > 0,

    ℓ_plain = log_softmax(a),   ℓ_guide = log_softmax(b)
    q_t(v) ∝ exp((λ·ℓ_plain(v) + (1−λ)·ℓ_guide(v)) / T)   on the tokens the filters keep, 0 elsewhere.

Because ℓ differs from the raw logits by a per-row constant, q_t is also softmax of the *raw mixed
logits* z = (λ·a + (1−λ)·b)/T over the kept tokens: no log-softmax pass is needed to sample, which is
what lets one streaming pass (the Triton kernel) do all of it. The returned `log_normalizer` satisfies

    log q_t(o_t) = (λ·ℓ_plain(o_t) + (1−λ)·ℓ_guide(o_t)) / T − log_normalizer

exactly, i.e. log_normalizer = logsumexp_kept(z) − (λ·LSE(a) + (1−λ)·LSE(b)) / T. T = 0 is greedy: the
argmax of z, log q = 0, log_normalizer = λ·ℓ_plain(o) + (1−λ)·ℓ_guide(o), and the plain/guide log-probs
are reported at T = 1. `plain_logprobs` = log_softmax(a / T)(o) and `guide_logprobs` = log_softmax(b / T)(o),
without filters: what a trainer computes for π at temperature T.

Filters, in this order, each on the distribution the previous one left (renormalised), as transformers'
warpers do: temperature → top-k → top-p → min-p. Each keeps the tokens whose z is at least a per-row
threshold, so they compose into one threshold; tokens tied with the boundary are kept.

The pipeline, in small named steps:  `_settings_rows` (validate and broadcast the per-row settings) →
`_noise_keys` → `filter_threshold` (only when a filter is on) → a backend's fused pass on `FusedInputs`
(`prodsample.fused.reference_fused_sample`, or the compiled / Triton paths chosen by `select_backend`) →
`_check_result` (no NaN leaves this module).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import dispatch
from .fused import FusedInputs, FusedSampler, ProductSample, kept_mixed_logits, mixed_logits, outputs_at
from .mixing import as_row_tensor, check_logits_pair, check_no_nan, fully_masked_message
from .noise import row_keys
from .settings import check_sampling_values

__all__ = ["product_sample", "product_logprobs", "filter_threshold", "select_backend"]

# Backends compute z with their own float rounding (an FMA here, a reciprocal there); a filter threshold is
# lowered by this relative amount so the token that sets it is kept by every backend.
THRESHOLD_SLACK = 2.0**-20


class SamplingRows(NamedTuple):
    """Per-row settings after validation, each `[B]`."""

    lam: torch.Tensor  # float32
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor | None  # int64, 0 = off
    top_p: torch.Tensor | None  # float32, 1 = off
    min_p: torch.Tensor | None  # float32, 0 = off


def _optional_rows(value, name, rows, device, dtype, off_value):
    if value is None:
        return None
    tensor = as_row_tensor(value, name, rows, device, dtype)
    return None if bool((tensor == off_value).all()) else tensor


def _settings_rows(rows: int, vocab: int, device, lam, temperature, top_k, top_p, min_p) -> SamplingRows:
    """Validate λ, temperature and the filters, and broadcast each to `[B]` (filters that are off → None)."""
    check_sampling_values(lam=lam, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    top_k_rows = _optional_rows(top_k, "top_k", rows, device, torch.int64, 0)
    if top_k_rows is not None and bool(((top_k_rows == 0) | (top_k_rows >= vocab)).all()):
        top_k_rows = None
    return SamplingRows(
        lam=as_row_tensor(lam, "lam", rows, device),
        temperature=as_row_tensor(temperature, "temperature", rows, device),
        top_k=top_k_rows,
        top_p=_optional_rows(top_p, "top_p", rows, device, torch.float32, 1.0),
        min_p=_optional_rows(min_p, "min_p", rows, device, torch.float32, 0.0),
    )


def _noise_keys(rows: int, device, generator, seed, rollout_ids, positions) -> torch.Tensor:
    """Per-row noise keys: from (seed, rollout id, position) when seeded, else from a fresh random seed."""
    if seed is None:
        if positions is not None or rollout_ids is not None:
            raise ValueError("rollout_ids and positions key the noise and need seed; pass seed as well")
        # One random seed per call keeps a single noise path: keyed noise under a fresh key.
        seed = torch.randint(0, 2**62, (), generator=generator, device="cpu")
        rollout_ids, positions = torch.arange(rows), torch.zeros(rows, dtype=torch.int64)
    elif generator is not None:
        raise ValueError("pass either seed (keyed noise) or generator, not both")
    elif positions is None:
        raise ValueError(
            "positions is required with seed: the noise is keyed by (seed, rollout id, position, token), and "
            "without positions every decode step would reuse the same noise"
        )
    if rollout_ids is None:
        rollout_ids = torch.arange(rows)
    return row_keys(
        as_row_tensor(seed, "seed", rows, device, torch.int64),
        as_row_tensor(rollout_ids, "rollout_ids", rows, device, torch.int64),
        as_row_tensor(positions, "positions", rows, device, torch.int64),
    )


def _filter_threshold_if_any(plain_logits, guide_logits, settings: SamplingRows) -> torch.Tensor | None:
    if settings.top_k is None and settings.top_p is None and settings.min_p is None:
        return None
    return filter_threshold(mixed_logits(plain_logits, guide_logits, settings.lam, settings.temperature), settings)


def filter_threshold(z: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Per-row threshold on z that applies top-k → top-p → min-p (multi-pass: one sort). `[B, V]` → `[B]`."""
    values, _ = torch.sort(z, dim=-1, descending=True)
    vocab = z.shape[1]
    threshold = torch.full_like(values[:, 0], -math.inf)
    if rows.top_k is not None:
        k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=vocab), vocab)
        threshold = values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    if rows.top_p is not None:
        # Mass strictly before each token (in descending order) within the top-k survivors, renormalised.
        survivors = torch.where(values >= threshold.unsqueeze(1), values, -math.inf)
        probs = torch.softmax(survivors, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        last_kept = ((mass_before < rows.top_p.unsqueeze(1)) & (survivors > -math.inf)).sum(dim=1).clamp(min=1) - 1
        threshold = torch.maximum(threshold, values.gather(1, last_kept.unsqueeze(1)).squeeze(1))
    if rows.min_p is not None:
        min_p_threshold = torch.where(rows.min_p > 0, values[:, 0] + torch.log(rows.min_p), -math.inf)
        threshold = torch.maximum(threshold, min_p_threshold)
    return threshold - THRESHOLD_SLACK * threshold.abs().clamp_min(1.0)


def select_backend(device: torch.device, backend: str = "auto") -> FusedSampler:
    """The fused pass for `device`: "reference" (eager torch), or "auto" (the fastest verified path)."""
    return dispatch.fused_sampler(device, backend)


def _check_result(result: ProductSample, plain_logits, guide_logits) -> None:
    """Nothing NaN leaves the sampler: diagnose a bad row from the `[B]` outputs, then name its cause."""
    bad = ~torch.isfinite(result.log_normalizer) | torch.isnan(result.plain_logprobs) | torch.isnan(result.guide_logprobs)
    if not bool(bad.any()):
        return
    check_no_nan(plain_logits, "plain_logits")
    check_no_nan(guide_logits, "guide_logits")
    row = int(bad.nonzero()[0])
    for logits, name in ((plain_logits, "plain_logits"), (guide_logits, "guide_logits")):
        if bool(torch.isneginf(logits[row]).all()):
            raise ValueError(f"{name} row {row} is fully masked (every token is -inf)")
    raise ValueError(fully_masked_message(row))


def product_sample(
    plain_logits: torch.Tensor,
    guide_logits: torch.Tensor,
    lam,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    generator: torch.Generator | None = None,
    seed=None,
    rollout_ids=None,
    positions=None,
    backend: str = "auto",
) -> ProductSample:
    """Sample one token per row from q_t ∝ π_plain^λ · π_guide^(1−λ), tempered and filtered.

    Args:
        plain_logits, guide_logits: `[B, V]` next-token logits under the plain and the answer-augmented
            context (fp32, fp16 or bf16; math in fp32). −inf marks a masked token.
        lam: λ, a float or `[B]` tensor in [0, 1]. 1 = plain policy, 0 = answer-conditioned policy.
        temperature: float or `[B]`, ≥ 0; 0 = greedy.
        top_k: int or `[B]` (0 = off); top_p: float or `[B]` in (0, 1] (1 = off); min_p: float or `[B]` in
            [0, 1] (0 = off). Applied to q in that order.
        generator: torch RNG for unkeyed sampling (default: the global one).
        seed, rollout_ids, positions: keyed noise (int or `[B]` int64 each): the draw is a pure function of
            (seed, rollout id, position, token), shared by every backend. `positions` is required with seed;
            `rollout_ids` defaults to the row index.
        backend: one of `prodsample.dispatch.BACKENDS` (the module says what each runs).

    Returns:
        ProductSample(token_ids, logprobs, plain_logprobs, guide_logprobs, log_normalizer), each `[B]`.

    Example:
        >>> import torch, prodsample
        >>> plain, guide = torch.randn(4, 10), torch.randn(4, 10)
        >>> out = prodsample.product_sample(plain, guide, lam=0.5, temperature=0.7, top_p=0.9,
        ...                                 seed=0, positions=torch.zeros(4, dtype=torch.long))
        >>> out.token_ids.shape, out.logprobs.dtype
        (torch.Size([4]), torch.float32)
    """
    check_logits_pair(plain_logits, guide_logits, "plain_logits", "guide_logits")
    rows, vocab = plain_logits.shape
    device = plain_logits.device
    settings = _settings_rows(rows, vocab, device, lam, temperature, top_k, top_p, min_p)
    keys = _noise_keys(rows, device, generator, seed, rollout_ids, positions)
    threshold = _filter_threshold_if_any(plain_logits, guide_logits, settings)
    fused = select_backend(device, backend)
    result = fused(FusedInputs(plain_logits, guide_logits, settings.lam, settings.temperature, threshold, keys))
    _check_result(result, plain_logits, guide_logits)
    return result


def product_logprobs(
    plain_logits: torch.Tensor,
    guide_logits: torch.Tensor,
    lam,
    token_ids: torch.Tensor,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
) -> ProductSample:
    """Teacher-forced counterpart of `product_sample`: every output for the given `token_ids` `[B]`.

    Same definitions and filters as `product_sample`, so scoring a sampled token reproduces what the sampler
    recorded. Under greedy decoding (temperature 0) log q is 0 for the argmax token and −inf otherwise.

    Example:
        >>> import torch, prodsample
        >>> plain, guide = torch.randn(3, 8), torch.randn(3, 8)
        >>> drawn = prodsample.product_sample(plain, guide, 0.5, seed=1, positions=torch.zeros(3, dtype=torch.long))
        >>> scored = prodsample.product_logprobs(plain, guide, 0.5, drawn.token_ids)
        >>> bool(torch.allclose(scored.logprobs, drawn.logprobs))
        True
    """
    check_logits_pair(plain_logits, guide_logits, "plain_logits", "guide_logits")
    rows, vocab = plain_logits.shape
    token_ids = torch.as_tensor(token_ids, device=plain_logits.device)
    if token_ids.shape != (rows,) or token_ids.is_floating_point():
        raise ValueError(f"token_ids must be an integer tensor of shape [{rows}], got {token_ids.dtype} {tuple(token_ids.shape)}")
    if ((token_ids < 0) | (token_ids >= vocab)).any():
        raise ValueError(f"token_ids must lie in [0, {vocab}) (the vocabulary of the logits)")
    settings = _settings_rows(rows, vocab, plain_logits.device, lam, temperature, top_k, top_p, min_p)
    inputs = FusedInputs(
        plain_logits, guide_logits, settings.lam, settings.temperature,
        _filter_threshold_if_any(plain_logits, guide_logits, settings), keys=None,  # scoring draws no noise
    )
    result = outputs_at(inputs, kept_mixed_logits(inputs), token_ids.long())
    _check_result(result, plain_logits, guide_logits)
    return result
