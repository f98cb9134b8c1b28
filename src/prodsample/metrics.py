"""Per-step diagnostics of a batch of guided rollouts, for a trainer's logs (the TRL hook logs them as `guidance/*`).

Framework-free: tensors in, floats out. docs/trl.md ("Metrics") defines each one.
"""

from __future__ import annotations

import math

import torch

from .importance import effective_sample_size, kl_q_pi

__all__ = ["guidance_metrics", "self_distill_metrics"]


def _mean_or_nan(values: torch.Tensor) -> float:
    values = values.double()
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def guidance_metrics(
    *,
    lam: torch.Tensor,
    guided: torch.Tensor,
    desynced: torch.Tensor,
    leaked: torch.Tensor,
    echoed: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    success_threshold: float,
    logprobs: torch.Tensor,
    plain_logprobs: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    clipped_fraction: float,
) -> dict[str, float]:
    """The per-step guidance metrics of a batch of R rollouts (prompt-major groups of `group_size`).

    Per-rollout tensors are `[R]`, per-token ones `[R, L]`. A reward is a success when above
    `success_threshold`; NaN rewards (unscorable rollouts) are left out. Means over an empty set are NaN,
    which TRL's logger drops from its averages. `leaked` flags the completions that state the answer before
    deriving it (`prodsample.prompts.answer_without_derivation`), `echoed` those that restate the hint
    (`prodsample.prompts.hint_leakage`), as `prodsample reward` reports them (leakage, echo).

    Example:
        >>> import torch
        >>> from prodsample.metrics import guidance_metrics
        >>> tokens = torch.zeros(2, 1)
        >>> metrics = guidance_metrics(
        ...     lam=torch.tensor([0.5, 1.0]), guided=torch.tensor([True, False]), desynced=torch.zeros(2),
        ...     leaked=torch.zeros(2), echoed=torch.zeros(2), rewards=torch.tensor([1.0, 0.0]), group_size=2, success_threshold=0.0,
        ...     logprobs=tokens, plain_logprobs=tokens, mask=torch.ones(2, 1), weights=torch.ones(2, 1),
        ...     clipped_fraction=0.0)
        >>> metrics["guidance/reward_guided"], metrics["guidance/groups_informative"]
        (1.0, 1.0)
    """
    guided, desynced, mask = guided.bool(), desynced.bool(), mask.bool()
    leaked, echoed = leaked.bool(), echoed.bool()
    lengths = mask.sum(dim=1).double()
    groups = rewards.double().view(-1, group_size)
    scored = ~torch.isnan(groups)
    successes = (groups > success_threshold) & scored
    failures = (groups <= success_threshold) & scored
    high = torch.where(scored, groups, -math.inf).amax(dim=1)
    low = torch.where(scored, groups, math.inf).amin(dim=1)
    return {
        "guidance/lambda_mean": float(lam.double().mean()),
        "guidance/lambda_std": float(lam.double().std(unbiased=False)),
        "guidance/guided_fraction": _mean_or_nan(guided),
        "guidance/reward_guided": _mean_or_nan(rewards.double()[guided]),
        "guidance/reward_plain": _mean_or_nan(rewards.double()[~guided]),
        "guidance/groups_informative": _mean_or_nan(high > low),
        "guidance/groups_all_fail": _mean_or_nan(~successes.any(dim=1) & scored.any(dim=1)),
        "guidance/groups_all_pass": _mean_or_nan(~failures.any(dim=1) & scored.any(dim=1)),
        "guidance/kl_q_pi": float(kl_q_pi(logprobs, plain_logprobs, mask)),
        "guidance/is_weight_mean": _mean_or_nan(weights.double()[mask]),
        "guidance/is_clipped_fraction": clipped_fraction,
        "guidance/is_ess": float(effective_sample_size(weights, mask)),
        "guidance/length_guided": _mean_or_nan(lengths[guided]),
        "guidance/length_plain": _mean_or_nan(lengths[~guided]),
        "guidance/hint_leakage_guided": _mean_or_nan(leaked[guided]),
        "guidance/hint_leakage_plain": _mean_or_nan(leaked[~guided]),
        "guidance/hint_echo_guided": _mean_or_nan(echoed[guided]),
        "guidance/hint_echo_plain": _mean_or_nan(echoed[~guided]),
        "guidance/desynced_fraction": _mean_or_nan(desynced),
    }


def self_distill_metrics(
    *, advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, clip: float
) -> dict[str, float]:
    """Diagnostics of the sampled-token self-distillation term over a batch's completion tokens.

    `advantages` `[R, L]` is w_t·a_t (`prodsample.grpo.self_distill_token_advantages`), `log_ratio` the
    unclipped log π(o_t | prompt ⊕ hint) − log π(o_t | prompt). Over tokens drawn from π the mean log-ratio
    is −KL(π‖π_teacher) per token, so the mean advantage rises toward 0 as the student matches the teacher.

    Example:
        >>> import torch
        >>> from prodsample.metrics import self_distill_metrics
        >>> metrics = self_distill_metrics(advantages=torch.tensor([[0.5, -3.0]]),
        ...     log_ratio=torch.tensor([[0.5, -7.0]]), mask=torch.ones(1, 2), clip=3.0)
        >>> metrics["guidance/distill_advantage_mean"], metrics["guidance/distill_clipped_fraction"]
        (-1.25, 0.5)
    """
    real = mask.bool()
    return {
        "guidance/distill_advantage_mean": _mean_or_nan(advantages[real]),
        "guidance/distill_clipped_fraction": _mean_or_nan(log_ratio[real].abs() > clip),
    }
