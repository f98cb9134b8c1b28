"""The off-policy modes the TRL hook offers, and TRL's engine-mismatch settings as the core's `ImportanceConfig`."""

from __future__ import annotations

import math

from ..importance import OFF_POLICY_MODE_NAMES, ImportanceConfig

__all__ = ["DEFAULT_OFF_POLICY_MODE", "TRL_OFF_POLICY_MODES", "BASELINE_KEEPING_LOSS_TYPES", "engine_importance_config"]

# The off-policy mode used when none is named: "none", the original recipe (the bias it leaves vanishes as
# λ → 1, and it costs nothing). In the claim benchmark (docs/claim.md) "token_truncate"
# learned worse than "none" on the same rollouts; docs/trl.md gives the figures.
DEFAULT_OFF_POLICY_MODE = "none"

# Every mode of `prodsample.importance.off_policy_mode_weights` (the core's weight modes, plus LUFFY's policy
# shaping applied as a weight), and the baseline-keeping weights, which replace TRL's advantages.
TRL_OFF_POLICY_MODES = (*OFF_POLICY_MODE_NAMES, "baseline_keeping")

# The loss types under which each rollout's token sum is divided by max_completion_length, as the
# baseline-keeping weights need (a token mean would reweight the rollouts by their lengths).
BASELINE_KEEPING_LOSS_TYPES = ("dr_grpo",)


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
