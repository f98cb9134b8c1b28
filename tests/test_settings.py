"""`SamplingSettings`: checked once with errors naming the argument, λ per rollout, the flat form."""

import dataclasses
import json

import pytest
import torch

from prodsample.settings import SamplingSettings


def test_off_filters_are_stored_as_their_off_values():
    settings = SamplingSettings(lam=0.5, top_k=None, top_p=None, min_p=None)
    assert (settings.top_k, settings.top_p, settings.min_p) == (0, 1.0, 0.0)
    assert settings == SamplingSettings(lam=0.5)
    assert SamplingSettings(lam=torch.tensor(0.5), temperature=1) == SamplingSettings(lam=0.5, temperature=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.temperature = 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lam=1.5), r"lam must lie in \[0, 1\], got 1.5"),
        (dict(lam=[0.5, float("nan")]), r"lam must lie in \[0, 1\]"),
        (dict(lam=[]), "lam must hold at least one value"),
        (dict(lam="0.5"), "lam must be a float or a sequence of floats"),
        (dict(lam=None), "lam must be a float or a sequence of floats"),
        (dict(lam=0.5, temperature=-1.0), r"temperature must lie in \[0, inf\]"),
        (dict(lam=0.5, temperature="warm"), "temperature must be a number"),
        (dict(lam=0.5, top_k=-1), r"top_k must be an integer >= 0 \(0 disables it\)"),
        (dict(lam=0.5, top_k=3.0), "top_k must be an integer"),
        (dict(lam=0.5, top_k=True), "top_k must be an integer"),
        (dict(lam=0.5, top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(lam=0.5, min_p=2.0), r"min_p must lie in \[0, 1\]"),
        (dict(lam=0.5, num_generations=True), "num_generations must be a positive integer"),
        (dict(lam=0.5, max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(lam=0.5, seed=1.5), "seed must be an integer"),
        (dict(lam=0.5, hint_template="no fields"), "hint_template must contain"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


@pytest.mark.parametrize(
    "lam, expected",
    [
        (0.25, [0.25] * 6),
        ([0.0, 0.5], [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]),  # one per prompt, repeated over its G rollouts
        (torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),  # one per rollout
    ],
)
def test_lam_per_rollout_expands_a_float_or_one_value_per_prompt(lam, expected):
    rows = SamplingSettings(lam=lam).lam_per_rollout(num_prompts=2, num_generations=3)
    assert rows.dtype == torch.float32 and rows.shape == (6,)
    assert torch.equal(rows, torch.tensor(expected, dtype=torch.float32))


def test_lam_per_rollout_refuses_another_count():
    with pytest.raises(ValueError, match=r"lam must be a float, one value per prompt \(2\) or one per rollout \(6\), got 4"):
        SamplingSettings(lam=[0.5] * 4).lam_per_rollout(num_prompts=2, num_generations=3)


@pytest.mark.parametrize(
    "settings",
    [SamplingSettings(lam=0.3), SamplingSettings(lam=[0.0, 1.0, 0.5], temperature=0.0, top_k=7, top_p=0.95, min_p=0.1)],
)
def test_the_flat_form_round_trips_through_json_with_plain_values(settings):
    flat = settings.to_flat()
    for value in flat.values():
        assert type(value) in (str, int, float, list), value
        assert all(type(item) in (str, int, float) for item in (value if isinstance(value, list) else []))
    assert SamplingSettings.from_flat(json.loads(json.dumps(flat))) == settings


def test_the_flat_form_takes_integers_for_reals():
    """JSON writes 1.0 as 1 in some clients: a whole number where a real is expected is that real."""
    assert SamplingSettings.from_flat({"lam": 1, "temperature": 1, "top_p": 1}) == SamplingSettings(lam=1.0)


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"lam": 0.5, "temprature": 1.0}, r"unknown sampling settings \['temprature'\]"),
        ({"temperature": 1.0}, "lack 'lam'"),
        ({"lam": 0.5, "top_k": "5"}, "top_k must be an integer"),
    ],
)
def test_a_bad_flat_form_names_the_key(flat, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings.from_flat(flat)


def test_sampler_kwargs_are_what_product_sample_takes():
    from prodsample import product_sample

    settings = SamplingSettings(lam=0.5, temperature=0.0, top_k=1)
    plain, guide = torch.randn(3, 9), torch.randn(3, 9)
    out = product_sample(plain, guide, settings.lam, **settings.sampler_kwargs(), seed=0, positions=0)
    assert torch.equal(out.token_ids, (plain.log_softmax(-1) + guide.log_softmax(-1)).argmax(-1))


def test_a_guided_prefix_travels_in_the_flat_form_only_when_set():
    """The tag carries guide_prefix_tokens when it is not 0, and leaves it out at 0 (tags as before)."""
    with_prefix = SamplingSettings(lam=0.5, guide_prefix_tokens=2)
    assert with_prefix.to_flat()["guide_prefix_tokens"] == 2
    assert SamplingSettings.from_flat(with_prefix.to_flat()) == with_prefix.draw_settings()
    assert "guide_prefix_tokens" not in SamplingSettings(lam=0.5).to_flat()
    assert with_prefix.lam_at(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1, 2, 0])).tolist() == [0.0, 0.5, 1.0]
