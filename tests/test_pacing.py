"""The pacing driver against a fake engine: admission within the engine's limits, pairs admitted whole,
stepping to the end, partners that finish early or vanish, errors, and the outcome/stats read-out."""

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest

from prodsample.vllm.pacing import (
    AdmitAll,
    EngineLimits,
    EngineRequest,
    FinishedRequest,
    GenerationStats,
    PacedDriver,
    RolloutRequests,
    settle,
    warn_record_losses,
)
from prodsample.vllm.pairing import DesyncCause, GuidanceTag, Role, RolloutRecord
from prodsample.settings import SamplingSettings

EOS = 2
ROOMY = dict(max_num_seqs=64, max_num_batched_tokens=4096, kv_blocks=4096, block_size=16)


def rollout(index: int, *, lam=0.5, prompt_len=4, max_new_tokens=3, hint_len=2) -> RolloutRequests:
    """Rollout `index` of one call: (guide, plain) for λ < 1, the guide prompt `hint_len` tokens longer."""
    roles = [Role.GUIDE, Role.PLAIN] if lam < 1 else [Role.PLAIN]
    return RolloutRequests(tuple(
        EngineRequest(
            [7] * (prompt_len + (hint_len if role is Role.GUIDE else 0)),
            max_new_tokens,
            GuidanceTag(rollout=f"call-{index}", role=role, rollout_index=index, seed=0, release_token=EOS,
                        settings=SamplingSettings(lam=lam)),
        )
        for role in roles
    ))


@dataclass
class Step:
    added: list[str]  # request ids added before this step
    running: set[str]  # request ids this step ran
    scheduled_tokens: int  # prefill tokens of the added requests + one decode token per other running request
    blocks: int  # KV blocks the running requests hold at full length


class FakeEngine:
    """A stepped engine in miniature. A request added before a step is prefilled whole in that step and
    emits its first token; every running request emits one token per step; a request finishes after its
    tag's release token or at max_new_tokens. It never enforces its limits: it logs every step (`log`), and
    the tests check the log against the limits.

    tokens: request id → the tokens it emits (default 100, 101, ...; the same for both requests of a pair).
    finish_at: request id → the step at which the engine ends it early, reporting the tokens it has (an abort).
    drop_at: request id → the step at which it vanishes without being reported (aborted from outside).
    fail_at / fail_add: a step number at which `step` raises / a request id whose `add_request` raises.
    """

    def __init__(self, limits=None, *, tokens=None, finish_at=None, drop_at=None, fail_at=None, fail_add=None):
        self._limits = EngineLimits(**(limits or ROOMY))
        self.tokens = tokens or {}
        self.finish_at, self.drop_at = finish_at or {}, drop_at or {}
        self.fail_at, self.fail_add = fail_at, fail_add
        self.pending: list[EngineRequest] = []
        self.running: dict[str, tuple[EngineRequest, list[int]]] = {}
        self.log: list[Step] = []
        self.aborted: list[str] = []

    def limits(self) -> EngineLimits:
        return self._limits

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id == self.fail_add:
            raise ValueError(f"the engine rejects {request.request_id}")
        self.pending.append(request)

    def step(self) -> list[FinishedRequest]:
        number = len(self.log) + 1
        assert number <= 1000, "the driver keeps stepping an engine that has nothing left to run"
        if number == self.fail_at:
            raise RuntimeError("engine failure")
        added, self.pending = self.pending, []
        scheduled = sum(len(r.prompt_token_ids) for r in added) + len(self.running)
        self.running.update({r.request_id: (r, []) for r in added})
        blocks = sum(self._limits.blocks(len(r.prompt_token_ids), r.max_new_tokens) for r, _ in self.running.values())
        self.log.append(Step([r.request_id for r in added], set(self.running), scheduled, blocks))
        finished = []
        for request_id, (request, output) in list(self.running.items()):
            if self.drop_at.get(request_id) == number:
                del self.running[request_id]
                continue
            output.append(self.tokens.get(request_id, range(100, 10**6))[len(output)])
            ended = output[-1] == request.tag.release_token or len(output) == request.max_new_tokens
            if ended or self.finish_at.get(request_id) == number:
                finished.append(FinishedRequest(request_id, tuple(output)))
                del self.running[request_id]
        return finished

    def abort(self, request_ids) -> None:
        self.aborted.extend(request_ids)
        self.pending = [r for r in self.pending if r.request_id not in request_ids]
        for request_id in request_ids:
            self.running.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending or self.running)


def entered_at(log: list[Step]) -> dict[str, int]:
    """Request id → the step it was added before."""
    return {request_id: number for number, step in enumerate(log, 1) for request_id in step.added}


def assert_pairs_whole_and_within(log: list[Step], rollouts, limits: dict) -> None:
    entered = entered_at(log)
    for r in rollouts:
        assert len({entered[request.request_id] for request in r.requests}) == 1, f"{r.name} entered whole"
    for step in log:
        assert len(step.running) <= limits["max_num_seqs"]
        assert step.scheduled_tokens <= limits["max_num_batched_tokens"]
        assert step.blocks <= limits["kv_blocks"]


# -- admission ---------------------------------------------------------------------------------------------


def test_pairs_are_admitted_whole_within_the_sequence_limit():
    limits = ROOMY | dict(max_num_seqs=5)  # two pairs (4 requests), never a third pair's half
    rollouts = [rollout(i) for i in range(6)]
    engine = FakeEngine(limits)
    result = PacedDriver().run(engine, rollouts)
    assert_pairs_whole_and_within(engine.log, rollouts, limits)
    assert [sorted(step.added) for step in engine.log if step.added] == [
        sorted(r.request_id for k in pair for r in rollouts[k].requests) for pair in ((0, 1), (2, 3), (4, 5))
    ]
    assert result.engine_steps == len(engine.log) == 9  # three waves of three tokens
    assert result.completions == {request.request_id: [100, 101, 102] for r in rollouts for request in r.requests}


def test_admission_keeps_the_order_of_pairs_and_single_requests():
    limits = ROOMY | dict(max_num_seqs=5)
    rollouts = [rollout(0), rollout(1), rollout(2), rollout(3, lam=1.0)]
    engine = FakeEngine(limits)
    PacedDriver().run(engine, rollouts)
    assert_pairs_whole_and_within(engine.log, rollouts, limits)
    entered = entered_at(engine.log)
    # in order: pair 0 and pair 1 fill 4 of 5 seats; pair 2 waits, and so does the λ = 1 rollout behind it
    assert [entered[r.plain.request_id] for r in rollouts] == [1, 1, 4, 4]


def test_admission_is_limited_by_kv_blocks():
    # guide 6 + 4 new tokens = 3 blocks of 4, plain 4 + 4 = 2 blocks: a pair holds 5
    limits = ROOMY | dict(kv_blocks=11, block_size=4)
    rollouts = [rollout(i, max_new_tokens=4) for i in range(5)]
    engine = FakeEngine(limits)
    PacedDriver().run(engine, rollouts)
    assert_pairs_whole_and_within(engine.log, rollouts, limits)
    assert max(len(step.running) for step in engine.log) == 4, "two pairs (10 blocks) at once, never three"
    assert [entered_at(engine.log)[r.plain.request_id] for r in rollouts] == [1, 1, 5, 5, 9]


def test_a_running_pair_counts_its_blocks_once():
    # the pair: guide 6 + 8 new tokens = 4 blocks of 4, plain 4 + 8 = 3; each λ = 1 rollout: 4 + 2 = 2 blocks
    limits = ROOMY | dict(kv_blocks=10, block_size=4)
    rollouts = [rollout(0, max_new_tokens=8), *(rollout(i, lam=1.0, max_new_tokens=2) for i in (1, 2))]
    engine = FakeEngine(limits)
    PacedDriver().run(engine, rollouts)
    assert_pairs_whole_and_within(engine.log, rollouts, limits)
    # rollout 2 takes the blocks rollout 1 freed while the pair (7 blocks) still runs
    assert [entered_at(engine.log)[r.plain.request_id] for r in rollouts] == [1, 1, 3]


def test_admission_is_limited_by_the_prefill_budget_and_the_running_decodes():
    # a pair prefills 10 + 12 = 22 tokens; the budget takes one pair's prefill beside one running pair's
    # decodes (2 tokens), not beside two (4)
    limits = ROOMY | dict(max_num_batched_tokens=25)
    rollouts = [rollout(i, prompt_len=10, max_new_tokens=6) for i in range(4)]
    engine = FakeEngine(limits)
    PacedDriver().run(engine, rollouts)
    assert_pairs_whole_and_within(engine.log, rollouts, limits)
    assert [entered_at(engine.log)[r.plain.request_id] for r in rollouts] == [1, 2, 7, 8]
    assert [step.scheduled_tokens for step in engine.log[:3]] == [22, 24, 4]


def test_a_rollout_too_big_for_the_prefill_budget_enters_an_empty_engine_alone():
    limits = ROOMY | dict(max_num_batched_tokens=16)
    rollouts = [rollout(0, prompt_len=2), rollout(1, prompt_len=20), rollout(2, prompt_len=2)]
    engine = FakeEngine(limits)
    result = PacedDriver().run(engine, rollouts)
    entered = entered_at(engine.log)
    # rollout 1 (42 prompt tokens) waits for rollout 0 to finish, prefills alone, then decodes beside rollout 2
    assert [entered[r.plain.request_id] for r in rollouts] == [1, 4, 5]
    assert engine.log[3].running == {r.request_id for r in rollouts[1].requests}
    assert engine.log[3].scheduled_tokens == 42
    assert len(result.completions) == 6


def test_admit_all_adds_every_rollout_before_the_first_step():
    """`AdmitAll` (a custom admission) leaves the pacing to the engine: here the fake engine runs all at once."""
    rollouts = [rollout(i) for i in range(4)] + [rollout(4, lam=1.0)]
    engine = FakeEngine(ROOMY | dict(max_num_seqs=2))
    result = AdmitAll().run(engine, rollouts)
    assert len(engine.log[0].added) == 9 and result.engine_steps == 3 and len(result.completions) == 9


def test_admit_all_refuses_a_pair_one_step_cannot_prefill_before_adding_anything():
    limits = ROOMY | dict(max_num_batched_tokens=16)
    engine = FakeEngine(limits)
    with pytest.raises(ValueError, match=r"rollout 'call-1' .* hold 22 tokens, more .*max_num_batched_tokens = 16"):
        AdmitAll().run(engine, [rollout(0, prompt_len=2), rollout(1, prompt_len=10), rollout(2, prompt_len=12)])
    assert engine.log == [] and engine.pending == []
    single = rollout(3, lam=1.0, prompt_len=20)  # one request: the engine may cut its prompt, no pair to split
    assert len(AdmitAll().run(engine, [single]).completions) == 1


@pytest.mark.parametrize("chosen", [-1, 5])
def test_an_admission_that_chooses_impossibly_is_refused(chosen):
    class Broken(PacedDriver):
        def admit(self, waiting, running, limits):
            return chosen

    engine = FakeEngine()
    with pytest.raises(RuntimeError, match=f"Broken.admit chose {chosen} of 2 waiting"):
        Broken().run(engine, [rollout(0), rollout(1)])
    assert engine.log == []


def test_an_admission_that_leaves_an_idle_engine_idle_is_refused():
    class Stuck(PacedDriver):
        def admit(self, waiting, running, limits):
            return 0

    with pytest.raises(RuntimeError, match="at least one when nothing runs"):
        Stuck().run(FakeEngine(), [rollout(0)])


# -- stepping and finishing ----------------------------------------------------------------------------------


def test_every_request_runs_to_its_release_token_or_max_new_tokens():
    rollouts = [rollout(0, max_new_tokens=5), rollout(1, max_new_tokens=5), rollout(2, lam=1.0, max_new_tokens=2)]
    stops_early = [100, 101, EOS, 103, 104]
    tokens = {request.request_id: stops_early for request in rollouts[1].requests}
    engine = FakeEngine(tokens=tokens)
    result = PacedDriver().run(engine, rollouts)
    assert result.completions == {
        "prodsample-call-0-guide": [100, 101, 102, 103, 104],
        "prodsample-call-0-plain": [100, 101, 102, 103, 104],
        "prodsample-call-1-guide": [100, 101, EOS],
        "prodsample-call-1-plain": [100, 101, EOS],
        "prodsample-call-2-plain": [100, 101],
    }
    assert result.engine_steps == 5
    assert not engine.running and not engine.aborted


def test_a_pair_whose_guide_finishes_early_runs_on_and_keeps_its_blocks():
    # the pairing releases a guide that lost its pair (forced EOS); the plain request runs on
    limits = ROOMY | dict(kv_blocks=5, block_size=4)  # one pair (5 blocks) at a time
    first, second = rollout(0, max_new_tokens=4), rollout(1, max_new_tokens=4)
    engine = FakeEngine(limits, tokens={"prodsample-call-0-guide": [EOS]})
    result = PacedDriver().run(engine, [first, second])
    assert result.completions["prodsample-call-0-guide"] == [EOS]
    assert result.completions["prodsample-call-0-plain"] == [100, 101, 102, 103]
    # the second pair waits for the first rollout's last request, not its first
    assert entered_at(engine.log)["prodsample-call-1-plain"] == 5
    assert engine.log[1].running == {"prodsample-call-0-plain"}


def test_a_partner_the_engine_aborts_is_reported_with_the_tokens_it_has():
    engine = FakeEngine(finish_at={"prodsample-call-0-guide": 2})
    result = PacedDriver().run(engine, [rollout(0, max_new_tokens=4)])
    assert result.completions == {
        "prodsample-call-0-guide": [100, 101], "prodsample-call-0-plain": [100, 101, 102, 103]
    }


def test_a_request_dropped_by_the_engine_raises_instead_of_waiting_forever():
    rollouts = [rollout(0, max_new_tokens=4), rollout(1, max_new_tokens=4), rollout(2)]
    engine = FakeEngine(ROOMY | dict(max_num_seqs=4), drop_at={"prodsample-call-0-guide": 2})
    with pytest.raises(RuntimeError, match=r"dropped \['prodsample-call-0-guide'\]"):
        PacedDriver().run(engine, [rollouts[0]])
    assert engine.aborted == ["prodsample-call-0-guide"]

    # with other requests still running, the partner's absence shows once those finish
    engine = FakeEngine(ROOMY | dict(max_num_seqs=4), drop_at={"prodsample-call-0-guide": 2})
    with pytest.raises(RuntimeError, match="without finishing them"):
        PacedDriver().run(engine, rollouts)
    started = {request_id for step in engine.log for request_id in step.added}
    assert "prodsample-call-2-plain" not in started, "waiting rollouts never start"


def test_an_engine_error_aborts_every_request_in_flight():
    rollouts = [rollout(i, max_new_tokens=4) for i in range(3)]
    engine = FakeEngine(ROOMY | dict(max_num_seqs=4), fail_at=2)
    with pytest.raises(RuntimeError, match="engine failure"):
        PacedDriver().run(engine, rollouts)
    assert sorted(engine.aborted) == sorted(r.request_id for k in (0, 1) for r in rollouts[k].requests)
    assert not engine.running


def test_a_rejected_request_aborts_the_half_added_pair():
    engine = FakeEngine(fail_add="prodsample-call-0-plain")
    with pytest.raises(ValueError, match="rejects"):
        PacedDriver().run(engine, [rollout(0)])
    assert "prodsample-call-0-guide" in engine.aborted and not engine.pending


# -- outcomes and stats ------------------------------------------------------------------------------------


def record(tokens, cause=None) -> RolloutRecord:
    n = len(tokens)
    return RolloutRecord(list(tokens), [-1.0] * n, [-1.5] * n, [-0.5] * n, None if cause is None else 0, cause)


def test_outcomes_and_stats_count_every_desync_by_cause():
    rollouts = [rollout(i) for i in range(4)] + [rollout(4, lam=1.0)]
    same, other = [100, 101, 102], [100, 9, 9]
    completions = {r.request_id: same for ro in rollouts for r in ro.requests}
    completions["prodsample-call-2-guide"] = other  # no cause recorded, outputs differ
    completions["prodsample-call-3-guide"] = [100, EOS]  # released guide: the recorded cause stands
    records = {f"call-{i}": record(same) for i in range(5)}
    records["call-1"] = record(same, DesyncCause.OUT_OF_STEP.value)
    records["call-3"] = record(same, DesyncCause.PARTNER_ABSENT.value)
    outcomes = settle(rollouts, completions, records)
    assert [o.cause for o in outcomes] == [None, "out_of_step", "outputs_differ", "partner_absent", None]
    assert [o.desynced for o in outcomes] == [False, True, True, True, False]
    assert [o.paired for o in outcomes] == [True, True, True, True, False]
    assert all(o.completion == same for o in outcomes)
    stats = GenerationStats.of(outcomes, engine_steps=7)
    assert (stats.rollouts, stats.paired, stats.desynced, stats.engine_steps) == (5, 4, 3, 7)
    assert stats.causes == {"out_of_step": 1, "outputs_differ": 1, "partner_absent": 1}
    assert stats.desync_rate == pytest.approx(3 / 4)
    assert GenerationStats.of(settle(rollouts[4:], completions, records), 1).desync_rate == 0.0


def test_settle_flags_a_rollout_whose_records_are_lost_and_leaves_the_others():
    """No record, one the TTL evicted while the rollout ran, or one with other tokens than the engine returned:
    that rollout keeps its completion, is flagged with the cause and has log-probs 0 as at padding, never NaN
    (its log q is unknown; a NaN would poison a whole batch's loss through the mask); a missing completion is
    still an error (the driver's)."""
    rollouts = [rollout(0), rollout(1), rollout(2), rollout(3)]
    completions = {r.request_id: [100, 101] for ro in rollouts for r in ro.requests}
    evicted = RolloutRecord([101], [-1.0], [-1.0], [math.nan], 0, DesyncCause.RECORD_EVICTED.value)
    records = {"call-0": record([100, 101]), "call-2": evicted, "call-3": record([100, 55])}
    outcomes = settle(rollouts, completions, records)
    assert [o.cause for o in outcomes] == [None, "record_missing", "record_evicted", "record_mismatch"]
    assert outcomes[0].record == records["call-0"]
    assert [o.records_lost for o in outcomes] == [False, True, True, True]
    for outcome in outcomes[1:]:
        assert outcome.desynced and outcome.completion == [100, 101] and outcome.record.lost_at == 0
        assert [getattr(outcome.record, name) for name in ("logprobs", "plain_logprobs", "guide_logprobs")] == [[0.0, 0.0]] * 3
    with pytest.warns(UserWarning, match="3 of 4 rollouts came back without their records.*masked out of the loss.*"
                                         "raise record_ttl_s"):
        warn_record_losses(outcomes)
    with pytest.raises(RuntimeError, match="no completion for request 'prodsample-call-0-plain'"):
        settle(rollouts[:1], {}, {"call-0": record([100, 101])})


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size"])
@pytest.mark.parametrize("value", [0, None, 2.0, True])
def test_engine_limits_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"EngineLimits.{name} must be a positive integer, got {value!r}"):
        EngineLimits(**ROOMY | {name: value})


def test_bad_requests_and_rollouts_are_refused():
    plain, guide = rollout(0).plain, rollout(0).guide
    with pytest.raises(ValueError, match="prodsample-call-0-plain: prompt_token_ids is empty"):
        EngineRequest([], 4, plain.tag)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        EngineRequest([1], 0, plain.tag)
    with pytest.raises(ValueError, match=r"roles \['guide', 'plain'\] in this order, got \['plain', 'guide'\]"):
        RolloutRequests((plain, guide))
    with pytest.raises(ValueError, match=r"lam = 0.5 needs requests with roles \['guide', 'plain'\].*got \['plain'\]"):
        RolloutRequests((plain,))
    with pytest.raises(ValueError, match=r"lam = 1.0 needs requests with roles \['plain'\]"):
        RolloutRequests((rollout(1, lam=1.0).plain, rollout(1, lam=1.0).plain))
    with pytest.raises(ValueError, match="got no requests"):
        RolloutRequests(())
    with pytest.raises(ValueError, match="differ in more than role and prompt"):
        RolloutRequests((rollout(1).guide, plain))  # another rollout's guide
    with pytest.raises(ValueError, match="differ in more than role and prompt"):
        RolloutRequests((EngineRequest(guide.prompt_token_ids, 9, guide.tag), plain))


def test_rollouts_with_the_same_name_are_refused_before_reaching_the_engine():
    engine = FakeEngine()
    with pytest.raises(ValueError, match=r"distinct names.*\['call-0'\] repeated"):
        PacedDriver().run(engine, [rollout(0), rollout(1), rollout(0)])
    assert engine.log == [] and not engine.pending


@pytest.mark.slow  # a fresh process imports torch
def test_the_driver_module_imports_no_engine():
    code = "import sys, prodsample.vllm.pacing; print(sorted({'vllm', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
