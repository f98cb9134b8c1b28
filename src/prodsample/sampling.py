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
`_noise_keys` → `filter_threshold` (only when a filter is on) → a backend's fused pass (`reference_fused_sample`,
or the compiled / Triton paths chosen by `select_backend`) → `_check_result` (no NaN leaves this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .mixing import as_row_tensor, check_logits_pair, check_no_nan, fully_masked_message, weighted_logprob_sum
from .noise import log_exponential_noise, row_keys

__all__ = [
    "ProductSample",
    "product_sample",
    "product_logprobs",
    "filter_threshold",
    "reference_fused_sample",
    "select_backend",
]

# Backends compute z with their own float rounding (an FMA here, a reciprocal there); a filter threshold is
# lowered by this relative amount so the token that sets it is kept by every backend.
THRESHOLD_SLACK = 2.0**-20


class ProductSample(NamedTuple):
    """What one sampling step drew, and from what. All `[B]`."""

    token_ids: torch.Tensor  # int64
    logprobs: torch.Tensor  # log q_t(o_t), float32
    plain_logprobs: torch.Tensor  # log_softmax(plain / T)(o_t)
    guide_logprobs: torch.Tensor  # log_softmax(guide / T)(o_t)
    log_normalizer: torch.Tensor  # see the module docstring


class SamplingRows(NamedTuple):
    """Per-row settings after validation, each `[B]`."""

    lam: torch.Tensor  # float32
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor | None  # int64, 0 = off
    top_p: torch.Tensor | None  # float32, 1 = off
    min_p: torch.Tensor | None  # float32, 0 = off


FusedSampler = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], ProductSample
]


def _check_range(value, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    below = tensor <= low if low_open else tensor < low
    if torch.isnan(tensor).any() or below.any() or (tensor > high).any():
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {interval}, got {value if tensor.dim() == 0 else tensor.tolist()}")


def _optional_rows(value, name, rows, device, dtype, off_value, low, high, low_open=False):
    if value is None:
        return None
    _check_range(value, name, low, high, low_open=low_open)
    tensor = as_row_tensor(value, name, rows, device, dtype)
    return None if bool((tensor == off_value).all()) else tensor


def _settings_rows(rows: int, vocab: int, device, lam, temperature, top_k, top_p, min_p) -> SamplingRows:
    """Validate λ, temperature and the filters, and broadcast each to `[B]` (filters that are off → None)."""
    _check_range(lam, "lam", 0.0, 1.0)
    _check_range(temperature, "temperature", 0.0, math.inf)
    if top_k is not None and (torch.as_tensor(top_k) < 0).any():
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    top_k_rows = None if top_k is None else as_row_tensor(top_k, "top_k", rows, device, torch.int64)
    if top_k_rows is not None and bool(((top_k_rows == 0) | (top_k_rows >= vocab)).all()):
        top_k_rows = None
    return SamplingRows(
        lam=as_row_tensor(lam, "lam", rows, device),
        temperature=as_row_tensor(temperature, "temperature", rows, device),
        top_k=top_k_rows,
        top_p=_optional_rows(top_p, "top_p", rows, device, torch.float32, 1.0, 0.0, 1.0, low_open=True),
        min_p=_optional_rows(min_p, "min_p", rows, device, torch.float32, 0.0, 0.0, 1.0),
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


def mixed_logits(
    plain_logits: torch.Tensor, guide_logits: torch.Tensor, lam: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """z = (λ·a + (1−λ)·b)/T in float32 `[B, V]` (T = 0 rows use T = 1; a weight-0 context has no say)."""
    weights = torch.stack([lam, 1.0 - lam], dim=1)
    inverse_temperature = torch.where(temperature > 0, 1.0 / temperature.clamp_min(1e-30), 1.0).unsqueeze(1)
    return weighted_logprob_sum([plain_logits.float(), guide_logits.float()], weights) * inverse_temperature


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


def reference_fused_sample(
    plain_logits: torch.Tensor,
    guide_logits: torch.Tensor,
    lam: torch.Tensor,
    temperature: torch.Tensor,
    threshold: torch.Tensor | None,
    keys: torch.Tensor,
) -> ProductSample:
    """The eager reference of the fused pass: what the compiled and Triton backends must reproduce.

    Shapes: logits `[B, V]` (any float dtype), `lam`, `temperature`, `threshold` (z units, None = no filter)
    float32 `[B]`, `keys` int64 `[B]`.
    """
    z = _kept_mixed_logits(plain_logits, guide_logits, lam, temperature, threshold)
    raced = z - log_exponential_noise(keys, z.shape[1])
    token_ids = torch.where(temperature == 0, z.argmax(dim=-1), raced.argmax(dim=-1))
    return _outputs_at(plain_logits, guide_logits, lam, temperature, z, token_ids)


def _kept_mixed_logits(plain_logits, guide_logits, lam, temperature, threshold) -> torch.Tensor:
    """z with the tokens the filters drop set to −inf."""
    z = mixed_logits(plain_logits, guide_logits, lam, temperature)
    return z if threshold is None else torch.where(z >= threshold.unsqueeze(1), z, -math.inf)


def _outputs_at(plain_logits, guide_logits, lam, temperature, z, token_ids) -> ProductSample:
    """Every output for given tokens, from the kept mixed logits z. Greedy rows give log q = 0 to the argmax
    (and −inf to any other token)."""
    greedy = temperature == 0
    inverse_temperature = torch.where(greedy, 1.0, 1.0 / temperature.clamp_min(1e-30))
    plain = plain_logits.float()
    guide = guide_logits.float()
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


def select_backend(device: torch.device, backend: str = "auto") -> FusedSampler:
    """The fused pass for `device`: "reference" (eager torch), or "auto" (the fastest verified path)."""
    from . import dispatch

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
    result = fused(plain_logits, guide_logits, settings.lam, settings.temperature, threshold, keys)
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
    threshold = _filter_threshold_if_any(plain_logits, guide_logits, settings)
    z = _kept_mixed_logits(plain_logits, guide_logits, settings.lam, settings.temperature, threshold)
    result = _outputs_at(plain_logits, guide_logits, settings.lam, settings.temperature, z, token_ids.long())
    _check_result(result, plain_logits, guide_logits)
    return result
