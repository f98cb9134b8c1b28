"""Importance weights: levels, truncation, masking, the product of the two sources, ESS."""

import math

import pytest
import torch

from prodsample.importance import (
    OFF_POLICY_MODES,
    ImportanceConfig,
    effective_sample_size,
    importance_weights,
    kl_q_pi,
    off_policy_weights,
)

LOG_RATIO = torch.tensor([[0.0, -1.0, 2.0, 5.0], [1.0, -0.5, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_token_level_truncates_each_token():
    weights = importance_weights(LOG_RATIO, MASK, ImportanceConfig("token", "truncate", cap=2.0))
    expected = torch.tensor([[1.0, math.exp(-1), 2.0, 0.0], [2.0, math.exp(-0.5), 0.0, 0.0]])
    torch.testing.assert_close(weights, expected)


def test_sequence_level_is_the_product_over_real_tokens():
    weights = importance_weights(LOG_RATIO, MASK, ImportanceConfig("sequence", "none"))
    first, second = math.exp(0.0 - 1.0 + 2.0), math.exp(1.0 - 0.5)  # padding (5.0) ignored
    torch.testing.assert_close(weights, torch.tensor([[first] * 3 + [0.0], [second] * 2 + [0.0, 0.0]]))


def test_geometric_level_is_the_length_normalised_product():
    weights = importance_weights(LOG_RATIO, MASK, ImportanceConfig("geometric", "none"))
    torch.testing.assert_close(weights[0, 0], torch.tensor(math.exp(1.0 / 3)))
    torch.testing.assert_close(weights[1, 1], torch.tensor(math.exp(0.5 / 2)))


def test_mask_mode_drops_whole_sequences_over_the_cap_and_under_the_floor():
    weights = importance_weights(LOG_RATIO, MASK, ImportanceConfig("sequence", "mask", cap=2.0, floor=0.5))
    assert weights[0].abs().sum() == 0  # e^1 > 2: masked
    torch.testing.assert_close(weights[1, :2], torch.full((2,), math.exp(0.5)))


def test_infinite_ratios_never_make_nan():
    log_ratio = torch.tensor([[math.inf, -math.inf, 800.0]])
    mask = torch.ones(1, 3)
    for config in (ImportanceConfig("token", "mask", cap=2.0), ImportanceConfig("token", "truncate", cap=2.0)):
        assert not torch.isnan(importance_weights(log_ratio, mask, config)).any()


def test_the_two_sources_are_truncated_separately_then_multiplied():
    q = torch.tensor([[-1.0, -3.0]])
    engine = torch.tensor([[-0.5, -0.5]])
    trainer = torch.tensor([[-0.5, 1.5]])
    mask = torch.ones(1, 2)
    out = off_policy_weights(q, engine, mask, trainer, guidance=ImportanceConfig(cap=2.0), engine=ImportanceConfig(cap=3.0))
    torch.testing.assert_close(out.guidance, torch.tensor([[math.exp(0.5), 2.0]]))  # e^2.5 capped at 2
    torch.testing.assert_close(out.engine, torch.tensor([[1.0, 3.0]]))  # e^2 capped at 3
    torch.testing.assert_close(out.weights, out.guidance * out.engine)
    assert float(out.clipped_fraction) == 0.5
    assert out.clipped.tolist() == [[False, True]]  # both caps bind on the second token only


def test_without_trainer_logprobs_the_engine_weight_is_one():
    out = off_policy_weights(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert float(out.weights) == 1.0 and float(out.effective_sample_size) == 1.0


def test_effective_sample_size():
    assert float(effective_sample_size(torch.ones(10))) == pytest.approx(1.0)
    assert float(effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == pytest.approx(0.25)
    masked = effective_sample_size(torch.tensor([[1.0, 5.0]]), torch.tensor([[1, 0]]))
    assert float(masked) == pytest.approx(1.0)


def test_kl_q_pi_is_the_mean_log_ratio_over_real_tokens():
    q = torch.tensor([[-0.1, -0.2, -9.0]])
    pi = torch.tensor([[-1.1, -0.2, 0.0]])
    assert float(kl_q_pi(q, pi, torch.tensor([[1, 1, 0]]))) == pytest.approx(0.5)


# Each named mode's weights on LOG_RATIO and MASK, from its formula in docs/trl.md ("Off-policy modes").
NAMED_MODE_WEIGHTS = {
    "none": None,  # the original recipe: no weights at all
    "token_truncate": [[1.0, math.exp(-1), 2.0, 0.0], [2.0, math.exp(-0.5), 0.0, 0.0]],  # min(exp(r_t), 2)
    "sequence_mask": [[0.0] * 4, [math.exp(0.5)] * 2 + [0.0] * 2],  # exp(Σ r) if ≤ 2, else 0: e^1 > 2 is dropped
    "geometric": [[math.exp(1 / 3)] * 3 + [0.0], [math.exp(0.25)] * 2 + [0.0] * 2],  # min(exp(mean r), 2)
}


@pytest.mark.parametrize("mode", sorted(NAMED_MODE_WEIGHTS))
def test_each_named_mode_gives_its_documented_weights(mode):
    assert set(OFF_POLICY_MODES) == set(NAMED_MODE_WEIGHTS), "a named mode without expected weights here"
    config, expected = OFF_POLICY_MODES[mode], NAMED_MODE_WEIGHTS[mode]
    if expected is None:
        assert config is None
        return
    torch.testing.assert_close(importance_weights(LOG_RATIO, MASK, config), torch.tensor(expected))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ImportanceConfig(level="word"), "level must be"),
        (lambda: ImportanceConfig(mode="clip"), "mode must be"),
        (lambda: ImportanceConfig(cap=0.5), "cap must be >= 1"),
        (lambda: ImportanceConfig(floor=0.5), "floor applies to mode='mask'"),
        (lambda: importance_weights(torch.zeros(2, 3), torch.ones(2, 4), ImportanceConfig()), "shape of mask"),
        (lambda: importance_weights(torch.tensor([[float("nan")]]), torch.ones(1, 1), ImportanceConfig()), "NaN"),
    ],
)
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()
