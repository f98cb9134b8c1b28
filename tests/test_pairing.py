"""The pairing logic on fabricated batches: no engine, a few lines of fake runner.

`FakeRunner` plays an engine's part the way vLLM's runners do: each step it builds logits rows for the
requests it schedules, lets the sampler force tokens, then samples each row greedily (a forced row can
only yield the forced token) and keeps the token unless the row was still mid-prefill. V1-style views
know nothing in advance (`produces=None`); V2-style views say which rows are mid-prefill.
"""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prodsample.vllm.pairing import (
    EXTRA_ARGS_KEY,
    DesyncCause,
    GuidanceTag,
    PairedSampler,
    RequestKey,
    Role,
    RowView,
    records_from_workers,
)
from prodsample.sampling import product_sample
from prodsample.settings import SamplingSettings

VOCAB = 11
SEED = 1234
RELEASE = 0


def tag(rollout: str, role: Role, *, index: int = 0, lam: float = 0.5, temperature: float = 1.0, **filters):
    return GuidanceTag(rollout, role, index, SEED, RELEASE, SamplingSettings(lam, temperature, **filters))


class FakeRunner:
    def __init__(self, *, v2: bool = False, sampler: PairedSampler | None = None):
        self.sampler = PairedSampler(backend="reference") if sampler is None else sampler
        self.outputs: dict[RequestKey, list[int]] = {}
        self.logits_seen: list[dict[RequestKey, torch.Tensor]] = []
        self.v2 = v2
        self.generator = torch.Generator().manual_seed(0)

    def add(self, *tags: GuidanceTag) -> None:
        for t in tags:
            key = self.sampler.admit(t)
            self.outputs.setdefault(key, [])

    def step(self, scheduled: list[RequestKey], mid_prefill=(), untagged: int = 0) -> torch.Tensor:
        """One engine step over `scheduled` (+ `untagged` rows at the end); returns the processed logits."""
        rows = len(scheduled) + untagged
        logits = torch.randn(rows, VOCAB, generator=self.generator) * 3
        self.logits_seen.append({key: logits[i].clone() for i, key in enumerate(scheduled)})
        views = []
        for i, key in enumerate(scheduled):
            out = self.outputs[key]
            produces = (key not in mid_prefill) if self.v2 else None
            views.append(RowView(i, key, len(out), produces, out[-1] if out else None))
        processed = self.sampler.step(logits.clone(), views)
        for i, key in enumerate(scheduled):
            if key not in mid_prefill:
                self.outputs[key].append(int(processed[i].argmax()))
        return processed


def keys(name: str) -> tuple[RequestKey, RequestKey]:
    return RequestKey(name, Role.PLAIN), RequestKey(name, Role.GUIDE)


def test_pair_in_step_draws_jointly_with_keyed_noise_and_forces_both_rows():
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE, index=3, lam=0.3), tag("a", Role.PLAIN, index=3, lam=0.3))
    plain, guide = keys("a")
    for _ in range(5):
        processed = runner.step([guide, plain], untagged=1)
        assert torch.isfinite(processed[:2]).sum(dim=1).tolist() == [1, 1]
        assert processed[0].argmax() == processed[1].argmax()
        assert torch.isfinite(processed[2]).all(), "an untagged row is left alone"
    record = runner.sampler.take(["a"])["a"]
    assert record.lost_at is None and record.cause is None
    assert record.tokens == runner.outputs[plain] == runner.outputs[guide]
    for t, seen in enumerate(runner.logits_seen):
        expected = product_sample(
            seen[plain][None], seen[guide][None], 0.3, seed=SEED, rollout_ids=3, positions=torch.tensor([t]),
            backend="reference",
        )
        assert record.tokens[t] == int(expected.token_ids)
        assert record.logprobs[t] == pytest.approx(float(expected.logprobs), abs=1e-6)
        assert record.plain_logprobs[t] == pytest.approx(float(expected.plain_logprobs), abs=1e-6)
        assert record.guide_logprobs[t] == pytest.approx(float(expected.guide_logprobs), abs=1e-6)
    assert len(runner.sampler) == 0, "take forgets the rollout"


def test_filters_and_greedy_reach_the_sampler():
    runner = FakeRunner()
    runner.add(tag("g", Role.GUIDE, temperature=0.0), tag("g", Role.PLAIN, temperature=0.0))
    runner.add(tag("k", Role.GUIDE, index=1, top_k=2, top_p=0.9), tag("k", Role.PLAIN, index=1, top_k=2, top_p=0.9))
    order = [*keys("g"), *keys("k")]
    for _ in range(3):
        runner.step(order)
    records = runner.sampler.take(["g", "k"])
    for t, seen in enumerate(runner.logits_seen):
        greedy = (0.5 * torch.log_softmax(seen[order[0]], -1) + 0.5 * torch.log_softmax(seen[order[1]], -1)).argmax()
        assert records["g"].tokens[t] == int(greedy) and records["g"].logprobs[t] == 0.0
        mixed = 0.5 * torch.log_softmax(seen[order[2]], -1) + 0.5 * torch.log_softmax(seen[order[3]], -1)
        assert records["k"].tokens[t] in mixed.topk(2).indices.tolist()


def test_lambda_one_rollout_runs_alone_on_policy_and_is_never_lost():
    runner = FakeRunner()
    runner.add(tag("solo", Role.PLAIN, lam=1.0))
    plain = RequestKey("solo", Role.PLAIN)
    for _ in range(4):
        runner.step([plain])
    record = runner.sampler.take(["solo"])["solo"]
    assert record.lost_at is None and record.cause is None
    assert record.guide_logprobs == record.plain_logprobs, "no guide context: as in prodsample.hf"
    for t, seen in enumerate(runner.logits_seen):
        expected = product_sample(
            seen[plain][None], seen[plain][None], 1.0, seed=SEED, rollout_ids=0, positions=torch.tensor([t]),
            backend="reference",
        )
        assert record.tokens[t] == int(expected.token_ids)
        assert record.logprobs[t] == pytest.approx(float(expected.logprobs), abs=1e-6)


def test_partner_admitted_late_loses_the_pair_at_zero_and_the_plain_row_goes_on_policy():
    runner = FakeRunner()
    runner.add(tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([plain])  # the guide request is not in the batch yet
    runner.add(tag("a", Role.GUIDE))
    processed = runner.step([guide, plain])
    assert int(processed[0].argmax()) == RELEASE, "the orphaned guide row is released"
    runner.step([plain])
    record = runner.sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (0, DesyncCause.PARTNER_ABSENT.value)
    assert all(math.isnan(g) for g in record.guide_logprobs)
    for t, seen in enumerate(runner.logits_seen):
        solo = product_sample(
            seen[plain][None], seen[plain][None], 1.0, seed=SEED, rollout_ids=0, positions=torch.tensor([t]),
            backend="reference",
        )
        assert record.logprobs[t] == pytest.approx(float(solo.logprobs), abs=1e-6)


def test_a_solo_draw_that_is_discarded_does_not_lose_the_pair():
    runner = FakeRunner()
    runner.add(tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([plain], mid_prefill={plain})  # alone, but mid-prefill: its token is thrown away
    runner.add(tag("a", Role.GUIDE))
    for _ in range(3):
        runner.step([guide, plain])
    record = runner.sampler.take(["a"])["a"]
    assert record.lost_at is None
    assert record.tokens == runner.outputs[plain] == runner.outputs[guide]


def test_guide_mid_prefill_found_after_the_fact():
    """V1 cannot tell a row mid-prefill in advance: the joint draw at 0 used a guide row whose context was
    incomplete, and the plain row kept it. Seen next step (guide still at 0): lost at 0."""
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain], mid_prefill={guide})
    runner.step([guide, plain])
    runner.step([plain])
    record = runner.sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (0, DesyncCause.GUIDE_MID_PREFILL.value)
    assert all(math.isnan(g) for g in record.guide_logprobs)
    assert record.tokens == runner.outputs[plain]
    # the token at 0 came from q with the half-prefilled guide row's logits: log q is that draw's, not π's
    seen = runner.logits_seen[0]
    joint = product_sample(seen[plain][None], seen[guide][None], 0.5, seed=SEED, rollout_ids=0,
                           positions=torch.tensor([0]), backend="reference")
    assert record.tokens[0] == int(joint.token_ids)
    assert record.logprobs[0] == pytest.approx(float(joint.logprobs), abs=1e-6)
    assert record.plain_logprobs[0] == pytest.approx(float(joint.plain_logprobs), abs=1e-6)


def test_plain_mid_prefill_found_after_the_fact_and_redrawn_solo():
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain], mid_prefill={plain})
    runner.step([guide, plain])  # plain at 0 again, guide at 1
    record = runner.sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (0, DesyncCause.PLAIN_MID_PREFILL.value)
    seen = runner.logits_seen[1][plain]
    solo = product_sample(seen[None], seen[None], 1.0, seed=SEED, rollout_ids=0, positions=torch.tensor([0]), backend="reference")
    assert record.tokens == runner.outputs[plain] == [int(solo.token_ids)]
    assert record.logprobs[0] == pytest.approx(float(solo.logprobs), abs=1e-6)


def test_both_rows_mid_prefill_stay_in_step():
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain], mid_prefill={guide, plain})
    runner.step([guide, plain], mid_prefill={guide, plain})
    for _ in range(3):
        runner.step([guide, plain])
    record = runner.sampler.take(["a"])["a"]
    assert record.lost_at is None and len(record.tokens) == 3
    assert record.tokens == runner.outputs[guide]


def test_v2_knows_mid_prefill_in_advance_and_never_draws_with_it():
    runner = FakeRunner(v2=True)
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    runner.add(tag("b", Role.GUIDE, index=1), tag("b", Role.PLAIN, index=1))
    a_plain, a_guide = keys("a")
    b_plain, b_guide = keys("b")
    processed = runner.step([a_guide, a_plain, b_guide, b_plain], mid_prefill={a_guide, b_guide, b_plain})
    assert torch.isfinite(processed[0]).all() and torch.isfinite(processed[2:]).all(), "mid-prefill rows untouched"
    runner.step([a_guide, a_plain, b_guide, b_plain])
    records = runner.sampler.take(["a", "b"])
    assert (records["a"].lost_at, records["a"].cause) == (0, DesyncCause.PARTNER_MID_PREFILL.value)
    assert records["b"].lost_at is None, "both mid-prefill, then both ready: still in step"
    assert all(math.isnan(g) for g in records["a"].guide_logprobs)
    assert not math.isnan(records["b"].guide_logprobs[0])


def test_preemption_of_both_keeps_the_pair_but_of_one_loses_it():
    runner = FakeRunner()
    runner.add(tag("both", Role.GUIDE), tag("both", Role.PLAIN))
    runner.add(tag("one", Role.GUIDE, index=1), tag("one", Role.PLAIN, index=1))
    both_plain, both_guide = keys("both")
    one_plain, one_guide = keys("one")
    runner.step([both_guide, both_plain, one_guide, one_plain])
    runner.step([one_plain])  # "both" preempted together, "one" lost its guide row
    # back after preemption: re-admitted, then re-prefilled in chunks (discarded), then decoding
    runner.add(tag("both", Role.GUIDE), tag("both", Role.PLAIN), tag("one", Role.GUIDE, index=1))
    runner.step([both_guide, both_plain, one_guide, one_plain], mid_prefill={both_guide, both_plain, one_guide})
    runner.step([both_guide, both_plain, one_guide, one_plain])
    records = runner.sampler.take(["both", "one"])
    assert records["both"].lost_at is None
    assert records["both"].tokens == runner.outputs[both_guide]
    assert (records["one"].lost_at, records["one"].cause) == (1, DesyncCause.PARTNER_ABSENT.value)


def test_out_of_step_rows_are_split_and_the_guide_released():
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain])
    runner.step([plain])  # the guide row skipped a step
    processed = runner.step([guide, plain])
    assert int(processed[0].argmax()) == RELEASE
    record = runner.sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (1, DesyncCause.PARTNER_ABSENT.value)
    assert not math.isnan(record.guide_logprobs[0]) and math.isnan(record.guide_logprobs[1])


def test_a_token_the_engine_replaced_loses_the_pair():
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain])
    runner.outputs[plain][-1] = (runner.outputs[plain][-1] + 1) % VOCAB  # something after us changed the token
    runner.step([guide, plain])
    record = runner.sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (0, DesyncCause.TOKEN_OVERRIDDEN.value)


def test_take_leaves_out_unknown_rollouts_and_rows_of_taken_ones_are_left_alone():
    assert PairedSampler().take(["never-seen"]) == {}
    runner = FakeRunner()
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain])
    runner.sampler.take(["a"])  # read out while its requests are still in the batch (an abort)
    processed = runner.step([guide, plain])
    assert torch.isfinite(processed).all()


def test_rollouts_no_step_has_seen_for_the_ttl_are_forgotten():
    """A server whose clients never take their records forgets them; the rows of a forgotten rollout that is
    still in the batch are left alone (its records are gone: read-out finds none, and settle flags it)."""
    now = [0.0]
    runner = FakeRunner(sampler=PairedSampler(backend="reference", record_ttl_s=10.0, clock=lambda: now[0]))
    runner.add(tag("old", Role.GUIDE), tag("old", Role.PLAIN), tag("new", Role.GUIDE), tag("new", Role.PLAIN))
    old_plain, old_guide = keys("old")
    new_plain, new_guide = keys("new")
    runner.step([old_guide, old_plain, new_guide, new_plain])
    now[0] = 5.0
    runner.step([new_guide, new_plain])
    now[0] = 10.0
    runner.step([new_guide, new_plain])
    assert len(runner.sampler) == 2, "10 s idle is not more than the ttl"
    now[0] = 11.0  # the next sweep (at most one a second)
    processed = runner.step([old_guide, old_plain, new_guide, new_plain])
    assert len(runner.sampler) == 1 and torch.isfinite(processed[:2]).all(), "old is forgotten, its rows untouched"
    assert set(runner.sampler.take(["old", "new"])) == {"new"}


def test_tag_round_trips_through_flat_extra_args():
    t = tag("r-7", Role.GUIDE, index=7, lam=0.25, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
    extra = t.to_extra_args()
    assert extra == {
        "prodsample.rollout": "r-7", "prodsample.role": "guide", "prodsample.rollout_index": 7,
        "prodsample.seed": SEED, "prodsample.release_token": RELEASE, "prodsample.lam": 0.25,
        "prodsample.temperature": 0.7, "prodsample.top_k": 5, "prodsample.top_p": 0.9, "prodsample.min_p": 0.05,
    }
    assert GuidanceTag.from_extra_args(extra) == t
    assert GuidanceTag.from_extra_args(extra | {"other": 1}) == t  # other extensions' keys are left alone
    assert GuidanceTag.from_extra_args(None) is None
    assert GuidanceTag.from_extra_args({"other": 1}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lam": 1.5}, "lam must lie in"),
        ({"lam": [0.5, 0.5]}, "the λ of one rollout"),
        ({"temperature": -1.0}, "temperature must lie in"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0.0}, "top_p must lie in"),
        ({"top_k": -2}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"rollout_index": 1.5}, "rollout_index must be an integer in"),
        ({"role": "critic"}, "role must be 'plain' or 'guide'"),
        ({"lam": 1.0}, "a guide request needs lam < 1"),
        ({"num_generations": 2}, "unknown fields"),
        ({"colour": "red"}, r"unknown fields \['prodsample.colour'\]"),
    ],
)
def test_malformed_tags_raise_naming_the_field(change, message):
    extra = tag("r", Role.GUIDE).to_extra_args() | {f"{EXTRA_ARGS_KEY}.{name}": value for name, value in change.items()}
    with pytest.raises(ValueError, match=message):
        GuidanceTag.from_extra_args(extra)


def test_a_tag_missing_fields_raises():
    with pytest.raises(ValueError, match=r"lacks \['prodsample.lam', 'prodsample.release_token'"):
        GuidanceTag.from_extra_args({"prodsample.rollout": "r", "prodsample.role": "plain"})


def test_a_nested_tag_is_refused_not_ignored():
    nested = {EXTRA_ARGS_KEY: {"rollout": "r", "role": "plain"}}
    with pytest.raises(ValueError, match="a prodsample tag is flat"):
        GuidanceTag.from_extra_args(nested)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 2**70}, r"top_k must be below 2\*\*63"),
        ({"rollout": "r" * 257}, "prodsample rollout must be a string of 1 to 256 characters"),
        ({"release_token": -1}, "prodsample release_token must be an integer in"),
        ({"seed": 2**63}, "prodsample seed must be an integer in"),
    ],
)
def test_tag_values_an_engine_tensor_cannot_hold_are_refused(change, message):
    extra = tag("r", Role.GUIDE).to_extra_args() | {f"{EXTRA_ARGS_KEY}.{name}": value for name, value in change.items()}
    with pytest.raises(ValueError, match=message):
        GuidanceTag.from_extra_args(extra)


def test_a_release_token_outside_the_vocabulary_does_not_fit_and_is_not_admitted(caplog):
    """The release token indexes the logits of a released guide row: past the vocabulary it would crash the
    engine's step (IndexError, a device-side assert on a GPU). The tag alone cannot know the vocabulary:
    `check_fits` does, and a sampler that knows its engine's never admits such a tag (the row is left alone)."""
    bad = GuidanceTag("r", Role.GUIDE, 0, SEED, VOCAB, SamplingSettings(0.5))
    with pytest.raises(ValueError, match=rf"prodsample.release_token must be a token id .* \[0, {VOCAB}\), got {VOCAB}"):
        bad.check_fits(VOCAB)
    tag("r", Role.GUIDE).check_fits(VOCAB)
    sampler = PairedSampler(backend="reference", vocab_size=VOCAB)
    assert sampler.admit(bad) is None and len(sampler) == 0
    assert "not admitted" in caplog.text and "release_token" in caplog.text
    logits = torch.randn(1, VOCAB)
    view = RowView(0, RequestKey("r", Role.GUIDE), 0, None, None)
    assert torch.equal(sampler.step(logits.clone(), [view]), logits), "an unknown row is left alone"


def test_the_record_ttl_runs_on_the_clock_and_an_evicted_rollout_that_resumes_is_flagged_on_policy():
    """`sweep` (every engine step, tagged rows or not) forgets a rollout idle past the TTL, e.g. a pair preempted
    that long. When it resumes it draws on-policy (the guide is released) and its record says `record_evicted`,
    so it comes back flagged, never guided, and never fails the call."""
    now = [0.0]
    sampler = PairedSampler(backend="reference", record_ttl_s=10.0, clock=lambda: now[0])
    runner = FakeRunner(sampler=sampler)
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))
    plain, guide = keys("a")
    runner.step([guide, plain])
    now[0] = 11.0
    sampler.sweep()  # a step without tagged rows: the pair is preempted
    assert len(sampler) == 0, "forgotten on the clock, with no tagged row stepped"
    runner.add(tag("a", Role.GUIDE), tag("a", Role.PLAIN))  # resumed
    processed = runner.step([guide, plain])
    assert int(processed[0].argmax()) == RELEASE, "the guide row is released: the pair is lost"
    record = sampler.take(["a"])["a"]
    assert (record.lost_at, record.cause) == (0, DesyncCause.RECORD_EVICTED.value)
    assert all(math.isnan(value) for value in record.guide_logprobs)


def test_records_from_workers_take_a_record_with_tokens_over_an_empty_one():
    empty, full = [[], [], [], [], None, None], [[5, 0], [-1.0, -2.0], [-1.0, -2.0], [-1.5, -2.5], None, None]
    assert records_from_workers([{"a": empty}, {"a": full}])["a"].tokens == [5, 0]
    assert records_from_workers([json.dumps({"a": full}), {"a": empty}])["a"].tokens == [5, 0]
    assert records_from_workers([{"a": empty}])["a"].tokens == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_tag_the_tag_checks_accept_makes_a_step_raise(data):
    """Property: any tag that `GuidanceTag.from_extra_args` and `check_fits` accept, in any mix of lone halves,
    pairs, rows mid-prefill, skipped steps and read-outs, steps without an exception and forces a token in the
    vocabulary (the engine lives on)."""
    sampler = PairedSampler(backend="reference", vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    outputs: dict[RequestKey, list[int]] = {}
    for step in range(data.draw(st.integers(1, 6))):
        for _ in range(data.draw(st.integers(0, 3))):
            fields = {
                "rollout": data.draw(st.sampled_from(["a", "b", "c"])),
                "role": data.draw(st.sampled_from(["plain", "guide"])),
                "rollout_index": data.draw(st.integers(0, 2**63 - 1)),
                "seed": data.draw(st.integers(-(2**63), 2**63 - 1)),
                "release_token": data.draw(st.integers(0, 2 * VOCAB)),
                "lam": data.draw(st.floats(0.0, 1.0)),
                # any float64 the settings accept, subnormal or huge: the draw holds them as float32
                "temperature": data.draw(st.one_of(st.floats(0.0, 2.0), st.floats(0.0, 1e308), st.just(math.inf))),
                "top_k": data.draw(st.integers(0, 2**63 - 1)),
                "top_p": data.draw(st.one_of(st.floats(0.0, 1.0), st.floats(0.0, 1e-40))),
                "min_p": data.draw(st.one_of(st.floats(0.0, 1.0), st.floats(0.0, 1e-40))),
                "guide_prefix_tokens": data.draw(st.integers(0, 2**63 - 1)),
            }
            try:
                new = GuidanceTag.from_extra_args({f"{EXTRA_ARGS_KEY}.{k}": v for k, v in fields.items()})
                new.check_fits(VOCAB)
            except ValueError:
                continue
            key = sampler.admit(new)
            outputs.setdefault(key, [])
        known = list(outputs)
        scheduled = data.draw(st.lists(st.sampled_from(known), unique=True)) if known else []
        mid_prefill = set(data.draw(st.lists(st.sampled_from(scheduled), unique=True))) if scheduled else set()
        logits = torch.randn(len(scheduled), VOCAB, generator=generator) * 3
        views = [RowView(i, key, len(outputs[key]), None, outputs[key][-1] if outputs[key] else None)
                 for i, key in enumerate(scheduled)]
        processed = sampler.step(logits, views)
        for i, key in enumerate(scheduled):
            token = int(processed[i].argmax())
            assert 0 <= token < VOCAB
            if key not in mid_prefill:
                outputs[key].append(token)
        if data.draw(st.booleans()):
            taken = sampler.take([data.draw(st.sampled_from(["a", "b", "c"]))])
            for name in taken:
                outputs = {key: out for key, out in outputs.items() if key.rollout != name}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_p": 1e-50}, r"top_p must lie in \(0, 1\], got 0.0 once held as float32"),
        ({"temperature": 1e39}, "prodsample temperature must be finite as float32"),
        ({"temperature": math.inf}, "prodsample temperature must be finite as float32"),
    ],
)
def test_tag_values_that_leave_their_range_as_float32_are_refused(change, message):
    """The engine's draw holds these as float32: top_p 1e-50 became 0 there and its check raised inside the
    engine's step, which killed it (found by the hostile-client test against a real server)."""
    extra = tag("r", Role.GUIDE).to_extra_args() | {f"{EXTRA_ARGS_KEY}.{name}": value for name, value in change.items()}
    with pytest.raises(ValueError, match=message):
        GuidanceTag.from_extra_args(extra)
