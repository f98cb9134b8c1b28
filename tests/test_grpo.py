"""Training signals: GRPO, baseline-keeping weights and self-distillation, against exact float64 gradients."""

import itertools

import pytest
import torch

from prodsample.grpo import (
    DEFAULT_DISTILL_CLIP,
    DistillCoefficient,
    baseline_keeping_advantages,
    group_advantages,
    grpo_loss,
    self_distill_kl_loss,
    self_distill_token_loss,
)
from prodsample.importance import OFF_POLICY_MODES, off_policy_weights
from prodsample.schedules import Constant, Cosine

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


# ---------------------------------------------------------------------------------------------------------
# max_new_tokens normalisation
# ---------------------------------------------------------------------------------------------------------


def test_max_new_tokens_divides_each_rollouts_token_sum_by_the_limit():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = grpo_loss(logprobs, logprobs, advantages, mask, max_new_tokens=4)
    # ratio 1: surrogate = A per real token; rollout sums 2·1 and 1·(−2), each over 4, mean over 2 rollouts
    assert loss.item() == pytest.approx(-((2 * 1.0) / 4 + (1 * -2.0) / 4) / 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        grpo_loss(logprobs, logprobs, advantages, mask, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------
# Baseline-keeping importance weights
# ---------------------------------------------------------------------------------------------------------


def _random_groups(groups, group_size, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (groups * group_size,), generator=generator).double()
    log_pi = -torch.rand(groups * group_size, length, generator=generator, dtype=torch.float64) * 3
    log_q = -torch.rand(groups * group_size, length, generator=generator, dtype=torch.float64) * 3
    mask = torch.rand(groups * group_size, length, generator=generator) < 0.8
    return rewards, log_pi, log_q, mask


@pytest.mark.parametrize("truncate", [None, 1.5])
def test_baseline_keeping_centres_the_advantages_under_the_weights(truncate):
    rewards, log_pi, log_q, mask = _random_groups(6, 4, 5)
    out = baseline_keeping_advantages(rewards, log_pi, log_q, mask, 4, truncate=truncate)
    weights, advantages = out.weights.view(6, 4), out.advantages.view(6, 4)
    assert torch.allclose(weights.sum(1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose((weights * advantages).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.loss_weights, 4 * out.weights * out.advantages)
    # the weights are the softmax of the masked sequence log-ratios (checked on the untruncated case)
    if truncate is None:
        log_ratio = ((log_pi - log_q) * mask).sum(1).view(6, 4)
        expected = log_ratio.exp() / log_ratio.exp().sum(1, keepdim=True)
        assert torch.allclose(weights, expected)


def test_baseline_keeping_truncates_at_c_over_g_and_renormalises():
    weights = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    out = baseline_keeping_advantages(
        torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), weights.log().unsqueeze(1),
        torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1), 4, truncate=2.0,
    )
    assert torch.allclose(out.weights, torch.tensor([0.5, 0.1, 0.1, 0.1], dtype=torch.float64) / 0.8)
    with pytest.raises(ValueError, match="truncate"):
        baseline_keeping_advantages(torch.zeros(4), torch.zeros(4, 1), torch.zeros(4, 1), torch.ones(4, 1), 4, truncate=0.5)


def test_baseline_keeping_with_q_equal_to_pi_is_grpo():
    """q = π: w̃ = 1/G, so G·w̃·A is GRPO's advantage and the loss is GRPO's with the same normalisation."""
    rewards, log_pi, _, mask = _random_groups(5, 4, 3, seed=1)
    theta = log_pi.clone().requires_grad_(True)  # any differentiable log-probs will do
    out = baseline_keeping_advantages(rewards, theta, theta, mask, 4)
    assert torch.allclose(out.loss_weights, group_advantages(rewards, 4), atol=1e-12)
    loss = grpo_loss(theta, theta.detach(), out.loss_weights, mask, max_new_tokens=3)
    (gradient,) = torch.autograd.grad(loss, theta)
    # GRPO by hand: −mean_i A_i Σ_t log π(o_it) / L, whose gradient per token is −A_i·m_t/(R·L)
    expected = -group_advantages(rewards, 4).unsqueeze(1) * mask / (20 * 3)
    assert torch.allclose(gradient, expected, atol=1e-12)


def test_baseline_keeping_unbiased_with_q_equal_to_pi_is_trls_grpo():
    """unbiased=True at w̃ = 1/G: the std with Bessel's correction, as TRL's GRPO divides by (std + 1e-4);
    scale="none": the centred rewards alone."""
    rewards, log_pi, _, mask = _random_groups(5, 4, 3, seed=2)
    groups = rewards.view(5, 4)
    centred = groups - groups.mean(1, keepdim=True)
    bessel = (centred.pow(2).sum(1, keepdim=True) / 3).sqrt()
    out = baseline_keeping_advantages(rewards, log_pi, log_pi, mask, 4, unbiased=True, eps=1e-4)
    torch.testing.assert_close(out.loss_weights, (centred / (bessel + 1e-4)).flatten())
    unscaled = baseline_keeping_advantages(rewards, log_pi, log_pi, mask, 4, scale="none")
    torch.testing.assert_close(unscaled.loss_weights, centred.flatten())


def test_baseline_keeping_unbiased_spread_is_the_reliability_weighted_variance():
    """s² = Σw̃(r − b)² / (1 − Σw̃²); 0 (no NaN) when one rollout holds all the weight."""
    weights = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)  # the last has π = 0: w̃ = 0
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0], dtype=torch.float64)
    out = baseline_keeping_advantages(rewards, weights.log().unsqueeze(1), torch.zeros(4, 1, dtype=torch.float64),
                                      torch.ones(4, 1), 4, unbiased=True, eps=0.0)
    baseline = 0.5 * 1 + 0.25 * 0 + 0.25 * 2  # 1.0
    variance = (0.5 * 0 + 0.25 * 1 + 0.25 * 1) / (1 - (0.25 + 0.0625 + 0.0625))
    torch.testing.assert_close(out.advantages, (rewards - baseline) / variance**0.5)
    one_hot = torch.tensor([[0.0], [-torch.inf], [-torch.inf], [-torch.inf]], dtype=torch.float64)
    single = baseline_keeping_advantages(rewards, one_hot, torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1), 4,
                                         unbiased=True)
    assert torch.isfinite(single.loss_weights).all() and single.loss_weights.abs().max() < 1e-5


def test_baseline_keeping_leaves_unscorable_rollouts_out():
    """NaN rewards get w̃ = 0 and A = 0, the group's others are weighted among themselves; a group with no
    scorable rollout gets zeros."""
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0] + [float("nan")] * 4, dtype=torch.float64)
    zeros = torch.zeros(8, 1, dtype=torch.float64)
    out = baseline_keeping_advantages(rewards, zeros, zeros, torch.ones(8, 1), 4, unbiased=True, eps=0.0)
    assert out.weights.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3] + [0.0] * 4)
    scored = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = (scored - scored.mean()) / scored.std()
    torch.testing.assert_close(out.advantages[[0, 2, 3]], expected)
    assert out.advantages[1] == 0.0 and out.loss_weights[4:].tolist() == [0.0] * 4


def test_baseline_keeping_marks_the_truncated_rollouts():
    weights = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    out = baseline_keeping_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), weights.log().unsqueeze(1),
                                      torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1), 4, truncate=2.0)
    assert out.truncated.tolist() == [True, False, False, False]


BK_THETA = torch.tensor([-1.0, 0.3, 0.2], dtype=torch.float64)  # π puts 0.14 on the best arm
BK_Q = torch.softmax(torch.tensor([0.5, 0.3, -0.2], dtype=torch.float64), 0)  # q favours it
BK_REWARD = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)


def _bk_expected_gradient(group_size):
    """E over every group of `group_size` draws from q of the baseline-keeping ascent direction, enumerated.

    Each group gets its own copy of θ, so one batched call gives every group's gradient; π_old is passed
    as the differentiable log π_θ (π_θ = π_old, one update per batch) so a missing detach shows.
    """
    groups = torch.tensor(list(itertools.product(range(3), repeat=group_size)))
    theta = BK_THETA.repeat(len(groups), 1).requires_grad_(True)
    logprobs = torch.log_softmax(theta, 1).gather(1, groups).reshape(-1, 1)
    mask = torch.ones_like(logprobs)
    out = baseline_keeping_advantages(BK_REWARD[groups].flatten(), logprobs, BK_Q.log()[groups].reshape(-1, 1), mask,
                                      group_size, eps=1e-12)
    grpo_loss(logprobs, logprobs.detach(), out.loss_weights, mask, max_new_tokens=1).backward()
    per_group = -theta.grad * len(groups)  # the batch loss is the mean over groups
    return (BK_Q[groups].prod(1).unsqueeze(1) * per_group).sum(0)


def test_baseline_keeping_expected_gradient_approaches_the_policy_gradient_like_one_over_g():
    """Exact expectation (every group enumerated, float64) against ∇E_π[R]/σ_π(R), the G → ∞ limit.

    The self-normalised form is biased by O(1/G): G·error stays bounded and the error shrinks with G.
    Mutations this catches (each tried): the π/q weight dropped (w̃ = 1/G: it converges to q's gradient,
    error 0.21 at G = 8), the sign of A flipped, and the stop-gradient on π_old removed (the softmax
    then carries a gradient of its own).
    """
    pi = torch.softmax(BK_THETA, 0)
    policy_gradient = (pi * BK_REWARD).unsqueeze(1).mul(torch.eye(3, dtype=torch.float64) - pi).sum(0)
    spread = (pi * (BK_REWARD - (pi * BK_REWARD).sum()) ** 2).sum().sqrt()
    errors = {g: (_bk_expected_gradient(g) - policy_gradient / spread).norm().item() for g in (2, 4, 8)}
    assert errors[8] < errors[4] < errors[2]
    assert all(g * error < 0.5 for g, error in errors.items()), errors


# ---------------------------------------------------------------------------------------------------------
# Self-distillation: a tabular policy over sequences of length 2 from a vocabulary of 3, every outcome enumerated
# ---------------------------------------------------------------------------------------------------------

VOCAB, LENGTH = 3, 2
MAX_NEW_TOKENS = 3  # the generation limit, above these rollouts' length: the /L divisor is not a token mean
_tables = torch.Generator().manual_seed(3)
# Student logits: position 0 (no prefix) and position 1 given the first token. The hinted context adds its
# own table to the *same* θ, so a teacher without a stop-gradient would leak gradient into θ and φ.
THETA0 = torch.randn(VOCAB, generator=_tables, dtype=torch.float64) * 0.5
THETA1 = torch.randn(VOCAB, VOCAB, generator=_tables, dtype=torch.float64) * 0.5
PHI0 = torch.randn(VOCAB, generator=_tables, dtype=torch.float64) * 0.5
PHI1 = torch.randn(VOCAB, VOCAB, generator=_tables, dtype=torch.float64) * 0.5
SEQUENCES = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # [9, 2]


def _tabular(params, sequences):
    """Student and teacher logits `[N, 2, V]` at the positions that predict each sequence's two tokens."""
    theta0, theta1, phi0, phi1 = params
    student = torch.stack([theta0.expand(len(sequences), VOCAB), theta1[sequences[:, 0]]], dim=1)
    teacher = torch.stack([(theta0 + phi0).expand(len(sequences), VOCAB), (theta1 + phi1)[sequences[:, 0]]], dim=1)
    return student, teacher


def _behaviour(lam):
    """Per-position q ∝ π^λ·π_T^(1−λ) (λ = 1: plain rollouts), `[9, 2, V]` log-probs, and each sequence's q."""
    student, teacher = _tabular((THETA0, THETA1, PHI0, PHI1), SEQUENCES)
    log_q = torch.log_softmax(lam * torch.log_softmax(student, -1) + (1 - lam) * torch.log_softmax(teacher, -1), -1)
    return log_q, log_q.gather(-1, SEQUENCES.unsqueeze(-1)).squeeze(-1).sum(1).exp()


def _kl_target_gradient(lam):
    """∇ of Σ_t E_{o<t ~ q}[KL(π_θ(·|o<t) ‖ π_T(·|o<t))] / max_new_tokens, teacher held fixed: by the closed form
    ∂KL/∂z = p ⊙ (log p − log p_T − KL) for student logits z, prefixes weighted by q's first-token marginal."""
    log_q, _ = _behaviour(lam)
    first_token = log_q[0, 0].exp()  # q(o_0), the same on every row

    def logit_gradient(z, teacher_z):
        log_p, log_t = torch.log_softmax(z, -1), torch.log_softmax(teacher_z, -1)
        kl = (log_p.exp() * (log_p - log_t)).sum(-1, keepdim=True)
        return log_p.exp() * (log_p - log_t - kl)

    grad0 = logit_gradient(THETA0, THETA0 + PHI0) / MAX_NEW_TOKENS
    grad1 = first_token.unsqueeze(1) * logit_gradient(THETA1, THETA1 + PHI1) / MAX_NEW_TOKENS
    return grad0, grad1


def _expected_estimator_gradient(loss_of, lam):
    """Σ over the 9 sequences of q(sequence)·∇(the estimator's loss on that one rollout), for (θ0, θ1, φ0, φ1).

    `loss_of(student_logits, teacher_logits, row)` is the estimator on the rollout `SEQUENCES[row]`."""
    _, sequence_q = _behaviour(lam)
    totals = [torch.zeros_like(t) for t in (THETA0, THETA1, PHI0, PHI1)]
    for row in range(len(SEQUENCES)):
        params = [t.clone().requires_grad_(True) for t in (THETA0, THETA1, PHI0, PHI1)]
        student, teacher = _tabular(params, SEQUENCES[row : row + 1])
        gradients = torch.autograd.grad(loss_of(student, teacher, row), params, allow_unused=True)
        for total, gradient in zip(totals, gradients):
            if gradient is not None:
                total += sequence_q[row] * gradient
    return totals


def _assert_matches_target(expected_gradient, lam):
    grad0, grad1 = _kl_target_gradient(lam)
    theta0, theta1, phi0, phi1 = expected_gradient
    assert torch.allclose(theta0, grad0, atol=1e-12) and torch.allclose(theta1, grad1, atol=1e-12)
    assert torch.equal(phi0, torch.zeros_like(phi0)) and torch.equal(phi1, torch.zeros_like(phi1))


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_self_distill_full_kl_has_the_gradient_of_the_kl_on_the_visited_positions(lam):
    """Plain (λ = 1) and guided (λ = ½) rollouts, no token weight: the prefixes follow q, the KL is whole.

    Mutations this catches (each tried): the teacher not detached (θ's gradient changes, φ gets one), the
    divergence's direction or sign swapped (KL(π_T‖π_θ) or −KL), a token mean instead of the /L sum.
    """
    mask = torch.ones(1, LENGTH)

    def loss_of(student, teacher, row):
        return self_distill_kl_loss(student, teacher, mask, max_new_tokens=MAX_NEW_TOKENS)

    _assert_matches_target(_expected_estimator_gradient(loss_of, lam), lam)


def _token_loss(weighted):
    def loss_of(student, teacher, row):
        tokens = SEQUENCES[row : row + 1].unsqueeze(-1)
        logprobs = torch.log_softmax(student, -1).gather(-1, tokens).squeeze(-1)
        teacher_logprobs = torch.log_softmax(teacher, -1).gather(-1, tokens).squeeze(-1)
        assert (teacher_logprobs - logprobs).abs().max() < DEFAULT_DISTILL_CLIP  # the clip stays out of the way
        weights = None
        if weighted:  # capped π/q at λ = ½, from the differentiable π so that a missing detach would show
            log_q = _behaviour(0.5)[0][row : row + 1].gather(-1, tokens).squeeze(-1)
            weights = (logprobs - log_q).exp().clamp(max=10.0)
        return self_distill_token_loss(logprobs, teacher_logprobs, torch.ones(1, LENGTH), max_new_tokens=MAX_NEW_TOKENS,
                                       token_weights=weights)

    return loss_of


def test_self_distill_sampled_token_on_plain_rollouts_has_the_kl_gradient_in_expectation():
    """λ = 1, no weight: E_π[−a_t ∇log π_θ(o_t)] = ∇KL_t at every visited position.

    Mutations this catches (each tried): a_t's sign flipped, a_t not detached (its own gradient adds
    log π·∇log π), the teacher's log-prob not detached (φ gets a gradient).
    """
    _assert_matches_target(_expected_estimator_gradient(_token_loss(weighted=False), 1.0), 1.0)


def test_self_distill_sampled_token_on_guided_rollouts_needs_the_pi_over_q_weight():
    """λ = ½: with the per-token π/q weight (cap not reached) it matches the KL gradient on q's prefixes.

    Mutations this catches (each tried): the weight dropped (the expectation is then over q's tokens; the
    second assertion shows the gap), the weight not detached.
    """
    _assert_matches_target(_expected_estimator_gradient(_token_loss(weighted=True), 0.5), 0.5)
    unweighted = _expected_estimator_gradient(_token_loss(weighted=False), 0.5)
    assert not torch.allclose(unweighted[0], _kl_target_gradient(0.5)[0], atol=1e-6)


def test_self_distill_token_advantage_is_clipped():
    logprobs = torch.tensor([[-0.1, -5.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-30.0, -0.01]], dtype=torch.float64)  # near one-hot teacher: a = −29.9, +4.99
    loss = self_distill_token_loss(logprobs, teacher, torch.ones(1, 2), max_new_tokens=2, clip=3.0)
    (gradient,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(gradient, torch.tensor([[3.0, -3.0]], dtype=torch.float64) / 2)


def test_distill_coefficient_reaches_zero_and_needs_an_end():
    beta = DistillCoefficient(start=0.4, shape=Cosine(start=0.0, end_step=10))
    assert beta.value(0) == pytest.approx(0.4) and beta.value(10) == 0.0 and beta.value(50) == 0.0
    assert 0.0 < beta.value(5) < 0.4
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="end_step"):
        DistillCoefficient(start=0.4, shape=Constant(lam=0.0))
