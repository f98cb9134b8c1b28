"""Importance weights for training on rollouts drawn from q rather than from the policy π.

A guided rollout o ~ q carries, per token, log q_t(o_t) (`logprobs`) and log π_engine(o_t | prompt)
(`plain_logprobs`, the policy as the generation engine computed it). The trainer recomputes
log π_trainer(o_t | prompt) (π_old). Two sources of off-policyness, kept apart and truncated separately:

    guidance:        r_g,t = log π_engine(o_t) − log q_t(o_t)       (0 when λ = 1)
    engine mismatch: r_e,t = log π_trainer(o_t) − log π_engine(o_t) (0 when one engine does both)

Each becomes a weight at one of three levels, then a truncation or mask at `cap` (and optionally `floor`):

    token:      w_t = exp(r_t)
    sequence:   w_t = exp(Σ_s r_s)            for every t of the sequence (the exact sequence ratio)
    geometric:  w_t = exp(mean_s r_s)         (length-normalised, as GSPO and verl's geo-mean mode)

    truncate:   w ← min(w, cap)               (truncated IS, as TRL/verl's TIS)
    mask:       w ← w·1[floor ≤ w ≤ cap]      (masked IS: drop the token or sequence, as verl's MIS)

The final weight is w_guidance · w_engine, a stop-gradient factor on the usual PPO ratio π_θ/π_old. Note
what guidance weights do: a guided token the policy found unlikely (π ≪ q) gets a small weight, so these
modes shrink exactly the tokens the hint contributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

__all__ = [
    "OFF_POLICY_MODES",
    "OFF_POLICY_MODE_NAMES",
    "ImportanceConfig",
    "OffPolicyWeights",
    "importance_weights",
    "off_policy_weights",
    "off_policy_mode_weights",
    "effective_sample_size",
    "kl_q_pi",
]

Level = Literal["token", "sequence", "geometric"]
Mode = Literal["truncate", "mask", "none"]


@dataclass(frozen=True)
class ImportanceConfig:
    """How one log-ratio becomes a weight. `cap` ≥ 1; `floor` (mask mode only) in [0, 1]."""

    level: Level = "token"
    mode: Mode = "truncate"
    cap: float = 2.0
    floor: float | None = None

    def __post_init__(self):
        if self.level not in ("token", "sequence", "geometric"):
            raise ValueError(f"level must be 'token', 'sequence' or 'geometric', got {self.level!r}")
        if self.mode not in ("truncate", "mask", "none"):
            raise ValueError(f"mode must be 'truncate', 'mask' or 'none', got {self.mode!r}")
        if not self.cap >= 1.0:
            raise ValueError(f"cap must be >= 1, got {self.cap}")
        if self.floor is not None and (self.mode != "mask" or not 0.0 <= self.floor <= 1.0):
            raise ValueError(f"floor applies to mode='mask' only and must lie in [0, 1], got {self.floor}")


# The named off-policy modes a trainer chooses between, as guidance-weight configs. "none" is the original
# recipe (train on guided rollouts as if on-policy; the bias vanishes as λ → 1).
OFF_POLICY_MODES: dict[str, ImportanceConfig | None] = {
    "none": None,
    "token_truncate": ImportanceConfig("token", "truncate", cap=2.0),
    "sequence_mask": ImportanceConfig("sequence", "mask", cap=2.0),
    "geometric": ImportanceConfig("geometric", "truncate", cap=2.0),
}

# Every mode `off_policy_mode_weights` takes: the weight configs above, plus LUFFY's policy shaping, which is
# not an importance ratio but enters a fixed loss (TRL's) as the weight of its gradient at θ = θ_old.
OFF_POLICY_MODE_NAMES = (*OFF_POLICY_MODES, "luffy_shaping")


class OffPolicyWeights(NamedTuple):
    """`[B, T]` weights (0 at padding) and the diagnostics a trainer logs."""

    weights: torch.Tensor  # guidance · engine
    guidance: torch.Tensor
    engine: torch.Tensor
    clipped_fraction: torch.Tensor  # scalar: share of tokens whose weight the cap or floor changed
    effective_sample_size: torch.Tensor  # scalar in (0, 1]
    clipped: torch.Tensor  # bool [B, T]: the tokens whose weight the cap or floor changed


def _check_same_shape(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} must have the shape of mask {tuple(mask.shape)}, got {tuple(tensor.shape)}")
        if torch.isnan(tensor[mask.bool()]).any():
            raise ValueError(f"{name} contains NaN at unmasked tokens")


def _raw_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: Level) -> torch.Tensor:
    real = mask.bool()
    log_ratio = torch.where(real, log_ratio, 0.0)
    if level == "token":
        per_token = log_ratio
    else:
        total = log_ratio.sum(dim=-1, keepdim=True)
        if level == "geometric":
            total = total / real.sum(dim=-1, keepdim=True).clamp_min(1)
        per_token = total.expand_as(log_ratio)
    return torch.where(real, torch.exp(per_token), 0.0)


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, config: ImportanceConfig) -> torch.Tensor:
    """Weights from per-token log-ratios `[B, T]` under `config`; 0 where `mask` is 0.

    Example:
        >>> import torch
        >>> from prodsample.importance import ImportanceConfig, importance_weights
        >>> log_ratio = torch.tensor([[0.0, -1.0, 2.0]])
        >>> importance_weights(log_ratio, torch.ones(1, 3), ImportanceConfig("token", "truncate", cap=2.0))
        tensor([[1.0000, 0.3679, 2.0000]])
    """
    _check_same_shape(mask, log_ratio=log_ratio)
    raw = _raw_weights(log_ratio, mask, config.level)
    if config.mode == "truncate":
        return raw.clamp(max=config.cap)
    if config.mode == "mask":
        keep = raw <= config.cap
        if config.floor is not None:
            keep &= raw >= config.floor
        return torch.where(keep, raw, 0.0)
    return raw


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Kish's effective sample size as a fraction of the tokens: (Σw)² / (n·Σw²) ∈ (0, 1]; 1 when all equal."""
    if mask is not None:
        weights = weights[mask.bool()]
    weights = weights.double().flatten()
    squares = (weights**2).sum()
    if weights.numel() == 0 or squares == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return weights.sum() ** 2 / (weights.numel() * squares)


def kl_q_pi(logprobs: torch.Tensor, plain_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(q‖π) estimate from tokens sampled from q: mean of log q − log π over real tokens."""
    _check_same_shape(mask, logprobs=logprobs, plain_logprobs=plain_logprobs)
    mask = mask.bool()
    return (logprobs[mask] - plain_logprobs[mask]).double().mean() if mask.any() else torch.tensor(0.0)


def off_policy_weights(
    logprobs: torch.Tensor,
    plain_logprobs: torch.Tensor,
    mask: torch.Tensor,
    trainer_logprobs: torch.Tensor | None = None,
    *,
    guidance: ImportanceConfig = ImportanceConfig(),
    engine: ImportanceConfig = ImportanceConfig(),
) -> OffPolicyWeights:
    """Guidance and engine-mismatch weights, each truncated under its own config, and their product.

    Args:
        logprobs: `[B, T]` log q_t(o_t) recorded at sampling.
        plain_logprobs: `[B, T]` log π_engine(o_t | prompt) recorded at sampling.
        mask: `[B, T]` 1 for completion tokens.
        trainer_logprobs: `[B, T]` log π_trainer(o_t | prompt) (π_old as the trainer computes it), or None
            when the engine is the trainer (the engine weight is then 1).
    """
    _check_same_shape(mask, logprobs=logprobs, plain_logprobs=plain_logprobs)
    guidance_log_ratio = plain_logprobs - logprobs
    guidance_raw = _raw_weights(guidance_log_ratio, mask, guidance.level)
    guidance_weights = importance_weights(guidance_log_ratio, mask, guidance)
    if trainer_logprobs is None:
        engine_raw = engine_weights = mask.to(guidance_weights.dtype)
    else:
        _check_same_shape(mask, trainer_logprobs=trainer_logprobs)
        engine_log_ratio = trainer_logprobs - plain_logprobs
        engine_raw = _raw_weights(engine_log_ratio, mask, engine.level)
        engine_weights = importance_weights(engine_log_ratio, mask, engine)
    weights = guidance_weights * engine_weights
    real = mask.bool()
    clipped = ((guidance_weights != guidance_raw) | (engine_weights != engine_raw)) & real
    fraction = clipped[real].double().mean() if real.any() else torch.tensor(0.0, dtype=torch.float64)
    return OffPolicyWeights(
        weights, guidance_weights, engine_weights, fraction, effective_sample_size(weights, mask), clipped
    )


def off_policy_mode_weights(
    mode: str,
    logprobs: torch.Tensor,
    plain_logprobs: torch.Tensor,
    mask: torch.Tensor,
    guided: torch.Tensor,
    trainer_logprobs: torch.Tensor | None = None,
    *,
    engine: ImportanceConfig = ImportanceConfig(),
    luffy_gamma: float = 0.1,
) -> OffPolicyWeights:
    """Per-token stop-gradient weights `[B, T]` for one of `OFF_POLICY_MODE_NAMES`, engine mismatch included.

    The guidance weight is π_engine/q under the mode's `OFF_POLICY_MODES` config; "none" uses weight 1 (the
    rollout is treated as drawn from π_engine), and "luffy_shaping" weights the tokens of guided rollouts
    (`guided`, bool `[B]`) by γ·π/(π+γ)², which makes the gradient of a PPO ratio term at θ = θ_old equal the
    gradient of LUFFY's shaped objective A·π_θ/(π_θ+γ). The engine weight π_trainer/π_engine (when
    `trainer_logprobs` is given, i.e. a separate engine sampled) multiplies every mode.

    Example:
        >>> import torch
        >>> from prodsample.importance import off_policy_mode_weights
        >>> logq, logpi = torch.tensor([[-0.1, -0.2]]), torch.tensor([[-1.1, -0.2]])
        >>> mask, guided = torch.ones(1, 2), torch.tensor([True])
        >>> off_policy_mode_weights("token_truncate", logq, logpi, mask, guided).weights
        tensor([[0.3679, 1.0000]])
        >>> off_policy_mode_weights("none", logq, logpi, mask, guided).weights
        tensor([[1., 1.]])
    """
    if mode not in OFF_POLICY_MODE_NAMES:
        raise ValueError(f"off_policy must be one of {OFF_POLICY_MODE_NAMES}, got {mode!r}")
    guidance = OFF_POLICY_MODES.get(mode)
    # Modes without a guidance ratio pass log π_engine as the sampling log-prob: their guidance weight is 1 and
    # only the engine weight (and its clipping statistics) remains.
    weights = off_policy_weights(
        logprobs if guidance is not None else plain_logprobs,
        plain_logprobs,
        mask,
        trainer_logprobs,
        guidance=guidance or ImportanceConfig(),
        engine=engine,
    )
    if mode != "luffy_shaping":
        return weights
    # LUFFY shapes the trained policy's probability: π_trainer when an engine sampled, else the engine's
    # (which is then the trained model).
    probability = (plain_logprobs if trainer_logprobs is None else trainer_logprobs).exp()
    shaping = torch.where(
        guided.bool().unsqueeze(1), luffy_gamma * probability / (probability + luffy_gamma) ** 2, 1.0
    ) * mask
    combined = weights.weights * shaping
    return weights._replace(
        weights=combined, guidance=shaping, effective_sample_size=effective_sample_size(combined, mask)
    )
