r"""Framework-free training signals for rollouts drawn from q (guided) or from π (plain).

R rollouts in groups of G (prompt-major, as `GuidedRollout` orders them), rewards r, per-token log-probs of
the policy under the plain prompt, and (for the self-distillation term) under the hinted prompt. The math
in full, with the reasons for each choice, is in docs/signals.md.

GRPO (`group_advantages`, `grpo_loss`)

    advantage      A_i = (r_i − mean_group(r)) / (std_group(r) + eps)       (scale="none": no division)
    ratio          ρ_t = exp(log π_θ(o_t) − log π_old(o_t))
    surrogate      s_t = min(ρ_t·A_i, clip(ρ_t, 1−ε, 1+ε)·A_i)
    loss           −Σ_t w_t·s_t·m_t / Σ_t m_t        (token mean over the batch; the default)
                   −mean_i Σ_t w_t·s_t·m_t / L       (max_new_tokens=L: each rollout's token sum over L)

w_t is a stop-gradient importance weight for training on rollouts not drawn from π (from
`prodsample.importance.off_policy_weights`; 1 when None: the "none" recipe). LUFFY's policy shaping
π_θ/(π_θ+γ) enters the same way, as the weight γ·π/(π+γ)² on guided tokens that
`prodsample.importance.off_policy_mode_weights("luffy_shaping", ...)` computes (its gradient at π_θ = π_old).

Baseline-keeping importance weights (`baseline_keeping_advantages`), per group of G rollouts from q:

    ℓ_i = Σ_t (log π_old(o_it) − log q(o_it))       the sequence log-ratio
    w̃ = softmax(ℓ) over the group                   (optionally w̃ ← min(w̃, c/G), renormalised)
    b = Σ_i w̃_i r_i,   s² = Σ_i w̃_i (r_i − b)²,   A_i = (r_i − b)/(s + eps)
    loss weight of rollout i: G·w̃_i·A_i, fed to `grpo_loss(..., max_new_tokens=L)` as its advantage

so Σ_i w̃_i A_i = 0 (the baseline is kept under the reweighting) and q = π gives GRPO exactly (with
`unbiased=True`, s² carries the reliability-weights correction 1/(1 − Σ_i w̃_i²): TRL's GRPO, whose std
has Bessel's correction).

Self-distillation toward the hinted context (`self_distill_kl_loss`, `self_distill_token_loss`): the
reverse KL(π_θ(·|prompt, o<t) ‖ sg π(·|prompt ⊕ hint, o<t)) summed over the rollout's positions, each
rollout's sum divided by L = max_new_tokens, mean over rollouts:

    full vocabulary   Σ_v π_θ(v)·(log π_θ(v) − log π_T(v))            teacher π_T detached
    sampled token     −w_t·a_t·log π_θ(o_t),  a_t = clip(log π_T(o_t) − log π(o_t), −c, c), a_t and w_t detached
                      w_t = min(π(o_t)/q(o_t), cap) on guided rollouts, 1 on rollouts from π
                      (`self_distill_token_advantages` gives w_t·a_t: a dense per-token advantage)

Both have the gradient of Σ_t KL_t at the positions the rollouts visit (the sampled-token one in
expectation over o_t, up to its clip and cap). Scale the term by β from `DistillCoefficient`, which
reaches 0 at its end step: the final policy must not need the hint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .schedules import Schedule

__all__ = [
    "group_advantages",
    "grpo_loss",
    "BaselineKeepingAdvantages",
    "baseline_keeping_advantages",
    "DEFAULT_DISTILL_CLIP",
    "DistillCoefficient",
    "self_distill_kl_loss",
    "self_distill_token_advantages",
    "self_distill_token_loss",
]

# |a_t| bound of the sampled-token estimator: a std-normalised GRPO advantage lies within √(G−1) (2.6 at
# G = 8), and a teacher that sees the answer puts log-probs near −20 on wrong tokens, which would otherwise
# let one token outweigh a whole batch of rewards.
DEFAULT_DISTILL_CLIP = 3.0


def _check_mask_shape(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} must have the shape of mask {tuple(mask.shape)}, got {tuple(tensor.shape)}")


def _check_max_new_tokens(max_new_tokens: int, mask: torch.Tensor) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < mask.shape[-1]:
        raise ValueError(
            f"max_new_tokens must be an int at least the completion width {mask.shape[-1]}, got {max_new_tokens!r}"
        )


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Each rollout's masked token sum divided by `max_new_tokens`, averaged over rollouts (a fixed divisor)."""
    return (per_token * mask).sum(dim=-1).mean() / max_new_tokens


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Per-rollout advantages `[R]`: reward minus its group's mean, divided by the group's std when scale="std".

    A group whose rewards are all equal gets advantage 0 (it carries no learning signal).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    _check_groups(rewards, group_size)
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.flatten()


def _check_groups(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [R] with R a multiple of group_size={group_size}, got {tuple(rewards.shape)}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """The clipped GRPO surrogate, negated (to minimise).

    Args:
        logprobs: `[R, L]` log π_θ(o_t | prompt), with gradient.
        old_logprobs: `[R, L]` log π_old (no gradient; equal to `logprobs.detach()` for one update per batch).
        advantages: `[R]`, e.g. from `group_advantages`, or the loss weights G·w̃_i·A_i of
            `baseline_keeping_advantages` (a positive rescaling of A_i, so the clip acts as on A_i).
        mask: `[R, L]`, 1 for completion tokens.
        weights: `[R, L]` stop-gradient importance weights, or None for 1.
        clip_eps: ε of the PPO clip.
        max_new_tokens: None for a token mean over the batch; the generation limit L for each rollout's
            token sum divided by L, averaged over rollouts (no reweighting by length; what the
            baseline-keeping weights need).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    if weights is not None:
        surrogate = surrogate * weights.detach().to(logprobs.dtype)
    if max_new_tokens is not None:
        _check_max_new_tokens(max_new_tokens, mask)
        return -_sequence_mean(surrogate, mask, max_new_tokens)
    return -(surrogate * mask).sum() / mask.sum().clamp_min(1.0)


class BaselineKeepingAdvantages(NamedTuple):
    """`[R]` tensors, all without gradient."""

    loss_weights: torch.Tensor  # G·w̃_i·A_i: the per-rollout coefficient for `grpo_loss(..., max_new_tokens=L)`
    weights: torch.Tensor  # w̃_i, summing to 1 in each group (0 on unscorable rollouts)
    advantages: torch.Tensor  # A_i = (r_i − b)/(s + eps), with Σ_i w̃_i A_i = 0 in each group
    truncated: torch.Tensor  # bool: w̃_i was cut at truncate/G


def baseline_keeping_advantages(
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    truncate: float | None = None,
    scale: str = "std",
    unbiased: bool = False,
    eps: float = 1e-6,
) -> BaselineKeepingAdvantages:
    """Self-normalised sequence-level importance weights and the advantages centred under them.

    Per group of G: ℓ_i = Σ_t (log π_old − log q)(o_it); w̃ = softmax(ℓ) (truncated at `truncate`/G and
    renormalised when given); b = Σ w̃_i r_i; s² = Σ w̃_i (r_i − b)²; A_i = (r_i − b)/(s + eps).

    Args:
        rewards: `[R]`, groups of `group_size` consecutive rollouts; NaN marks an unscorable rollout, which
            gets weight 0 and advantage 0 (the group's other rollouts share its weight).
        old_logprobs: `[R, L]` log π_old(o_t | prompt) (detached here).
        sampling_logprobs: `[R, L]` log q(o_t) recorded at sampling (`GuidedRollout.logprobs`).
        mask: `[R, L]`, 1 for completion tokens.
        truncate: c ≥ 1, or None for no truncation.
        scale: "std" divides by s + eps, "none" leaves A_i = r_i − b (as `group_advantages`).
        unbiased: s² = Σ w̃_i (r_i − b)² / (1 − Σ w̃_i²), the reliability-weights correction: at w̃ = 1/G it
            is the sample variance with Bessel's correction (TRL's GRPO std), and 0 for a single effective draw.

    Example:
        >>> import torch
        >>> from prodsample.grpo import baseline_keeping_advantages
        >>> rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
        >>> log_q = torch.tensor([[-1.0], [-1.0], [-1.0], [-1.0]])
        >>> log_pi = torch.tensor([[-3.0], [-1.0], [-1.0], [-1.0]])  # the rewarded rollout was unlikely under π
        >>> out = baseline_keeping_advantages(rewards, log_pi, log_q, torch.ones(4, 1), 4)
        >>> out.weights.round(decimals=3)
        tensor([0.0430, 0.3190, 0.3190, 0.3190])
        >>> abs(float((out.weights * out.advantages).sum())) < 1e-6  # the baseline is kept
        True
    """
    _check_groups(rewards, group_size)
    _check_mask_shape(mask, old_logprobs=old_logprobs, sampling_logprobs=sampling_logprobs)
    if mask.shape[0] != rewards.numel():
        raise ValueError(f"mask must have one row per reward ({rewards.numel()}), got {mask.shape[0]}")
    if truncate is not None and not truncate >= 1.0:
        raise ValueError(f"truncate must be >= 1 (weights are cut at truncate/G), got {truncate}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    real = mask.bool()
    log_ratio = torch.where(real, old_logprobs.detach() - sampling_logprobs.detach(), 0.0).sum(dim=-1)
    groups = rewards.detach().view(-1, group_size)
    scored = ~torch.isnan(groups)
    log_ratio = torch.where(scored, log_ratio.view(-1, group_size).to(rewards.dtype), -torch.inf)
    # A group without a scorable rollout has softmax 0/0: weight 0 everywhere instead.
    weights = torch.softmax(log_ratio, dim=1).nan_to_num(0.0)
    truncated = torch.zeros_like(scored)
    if truncate is not None:
        truncated = weights > truncate / group_size
        weights = weights.clamp(max=truncate / group_size)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    groups = groups.nan_to_num(0.0)
    baseline = (weights * groups).sum(dim=1, keepdim=True)
    variance = (weights * (groups - baseline) ** 2).sum(dim=1, keepdim=True)
    if unbiased:
        effective = 1.0 - (weights**2).sum(dim=1, keepdim=True)
        variance = torch.where(effective > 0, variance / effective.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
    advantages = groups - baseline
    if scale == "std":
        advantages = advantages / (variance.sqrt() + eps)
    advantages = torch.where(scored, advantages, 0.0)
    return BaselineKeepingAdvantages(
        (group_size * weights * advantages).flatten(), weights.flatten(), advantages.flatten(), truncated.flatten()
    )


@dataclass(frozen=True)
class DistillCoefficient:
    """β(step) = start · (1 − shape.value(step)): the self-distillation coefficient, 0 from `shape.end_step` on.

    `shape` is a λ schedule of `prodsample.schedules` read as a progress curve: every schedule reaches 1 at
    its end step, so β reaches 0 there (the final policy must not need the hint). Give it start 0 for β to
    begin at `start`: `Linear(start=0.0, end_step=N)` decays β linearly to 0 at step N.

    Example:
        >>> from prodsample.grpo import DistillCoefficient
        >>> from prodsample.schedules import Linear
        >>> beta = DistillCoefficient(start=0.5, shape=Linear(start=0.0, end_step=100))
        >>> [beta.value(step) for step in (0, 50, 100, 200)]
        [0.5, 0.25, 0.0, 0.0]
    """

    start: float
    shape: Schedule

    def __post_init__(self):
        if not self.start >= 0.0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.shape.end_step is None:
            raise ValueError("shape must reach 1 at an end_step, so that β reaches 0; got a schedule without one")

    def value(self, step: int) -> float:
        return self.start * (1.0 - self.shape.value(step))


def self_distill_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int
) -> torch.Tensor:
    """Full-vocabulary reverse KL(π_θ(·|prompt, o<t) ‖ sg π(·|prompt ⊕ hint, o<t)) on the rollouts' positions.

    Use it where the vocabulary is small enough to hold both `[R, L, V]` tensors, and on guided rollouts:
    at each visited position it is the whole per-position divergence, so tokens drawn from q need no
    π/q weight (q changes only which prefixes are visited).

    Args:
        student_logits: `[R, L, V]` logits (or log-probs) under the plain prompt at the positions that
            predict each completion token, with gradient.
        teacher_logits: `[R, L, V]` the same under the hinted prompt (detached here).
        mask: `[R, L]`, 1 for completion tokens.
        max_new_tokens: L; each rollout's token sum is divided by it.

    Example:
        >>> import torch
        >>> from prodsample.grpo import self_distill_kl_loss
        >>> student = torch.zeros(1, 1, 2, requires_grad=True)  # uniform over 2 tokens
        >>> teacher = torch.tensor([[[0.75, 0.25]]]).log()
        >>> loss = self_distill_kl_loss(student, teacher, torch.ones(1, 1), max_new_tokens=1)
        >>> round(loss.item(), 4)  # ½·log(0.5/0.75) + ½·log(0.5/0.25)
        0.1438
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"student_logits and teacher_logits must both be [R, L, V] with [R, L] = mask's {tuple(mask.shape)}, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    _check_max_new_tokens(max_new_tokens, mask)
    student = torch.log_softmax(student_logits, dim=-1)
    teacher = torch.log_softmax(teacher_logits.detach().to(student.dtype), dim=-1)
    per_token = (student.exp() * (student - teacher)).sum(dim=-1)
    return _sequence_mean(per_token, mask.to(per_token.dtype), max_new_tokens)


def self_distill_token_advantages(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    clip: float = DEFAULT_DISTILL_CLIP,
) -> torch.Tensor:
    """The sampled-token estimator's dense per-token advantage w_t·a_t `[R, L]`, without gradient, 0 at padding.

    a_t = clip(log π(o_t | prompt ⊕ hint) − log π(o_t | prompt), −clip, clip). A policy-gradient loss that
    takes it as a per-token advantage (as `self_distill_token_loss` does, or TRL's loss in `prodsample.trl`)
    has, at θ = θ_old, the gradient of the sampled-token estimator.

    Args:
        logprobs: `[R, L]` log π(o_t | prompt) (detached here).
        teacher_logprobs: `[R, L]` log π(o_t | prompt ⊕ hint), detached here (`GuidedRollout.guide_logprobs` on
            guided rollouts; on λ = 1 ones the generator ran no hinted context: teacher-force it).
        mask: `[R, L]`, 1 for completion tokens.
        token_weights: `[R, L]` stop-gradient per-token weights, or None for 1 (rollouts drawn from π).
        clip: c > 0, the bound on |a_t|.

    Example:
        >>> import torch
        >>> from prodsample.grpo import self_distill_token_advantages
        >>> student, teacher = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -9.0]])
        >>> self_distill_token_advantages(student, teacher, torch.ones(1, 2))  # +0.5, and −7 clipped to −3
        tensor([[ 0.5000, -3.0000]])
    """
    _check_mask_shape(mask, logprobs=logprobs, teacher_logprobs=teacher_logprobs)
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    advantage = (teacher_logprobs.detach() - logprobs.detach()).clamp(-clip, clip)
    if token_weights is not None:
        _check_mask_shape(mask, token_weights=token_weights)
        advantage = advantage * token_weights.detach().to(advantage.dtype)
    return torch.where(mask.bool(), advantage, 0.0)


def self_distill_token_loss(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    token_weights: torch.Tensor | None = None,
    clip: float = DEFAULT_DISTILL_CLIP,
) -> torch.Tensor:
    """The sampled-token estimator of the same reverse KL: a dense per-token advantage a_t on log π_θ(o_t).

    a_t = clip(log π(o_t | prompt ⊕ hint) − log π(o_t | prompt), −clip, clip), both detached; the loss is
    −mean_i Σ_t w_t·a_t·log π_θ(o_t)·m_t / L. Its expected gradient over o_t ~ π is that of KL_t (up to the
    clip). On guided rollouts pass `token_weights` = min(π(o_t)/q(o_t), cap) (stop-gradient), e.g.
    `off_policy_weights(rollout.logprobs, rollout.plain_logprobs, mask,
    guidance=OFF_POLICY_MODES["token_truncate"]).guidance`; without them the expectation is over q's tokens.

    Args:
        logprobs: `[R, L]` log π_θ(o_t | prompt), with gradient.
        teacher_logprobs, mask, token_weights, clip: as `self_distill_token_advantages`.
        max_new_tokens: L; each rollout's token sum is divided by it.
    """
    _check_max_new_tokens(max_new_tokens, mask)
    advantage = self_distill_token_advantages(logprobs, teacher_logprobs, mask, token_weights=token_weights, clip=clip)
    per_token = torch.where(mask.bool(), -advantage * logprobs, 0.0)
    return _sequence_mean(per_token, mask.to(per_token.dtype), max_new_tokens)
