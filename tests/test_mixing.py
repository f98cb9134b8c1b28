"""mix_logprobs: the product of experts, its masks, and its errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prodsample import mix_logprobs

from .helpers.reference import log_softmax64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Math runs in fp32 on inputs rounded to the input dtype, so outputs agree with a float64 reference of the
# rounded inputs to fp32 accuracy.
ATOL = 1e-5


@st.composite
def experts_and_weights(draw, max_experts=4):
    rows = draw(st.integers(1, 5))
    vocab = draw(st.integers(1, 40))
    experts = draw(st.integers(1, max_experts))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(rows, vocab, generator=generator) * 4).to(dtype) for _ in range(experts)]
    raw = torch.rand(rows, experts, generator=generator)
    zero = torch.rand(rows, experts, generator=generator) < 0.3
    raw = torch.where(zero, 0.0, raw)
    raw[raw.sum(1) == 0, 0] = 1.0
    return logits, raw / raw.sum(1, keepdim=True)


def reference_mix(logits, weights):
    total = torch.zeros(logits[0].shape, dtype=torch.float64)
    for i, expert in enumerate(logits):
        w = weights[:, i : i + 1].double()
        total = total + torch.where(w > 0, w * log_softmax64(expert.float()), 0.0)
    return torch.log_softmax(total, dim=-1)


@settings(max_examples=60, deadline=None)
@given(experts_and_weights())
def test_matches_float64_reference_and_normalises(case):
    logits, weights = case
    mixed = mix_logprobs(logits, weights)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), reference_mix(logits, weights), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(mixed.double().exp().sum(-1), torch.ones(mixed.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(experts_and_weights(max_experts=2), st.floats(-50, 50))
def test_per_row_constant_shift_changes_nothing(case, shift):
    logits, weights = case
    shifted = [logits[0].float() + shift] + [expert.float() for expert in logits[1:]]
    torch.testing.assert_close(mix_logprobs(shifted, weights), mix_logprobs([e.float() for e in logits], weights), atol=5e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 30), st.integers(0, 2**31 - 1))
def test_weight_one_is_that_expert_exactly(rows, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    plain, guide = torch.randn(rows, vocab, generator=generator), torch.randn(rows, vocab, generator=generator)
    guide[:, 0] = -math.inf  # masked in the guide: must not leak into λ = 1
    assert torch.equal(mix_logprobs([plain, guide], [1.0, 0.0]), torch.log_softmax(plain, -1))
    plain[:, 1] = -math.inf
    assert torch.equal(mix_logprobs([plain, guide], [0.0, 1.0]), torch.log_softmax(guide, -1))


def test_masks_follow_the_product():
    plain = torch.tensor([[0.0, 1.0, -math.inf, 2.0]])
    guide = torch.tensor([[-math.inf, 0.5, 1.0, 2.0]])
    mixed = mix_logprobs([plain, guide], [0.5, 0.5])
    assert torch.isneginf(mixed[0, :3]).tolist() == [True, False, True]
    assert torch.isfinite(mixed[0, 1]) and not torch.isnan(mixed).any()


def test_weight_zero_expert_may_be_fully_masked():
    plain = torch.randn(2, 5)
    guide = torch.full((2, 5), -math.inf)
    torch.testing.assert_close(mix_logprobs([plain, guide], [1.0, 0.0]), torch.log_softmax(plain, -1))


def test_per_row_weights():
    plain, guide = torch.randn(2, 6), torch.randn(2, 6)
    mixed = mix_logprobs([plain, guide], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(mixed[0], torch.log_softmax(plain[0], -1))
    torch.testing.assert_close(mixed[1], torch.log_softmax(guide[1], -1))


@pytest.mark.parametrize(
    "logits, weights, message",
    [
        ([torch.randn(2, 5), torch.randn(2, 6)], [0.5, 0.5], "vocabulary mismatch"),
        ([torch.randn(2, 5), torch.randn(3, 5)], [0.5, 0.5], "batch mismatch"),
        ([torch.randn(2, 5), torch.randn(2, 5)], [0.7, 0.7], "sum to 1"),
        ([torch.randn(2, 5), torch.randn(2, 5)], [1.5, -0.5], r"\[0, 1\]"),
        ([torch.randn(2, 5), torch.randn(2, 5)], [1.0], "one per expert"),
        ([torch.tensor([[0.0, float("nan")]]), torch.randn(1, 2)], [0.5, 0.5], "NaN"),
        ([torch.tensor([[0.0, float("inf")]]), torch.randn(1, 2)], [0.5, 0.5], r"\+inf"),
        ([torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]])], [0.5, 0.5], "fully masked"),
        ([torch.randn(5)], [1.0], r"\[batch, vocab\]"),
        ([torch.randint(0, 3, (2, 5))], [1.0], "floating-point"),
        ([], [1.0], "non-empty"),
    ],
)
def test_bad_input_names_the_problem(logits, weights, message):
    with pytest.raises((ValueError, TypeError), match=message):
        mix_logprobs(logits, weights)
