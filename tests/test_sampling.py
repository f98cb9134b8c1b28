"""product_sample / product_logprobs: definitions, distribution, keyed noise, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prodsample import product_logprobs, product_sample

from .helpers.reference import chi_square_pvalue, log_softmax64, product_distribution, tempered_logprob

ALPHA = 1e-3  # chi-square significance: a correct sampler fails a given test with probability 1e-3
DRAWS = 40_000


def positions(rows):
    return torch.zeros(rows, dtype=torch.long)


def draw_many(plain_row, guide_row, lam, draws=DRAWS, seed=0, **filters):
    """`draws` independent samples from one row's q (one rollout id per draw)."""
    plain = plain_row.expand(draws, -1)
    guide = guide_row.expand(draws, -1)
    out = product_sample(plain, guide, lam, seed=seed, positions=positions(draws), **filters)
    return torch.bincount(out.token_ids, minlength=plain_row.shape[-1]), out


@st.composite
def sampling_case(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 50))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    plain = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    guide = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    mask_plain = torch.rand(rows, vocab, generator=generator) < 0.15
    mask_plain[:, 0] = False  # keep the product non-empty
    plain = plain.masked_fill(mask_plain, -math.inf)
    # λ is float32 inside: keep it clear of values that round to 0 or 1 there.
    lam = draw(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(1e-4, 1 - 1e-4))
    temperature = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.2, 3.0))
    filters = {
        "top_k": draw(st.none() | st.integers(0, vocab + 2)),
        "top_p": draw(st.none() | st.floats(0.05, 1.0)),
        "min_p": draw(st.none() | st.floats(0.0, 0.5)),
    }
    return plain, guide, lam, temperature, filters


@settings(max_examples=80, deadline=None)
@given(sampling_case(), st.integers(0, 2**40))
def test_outputs_match_the_float64_definitions_and_scoring_reproduces_them(case, seed):
    plain, guide, lam, temperature, filters = case
    rows = plain.shape[0]
    out = product_sample(plain, guide, lam, temperature=temperature, seed=seed, positions=positions(rows), **filters)
    scored = product_logprobs(plain, guide, lam, out.token_ids, temperature=temperature, **filters)
    for field in out._fields:
        torch.testing.assert_close(getattr(scored, field), getattr(out, field), rtol=0, atol=0)
    for row in range(rows):
        token = int(out.token_ids[row])
        q = product_distribution(plain[row].float(), guide[row].float(), lam, temperature or 1.0, **filters)
        reported_t = temperature or 1.0
        assert torch.isfinite(out.log_normalizer[row])
        if temperature == 0:
            assert float(out.logprobs[row]) == 0.0
            mixed = q.log()
            assert float(mixed[token]) >= float(mixed.max()) - 1e-5, "greedy must pick the argmax of q"
        else:
            assert float(q[token]) > 0, "a filtered or masked token was drawn"
            assert math.isclose(float(out.logprobs[row]), math.log(float(q[token])), abs_tol=2e-4, rel_tol=1e-4)
        for name, logits in (("plain_logprobs", plain), ("guide_logprobs", guide)):
            expected = tempered_logprob(logits[row].float(), token, reported_t)
            got = float(getattr(out, name)[row])
            assert (math.isinf(expected) and got == expected) or math.isclose(got, expected, abs_tol=2e-4, rel_tol=1e-4)
        # log q_t = (λ·ℓ_plain + (1−λ)·ℓ_guide)/T − log_normalizer, with ℓ at T = 1.
        mixed = sum(
            weight * float(log_softmax64(logits[row].float())[token])
            for weight, logits in ((lam, plain), (1 - lam, guide))
            if weight > 0
        )
        assert math.isclose(mixed / reported_t - float(out.log_normalizer[row]), float(out.logprobs[row]), abs_tol=5e-4, rel_tol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 40), st.floats(0.2, 3.0), st.integers(0, 2**31 - 1))
def test_lam_one_is_the_plain_policy_and_lam_zero_the_guided_one(rows, vocab, temperature, seed):
    generator = torch.Generator().manual_seed(seed)
    plain, guide = torch.randn(rows, vocab, generator=generator), torch.randn(rows, vocab, generator=generator)
    guide[:, 0] = -math.inf
    plain_only = product_sample(plain, guide, 1.0, temperature=temperature, seed=seed, positions=positions(rows))
    assert torch.equal(plain_only.logprobs, plain_only.plain_logprobs)
    plain[:, 1] = -math.inf
    guide_only = product_sample(plain, guide, 0.0, temperature=temperature, seed=seed, positions=positions(rows))
    assert torch.equal(guide_only.logprobs, guide_only.guide_logprobs)


CHI_SQUARE_CASES = {
    "plain_mix": dict(lam=0.5),
    "tempered": dict(lam=0.3, temperature=0.6),
    "hot": dict(lam=0.7, temperature=1.8),
    "top_k": dict(lam=0.5, temperature=0.9, top_k=4),
    "top_p": dict(lam=0.5, top_p=0.7),
    "min_p": dict(lam=0.6, min_p=0.2),
    "all_filters": dict(lam=0.4, temperature=1.3, top_k=6, top_p=0.85, min_p=0.05),
}


def chi_square_logits():
    generator = torch.Generator().manual_seed(1234)
    plain = torch.randn(8, generator=generator) * 1.5
    guide = torch.randn(8, generator=generator) * 1.5
    plain[7] = -math.inf  # masked in the plain context: never drawn while λ > 0
    return plain, guide


@pytest.mark.parametrize("name", sorted(CHI_SQUARE_CASES))
def test_samples_follow_q(name):
    settings_ = dict(CHI_SQUARE_CASES[name])
    lam = settings_.pop("lam")
    plain, guide = chi_square_logits()
    q = product_distribution(plain, guide, lam, settings_.get("temperature", 1.0), settings_.get("top_k"), settings_.get("top_p"), settings_.get("min_p"))
    counts, _ = draw_many(plain, guide, lam, **settings_)
    assert counts[q == 0].sum() == 0, "a filtered or masked token was drawn"
    assert chi_square_pvalue(counts, q) > ALPHA


def test_unkeyed_generator_path_follows_q():
    plain, guide = chi_square_logits()
    q = product_distribution(plain, guide, 0.5, 0.8)
    generator = torch.Generator().manual_seed(7)
    out = product_sample(plain.expand(DRAWS, -1), guide.expand(DRAWS, -1), 0.5, temperature=0.8, generator=generator)
    assert chi_square_pvalue(torch.bincount(out.token_ids, minlength=8), q) > ALPHA


def wrong_plain_only(plain, guide, lam, temperature, top_k):
    return product_sample(plain, guide, 1.0, temperature=temperature, top_k=top_k, seed=3, positions=positions(len(plain)))


def wrong_filter_before_mixing(plain, guide, lam, temperature, top_k):
    def top_k_mask(logits):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, -math.inf)

    return product_sample(top_k_mask(plain), top_k_mask(guide), lam, temperature=temperature, seed=3, positions=positions(len(plain)))


def wrong_temperature_on_one_context(plain, guide, lam, temperature, top_k):
    return product_sample(plain / temperature, guide, lam, top_k=top_k, seed=3, positions=positions(len(plain)))


@pytest.mark.parametrize("wrong_sampler", [wrong_plain_only, wrong_filter_before_mixing, wrong_temperature_on_one_context])
def test_negative_controls_are_rejected(wrong_sampler):
    """The chi-square test above has power: samplers that get q wrong in plausible ways fail it."""
    # Each context's top-2 differs from the product's top-2 ({1, 3}), so filtering first changes the support.
    plain = torch.tensor([3.0, 2.5, 0.0, 2.0, -1.0, 0.5, 1.0, -2.0])
    guide = torch.tensor([0.0, 2.5, 3.0, 2.0, 1.0, -1.0, -0.5, 0.3])
    lam, temperature, top_k = 0.5, 0.5, 2
    q = product_distribution(plain, guide, lam, temperature, top_k=top_k)
    out = wrong_sampler(plain.expand(DRAWS, -1), guide.expand(DRAWS, -1), lam, temperature, top_k)
    assert chi_square_pvalue(torch.bincount(out.token_ids, minlength=8), q) < ALPHA


def test_keyed_noise_reproduces_and_separates_rollouts():
    plain, guide = torch.randn(1, 500).expand(64, -1), torch.randn(1, 500).expand(64, -1)
    first = product_sample(plain, guide, 0.5, seed=5, rollout_ids=torch.arange(64), positions=3)
    again = product_sample(plain, guide, 0.5, seed=5, rollout_ids=torch.arange(64), positions=3)
    assert torch.equal(first.token_ids, again.token_ids)
    assert len(set(first.token_ids.tolist())) > 20, "rollouts with different ids must draw independently"
    moved = product_sample(plain, guide, 0.5, seed=5, rollout_ids=torch.arange(64), positions=4)
    assert not torch.equal(first.token_ids, moved.token_ids)


def test_per_row_settings():
    plain, guide = torch.randn(3, 30), torch.randn(3, 30)
    out = product_sample(
        plain, guide, torch.tensor([1.0, 0.0, 0.5]), temperature=torch.tensor([0.0, 1.0, 0.5]),
        top_k=torch.tensor([0, 1, 5]), top_p=torch.tensor([1.0, 1.0, 0.9]), seed=0, positions=0,
    )
    assert int(out.token_ids[0]) == int(plain[0].argmax()) and float(out.logprobs[0]) == 0.0
    assert int(out.token_ids[1]) == int(guide[1].argmax()) and float(out.logprobs[1]) == 0.0  # top-1 of the guide


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lam=1.5), r"lam must lie in \[0, 1\]"),
        (dict(lam=float("nan")), "lam must lie"),
        (dict(lam=0.5, temperature=-1.0), "temperature must lie"),
        (dict(lam=0.5, top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(lam=0.5, top_k=-2), "top_k must be an integer >= 0"),
        (dict(lam=0.5, top_k=2.5), "top_k must be an integer"),
        (dict(lam=0.5, min_p=1.5), "min_p must lie"),
        (dict(lam=torch.tensor([0.5, 0.5, 0.5])), r"lam must be a scalar or a tensor of shape \[2\]"),
        (dict(lam=0.5, seed=3), "positions is required with seed"),
        (dict(lam=0.5, positions=2), "need seed"),
        (dict(lam=0.5, seed=1, positions=0, generator=torch.Generator()), "either seed"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        product_sample(torch.randn(2, 5), torch.randn(2, 5), **kwargs)


@pytest.mark.parametrize(
    "plain, guide, message",
    [
        (torch.randn(2, 5), torch.randn(2, 6), "vocabulary mismatch"),
        (torch.randn(2, 5), torch.randn(3, 5), "batch mismatch"),
        (torch.tensor([[0.0, float("nan")]]), torch.randn(1, 2), "plain_logits contains NaN"),
        (torch.randn(1, 2), torch.tensor([[float("inf"), 0.0]]), r"guide_logits contains NaN or \+inf"),
        (torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]]), "fully masked"),
        (torch.full((1, 3), -math.inf), torch.randn(1, 3), "plain_logits row 0 is fully masked"),
        (torch.randn(5), torch.randn(5), r"\[batch, vocab\]"),
    ],
)
def test_bad_logits_are_refused(plain, guide, message):
    with pytest.raises(ValueError, match=message):
        product_sample(plain, guide, 0.5)


def test_scoring_refuses_tokens_outside_the_vocabulary():
    with pytest.raises(ValueError, match="token_ids must lie in"):
        product_logprobs(torch.randn(2, 5), torch.randn(2, 5), 0.5, torch.tensor([0, 5]))
