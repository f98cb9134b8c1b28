"""GRPO objective: group advantages, and one-SGD-step bandit tests against the analytic gradient (float64)."""

import pytest
import torch

from prodsample.grpo import group_advantages, grpo_loss
from prodsample.importance import OFF_POLICY_MODES, off_policy_weights

LR = 0.1


def test_group_advantages_centre_and_scale_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    advantages = group_advantages(rewards, 4)
    first = advantages[:4]
    assert torch.allclose(first.mean(), torch.tensor(0.0, dtype=torch.float64))
    assert torch.allclose(first.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=torch.float64))  # all pass: no signal
    assert torch.allclose(group_advantages(rewards, 4, scale="none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)


THETA = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)


def _bandit(tokens, old_shift=0.0):
    """A one-token policy over a vocabulary of 4 with logits θ; returns θ, log π_θ(o) [R,1], log π_old [R,1]."""
    theta = THETA.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, 0)[tokens].unsqueeze(1)
    return theta, logprobs, logprobs.detach() + old_shift


def _sgd_step(theta, loss):
    optimizer = torch.optim.SGD([theta], lr=LR)
    before = theta.detach().clone()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return theta.detach() - before


def _score(tokens, theta=THETA):
    """∇_θ log π(o) = onehot(o) − π at the starting θ, for each rollout, [R, 4]."""
    probs = torch.softmax(theta, 0)
    return torch.nn.functional.one_hot(tokens, 4).double() - probs


TOKENS = torch.tensor([0, 1, 3, 3])
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)


def test_on_policy_step_is_the_policy_gradient():
    theta, logprobs, old = _bandit(TOKENS)
    advantages = group_advantages(REWARDS, 4)
    change = _sgd_step(theta, grpo_loss(logprobs, old, advantages, torch.ones(4, 1)))
    analytic = (advantages.unsqueeze(1) * _score(TOKENS)).mean(0)  # ascent direction
    assert torch.allclose(change, LR * analytic, atol=1e-12)


@pytest.mark.parametrize("mode", sorted(OFF_POLICY_MODES))
def test_importance_weighted_step_scales_each_rollout_by_its_weight(mode):
    theta, logprobs, old = _bandit(TOKENS)
    # Rollouts drawn from a q that favoured the sampled tokens: log q above log π by various amounts.
    log_q = old + torch.tensor([[0.1], [1.5], [-0.4], [2.5]], dtype=torch.float64)
    config = OFF_POLICY_MODES[mode]
    weights = None if config is None else off_policy_weights(log_q, old, torch.ones(4, 1), guidance=config).weights
    advantages = group_advantages(REWARDS, 4)
    change = _sgd_step(theta, grpo_loss(logprobs, old, advantages, torch.ones(4, 1), weights=weights))
    w = torch.ones(4, dtype=torch.float64) if weights is None else weights.squeeze(1)
    analytic = (w.unsqueeze(1) * advantages.unsqueeze(1) * _score(TOKENS)).mean(0)
    assert torch.allclose(change, LR * analytic, atol=1e-12)
    if config is not None:  # the weights are those of the mode: π/q, at least one clipped or masked
        assert (w < 1).any()


def test_clipped_ratio_stops_the_gradient_outside_the_trust_region():
    # π_θ / π_old = e^{0.5} > 1 + ε on every row: positive-advantage rows are clipped (no gradient), negative ones not.
    theta, logprobs, old = _bandit(TOKENS, old_shift=-0.5)
    advantages = group_advantages(REWARDS, 4)
    change = _sgd_step(theta, grpo_loss(logprobs, old, advantages, torch.ones(4, 1), clip_eps=0.2))
    ratio = torch.exp(torch.tensor(0.5, dtype=torch.float64))
    unclipped = advantages < 0
    analytic = (unclipped.unsqueeze(1) * ratio * advantages.unsqueeze(1) * _score(TOKENS)).mean(0)
    assert torch.allclose(change, LR * analytic, atol=1e-12)
