"""A framework-free GRPO objective for rollouts drawn from q (guided) or from π (plain).

For R rollouts in groups of G (prompt-major, as `GuidedRollout` orders them), rewards r and per-token
log-probs of the policy under the plain prompt:

    advantage      A_i = (r_i − mean_group(r)) / (std_group(r) + eps)       (scale="none": no division)
    ratio          ρ_t = exp(log π_θ(o_t) − log π_old(o_t))
    surrogate      s_t = min(ρ_t·A_i, clip(ρ_t, 1−ε, 1+ε)·A_i)
    loss           −Σ_t w_t·s_t·m_t / Σ_t m_t                                (token mean over the batch)

w_t is a stop-gradient importance weight for training on rollouts not drawn from π (from
`prodsample.importance.off_policy_weights`; 1 when None: the "none" recipe). LUFFY's policy shaping
π_θ/(π_θ+γ) enters the same way, as the weight γ·π/(π+γ)² on guided tokens that
`prodsample.trl.off_policy_mode_weights("luffy_shaping", ...)` computes (its gradient at π_θ = π_old).
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "grpo_loss"]


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Per-rollout advantages `[R]`: reward minus its group's mean, divided by the group's std when scale="std".

    A group whose rewards are all equal gets advantage 0 (it carries no learning signal).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [R] with R a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.flatten()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """The clipped GRPO surrogate, negated (to minimise), as a token mean over the batch.

    Args:
        logprobs: `[R, L]` log π_θ(o_t | prompt), with gradient.
        old_logprobs: `[R, L]` log π_old (no gradient; equal to `logprobs.detach()` for one update per batch).
        advantages: `[R]`, e.g. from `group_advantages`.
        mask: `[R, L]`, 1 for completion tokens.
        weights: `[R, L]` stop-gradient importance weights, or None for 1.
        clip_eps: ε of the PPO clip.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    if weights is not None:
        surrogate = surrogate * weights.detach().to(logprobs.dtype)
    return -(surrogate * mask).sum() / mask.sum().clamp_min(1.0)
