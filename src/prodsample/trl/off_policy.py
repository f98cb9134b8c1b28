"""The off-policy modes of the TRL hook, one registry: each mode says how the gathered batch turns TRL's
advantages into the advantages and per-token weights of the loss, and which `GRPOConfig` settings it needs.
Adding a mode is one entry here (and its test); the trainer and the config only look modes up.

Also: TRL's engine-mismatch settings as the core's `ImportanceConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..importance import OFF_POLICY_MODE_NAMES, ImportanceConfig, OffPolicyWeights
from .batch import GatheredBatch

__all__ = [
    "DEFAULT_OFF_POLICY_MODE",
    "OFF_POLICY_MODES",
    "TRL_OFF_POLICY_MODES",
    "BASELINE_KEEPING_LOSS_TYPES",
    "OffPolicyMode",
    "engine_importance_config",
]

# The off-policy mode used when none is named: "none", the original recipe (the bias it leaves vanishes as
# λ → 1, and it costs nothing). In the claim benchmark (docs/claim.md) "token_truncate"
# learned worse than "none" on the same rollouts; docs/trl.md gives the figures.
DEFAULT_OFF_POLICY_MODE = "none"

# The loss types under which each rollout's token sum is divided by max_completion_length, as the
# baseline-keeping weights need (a token mean would reweight the rollouts by their lengths).
BASELINE_KEEPING_LOSS_TYPES = ("dr_grpo",)

# (gathered batch, TRL's advantages [N], the engine weight's config, the trainer's GuidedGRPOConfig)
Advantages = Callable[[GatheredBatch, torch.Tensor, ImportanceConfig, object], tuple[torch.Tensor, OffPolicyWeights]]


def _no_requirements(args) -> None:
    return None


@dataclass(frozen=True)
class OffPolicyMode:
    """One off-policy mode.

    Attributes:
        advantages: (gathered batch, TRL's advantages `[N]`, the engine weight's config, the trainer's config)
            → (the advantages `[N]` to train on, the per-token `OffPolicyWeights` that multiply them).
        check: raises ValueError, naming the setting, when the trainer's config cannot train this mode exactly.
    """

    advantages: Advantages
    check: Callable[[object], None] = _no_requirements


def _weighted(name: str) -> OffPolicyMode:
    """A mode of the core's `off_policy_mode_weights`: TRL's advantages, times its per-token weights."""

    def advantages(gathered, advantages, engine, args):
        return advantages, gathered.off_policy_weights(name, engine, args.luffy_gamma)

    return OffPolicyMode(advantages, _check_luffy if name == "luffy_shaping" else _no_requirements)


def _check_luffy(args) -> None:
    if args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations):
        raise ValueError(
            "off_policy='luffy_shaping' equals LUFFY's gradient only at θ = θ_old: it needs every generation "
            "batch used within one optimizer step (num_iterations=1, steps_per_generation dividing "
            "gradient_accumulation_steps)"
        )


def _baseline_keeping(gathered, advantages, engine, args):
    """TRL's advantages replaced by G·w̃_i·A_i, re-centred under the self-normalised sequence weights on the
    gathered batch (a group can straddle two processes)."""
    kept, weights = gathered.baseline_keeping(
        gathered.off_policy_weights("none", engine, args.luffy_gamma),
        truncate=args.baseline_keeping_truncate,
        scale_rewards=args.scale_rewards,
    )
    return gathered.local(kept).to(advantages.dtype), weights


def _check_baseline_keeping(args) -> None:
    if args.loss_type not in BASELINE_KEEPING_LOSS_TYPES:
        raise ValueError(
            f"off_policy='baseline_keeping' divides each rollout's token sum by max_completion_length, which "
            f"loss_type={args.loss_type!r} does not (a token mean reweights rollouts by length): set loss_type to "
            f"one of {BASELINE_KEEPING_LOSS_TYPES}"
        )
    if args.scale_rewards not in ("group", "none"):
        raise ValueError(
            f"off_policy='baseline_keeping' scales each group's advantages by its weighted std: scale_rewards must "
            f"be 'group' or 'none', got {args.scale_rewards!r}"
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            "off_policy='baseline_keeping' weights TRL's total reward: multi_objective_aggregation must be "
            f"'sum_then_normalize', got {args.multi_objective_aggregation!r}"
        )


# Every mode of `prodsample.importance.off_policy_mode_weights` (the core's weight modes, plus LUFFY's policy
# shaping applied as a weight), and the baseline-keeping weights, which replace TRL's advantages.
OFF_POLICY_MODES: dict[str, OffPolicyMode] = {
    **{name: _weighted(name) for name in OFF_POLICY_MODE_NAMES},
    "baseline_keeping": OffPolicyMode(_baseline_keeping, _check_baseline_keeping),
}
TRL_OFF_POLICY_MODES = tuple(OFF_POLICY_MODES)


def engine_importance_config(args) -> ImportanceConfig:
    """TRL's engine-mismatch settings (`vllm_importance_sampling_mode`, `..._clip_max`, `..._clip_min`) as a
    `prodsample.importance.ImportanceConfig`, so the engine weight is the one TRL would have applied."""
    level, constraint = args.vllm_importance_sampling_mode.split("_")
    floor = args.vllm_importance_sampling_clip_min
    if constraint == "truncate" and floor is not None:
        raise ValueError(
            "vllm_importance_sampling_clip_min with a *_truncate vllm_importance_sampling_mode is not supported by "
            "guided rollouts (their engine weight is truncated from above only); set it to None or use a *_mask mode"
        )
    cap = args.vllm_importance_sampling_clip_max
    return ImportanceConfig(level, constraint, cap=math.inf if cap is None else cap, floor=floor)
