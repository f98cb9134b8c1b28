"""The pair-keeping scheduler on fabricated requests: vLLM's own `Request`s, scheduled by the scheduler
under a small real `VllmConfig` and `KVCacheManager`, with a fake model runner that samples one token per
request whose prefill is complete. Every admission, decoding, preemption, abort, refusal and timeout path;
where vLLM's stock scheduler splits a pair in the same situation, the test shows it does (so the test can
fail)."""

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from prodsample.testing import save_tiny  # noqa: E402
from prodsample.vllm.pairing import GuidanceTag, Role  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
import prodsample.vllm.scheduler as scheduler_module  # noqa: E402
from prodsample.vllm.scheduler import PairedAsyncScheduler, PairedScheduler  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCK = 16
TOKEN = 50  # what the fake model runner samples (never a stop token)


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1, heads=2)
    model = ModelConfig(model=str(model_dir), dtype="float32", max_model_len=256, seed=0, skip_tokenizer_init=True)
    scheduler = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=256, is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    return VllmConfig(model_config=model, scheduler_config=scheduler, cache_config=cache)


def build(base_config, cls=PairedScheduler, *, blocks=64, tokens=64, seqs=16, timeout=3600.0, asynchronous=False,
          long_prefill=0, **additional):
    """A scheduler of class `cls` over a KV cache of `blocks` blocks, `tokens` tokens per step, `seqs` requests."""
    config = copy.deepcopy(base_config)
    config.scheduler_config.max_num_batched_tokens = tokens
    config.scheduler_config.max_num_seqs = seqs
    config.scheduler_config.long_prefill_token_threshold = long_prefill
    config.scheduler_config.async_scheduling = asynchronous
    config.cache_config.num_gpu_blocks = blocks
    settings = {} if timeout is None else {"pair_timeout_s": timeout}  # None: the default
    config.additional_config = {"prodsample": settings | additional}
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    return cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
               block_size=BLOCK, log_stats=True)


def tagged(rollout: str, role: Role, prompt_len: int, *, lam=0.5, max_tokens=8, request_id=None) -> Request:
    tag = GuidanceTag(rollout=rollout, role=role, rollout_index=0, seed=0, release_token=2,
                      settings=SamplingSettings(lam=lam))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=tag.to_extra_args())
    return Request(request_id or f"{rollout}-{role.value}", [7] * prompt_len, params, None)


def pair(rollout: str, prompt_len: int, **kwargs) -> tuple[Request, Request]:
    """(guide, plain), the guide prompt 3 tokens longer, as GuidedLLM sends them."""
    return tagged(rollout, Role.GUIDE, prompt_len + 3, **kwargs), tagged(rollout, Role.PLAIN, prompt_len, **kwargs)


def plain_request(name: str, prompt_len: int, max_tokens=8) -> Request:
    return Request(name, [7] * prompt_len, SamplingParams(max_tokens=max_tokens, temperature=0.0), None)


def step(scheduler):
    """One engine step: schedule, sample a token for every request whose prefill completes, update.
    Returns (tokens scheduled per request id, finished outputs by request id)."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[i].is_prefill_chunk else [TOKEN] for i in ids]
    runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={i: n for n, i in enumerate(ids)},
                               sampled_token_ids=sampled)
    outputs = [o for outs in scheduler.update_from_output(out, runner).values() for o in outs.outputs]
    finished = {o.request_id: o for o in outputs if o.finish_reason is not None}
    return dict(out.num_scheduled_tokens), finished


def in_step(*pairs) -> bool:
    """Both requests of every pair in the same state: both running with as many output tokens, or neither."""
    for guide, plain in pairs:
        if (guide.status == RequestStatus.RUNNING) != (plain.status == RequestStatus.RUNNING):
            return False
        if guide.status == RequestStatus.RUNNING and guide.num_output_tokens != plain.num_output_tokens:
            return False
    return True


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def asynchronous(request):
    return request.param


# -- construction ----------------------------------------------------------------------------------------


def test_the_class_vllm_loads_builds_the_variant_of_the_configured_scheduling(base_config):
    assert type(build(base_config)) is PairedScheduler and isinstance(build(base_config), Scheduler)
    made = build(base_config, asynchronous=True)
    assert type(made) is PairedAsyncScheduler and isinstance(made, AsyncScheduler)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(timeout=-1.0), r"\['pair_timeout_s'\] must be a number >= 0"),
        (dict(timeout="5"), r"\['pair_timeout_s'\] must be a number >= 0"),
        (dict(pair_timeout=1.0), r"unknown keys \['pair_timeout'\]; known: \['pair_timeout_s', 'record_ttl_s'\]"),
        (dict(seqs=1), "max_num_seqs >= 2"),
    ],
)
def test_bad_settings_are_refused_at_construction(base_config, change, message):
    with pytest.raises(ValueError, match=message):
        build(base_config, **change)


def test_unsupported_engines_are_refused(base_config):
    config = copy.deepcopy(base_config)
    config.scheduler_config.policy = "priority"
    with pytest.raises(ValueError, match="'fcfs'"):
        build(config)


# -- admission -------------------------------------------------------------------------------------------


def test_the_first_of_a_pair_waits_for_its_partner(base_config, asynchronous):
    scheduler = build(base_config, asynchronous=asynchronous)
    guide, plain = pair("r0", 10)
    other = plain_request("u", 5)
    scheduler.add_request(guide)
    scheduler.add_request(other)
    scheduled, _ = step(scheduler)
    assert scheduled == {"u": 5}, "the untagged request goes; the lone guide waits"
    assert scheduler.get_num_unfinished_requests() == 2
    scheduler.add_request(plain)
    scheduled, _ = step(scheduler)
    assert scheduled == {"r0-guide": 13, "r0-plain": 10, "u": 1}
    assert scheduler.pair_stats.pairs == 1 and scheduler.pair_stats.released_alone == 0


def test_unpaired_requests_pass_through(base_config):
    scheduler = build(base_config)
    on_policy = tagged("r1", Role.PLAIN, 9, lam=1.0)  # λ = 1: a rollout of one request
    scheduler.add_request(on_policy)
    scheduler.add_request(plain_request("u", 4))
    assert step(scheduler)[0] == {"r1-plain": 9, "u": 4}


def test_a_pair_enters_only_whole(base_config, asynchronous):
    """45 tokens of an earlier request leave 19 of the step's 64: not room for 13 + 10. vLLM's scheduler
    admits the guide and cuts the plain prompt; the pair scheduler admits both in the next step."""
    for cls, split in ((Scheduler, True), (PairedScheduler, False)):
        scheduler = build(base_config, cls, asynchronous=asynchronous, tokens=64)
        scheduler.add_request(plain_request("u", 45))
        guide, plain = pair("r0", 10)
        scheduler.add_request(guide)
        scheduler.add_request(plain)
        first, _ = step(scheduler)
        if split:
            assert first == {"u": 45, "r0-guide": 13, "r0-plain": 6}, "control: vLLM cuts the plain prompt"
            continue
        assert first == {"u": 45}
        second, _ = step(scheduler)
        assert second == {"u": 1, "r0-guide": 13, "r0-plain": 10}


def test_a_request_between_the_two_of_a_pair_leaves_the_second_its_share(base_config):
    """Queued guide, untagged, plain: vLLM gives the untagged request what the plain prompt needs."""
    for cls, split in ((Scheduler, True), (PairedScheduler, False)):
        scheduler = build(base_config, cls, tokens=64)
        guide, plain = pair("r0", 17)
        for request in (guide, plain_request("u", 30), plain):
            scheduler.add_request(request)
        first, _ = step(scheduler)
        if split:
            assert first == {"r0-guide": 20, "u": 30, "r0-plain": 14}, "control: vLLM cuts the plain prompt"
            continue
        assert first == {"r0-guide": 20, "r0-plain": 17}, "the untagged request waits, the pair goes whole"
        assert step(scheduler)[0] == {"r0-guide": 1, "r0-plain": 1, "u": 30}


def test_after_a_pair_that_must_wait_everything_later_waits(base_config):
    """First come, first served among pairs: a small pair behind a large one does not overtake it."""
    scheduler = build(base_config, tokens=64)
    scheduler.add_request(plain_request("u", 30))
    big, small = pair("big", 20), pair("small", 2)
    for request in (*big, *small, plain_request("late", 2)):
        scheduler.add_request(request)
    assert step(scheduler)[0] == {"u": 30}
    assert step(scheduler)[0] == {"u": 1, "big-guide": 23, "big-plain": 20, "small-guide": 5, "small-plain": 2,
                                  "late": 2}


def test_a_pair_waits_for_request_slots(base_config):
    scheduler = build(base_config, seqs=3)
    scheduler.add_request(plain_request("u", 4))
    scheduler.add_request(plain_request("v", 4))
    for request in pair("r0", 4):
        scheduler.add_request(request)
    assert step(scheduler)[0] == {"u": 4, "v": 4}, "one slot left: the pair needs two"


def test_a_pair_waits_for_kv_blocks(base_config):
    """10 usable blocks: an untagged request holds 7 of them, the pair needs 4 (2 + 2) and waits for it to finish."""
    scheduler = build(base_config, blocks=11, tokens=256)
    scheduler.add_request(plain_request("u", 7 * BLOCK - 1, max_tokens=1))
    for request in pair("r0", 2 * BLOCK - 4):
        scheduler.add_request(request)
    scheduled, finished = step(scheduler)
    assert scheduled == {"u": 7 * BLOCK - 1} and "u" in finished
    assert step(scheduler)[0] == {"r0-guide": 2 * BLOCK - 1, "r0-plain": 2 * BLOCK - 4}


# -- decoding --------------------------------------------------------------------------------------------


def test_a_running_pair_decodes_together_or_not_at_all(base_config):
    """A running request mid-prefill ahead of a running pair (an order the admission itself never produces)
    that leaves one token of the budget: vLLM decodes the guide and not the plain; the pair scheduler
    holds both for a step."""
    for cls, split in ((Scheduler, True), (PairedScheduler, False)):
        scheduler = build(base_config, cls, tokens=64)
        guide, plain = pair("r0", 4)
        scheduler.add_request(guide)
        scheduler.add_request(plain)
        step(scheduler)
        long = plain_request("long", 62 + 63)
        scheduler.add_request(long)
        step(scheduler)  # the pair decodes, "long" takes 62 tokens: 63 are left, one token short of the budget
        scheduler.running.remove(long)
        scheduler.running.insert(0, long)
        scheduled, _ = step(scheduler)
        if split:
            assert scheduled == {"long": 63, "r0-guide": 1}, "control: vLLM decodes one of the pair"
            continue
        assert scheduled == {"long": 63}
        assert step(scheduler)[0] == {"long": 1, "r0-guide": 1, "r0-plain": 1}
        assert [r.request_id for r in scheduler.running] == ["long", "r0-guide", "r0-plain"], "order restored"


# -- preemption ------------------------------------------------------------------------------------------


def test_pairs_are_preempted_whole(base_config, asynchronous):
    """Three pairs of one-block prompts decoding into a cache of 15 usable blocks: vLLM preempts single
    requests and splits pairs; the pair scheduler preempts whole pairs, resumes them together, and
    every pair finishes in step."""
    for cls, split in ((Scheduler, True), (PairedScheduler, False)):
        scheduler = build(base_config, cls, blocks=16, tokens=256, asynchronous=asynchronous)
        pairs = [pair(f"r{i}", BLOCK - 5, max_tokens=3 * BLOCK) for i in range(3)]
        for request in (r for p in pairs for r in p):
            scheduler.add_request(request)
        steps_in_step = []
        for _ in range(400):
            step(scheduler)
            steps_in_step.append(in_step(*pairs))
            if not scheduler.has_requests():
                break
        preemptions = sum(r.num_preemptions for p in pairs for r in p)
        assert preemptions > 0, "the cache was too small for all three pairs"
        if split:
            assert not all(steps_in_step), "control: vLLM preempted one request of a pair"
            continue
        assert all(steps_in_step)
        assert scheduler.pair_stats.preempted > 0
        assert all(guide.num_preemptions == plain.num_preemptions for guide, plain in pairs)
        assert all(r.num_output_tokens == 3 * BLOCK for p in pairs for r in p)


def test_a_preempted_pair_grown_past_one_step_runs_on_as_two_requests(base_config):
    scheduler = build(base_config, tokens=64)
    guide, plain = pair("r0", 20, max_tokens=40)
    scheduler.add_request(guide)
    scheduler.add_request(plain)
    for _ in range(20):
        step(scheduler)
    for request in (plain, guide):  # as a preemption leaves them: 23 + 20 prompt and 20 output tokens each
        scheduler.running.remove(request)
        scheduler._preempt_request(request, 0.0)
    scheduled, _ = step(scheduler)
    assert scheduled == {"r0-guide": 43, "r0-plain": 21}, "vLLM's chunking: the pair is out of step (flagged)"
    assert scheduler.pair_stats.split_after_preemption == 1


# -- finishing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("running", [False, True], ids=["waiting", "running"])
def test_aborting_one_request_of_a_pair_aborts_the_other(base_config, running):
    scheduler = build(base_config)
    guide, plain = pair("r0", 6)
    scheduler.add_request(guide)
    scheduler.add_request(plain)
    if running:
        step(scheduler)
    scheduler.finish_requests("r0-plain", RequestStatus.FINISHED_ABORTED)
    assert guide.status == RequestStatus.FINISHED_ABORTED
    scheduled, finished = step(scheduler)
    assert scheduled == {} and finished["r0-guide"].finish_reason.name == "ABORT"
    assert "r0-plain" not in finished, "the client that aborted it is not told again"
    assert scheduler.pair_stats.partner_aborts == 1 and not scheduler.requests
    assert len(scheduler.pair_book) == 0, "nothing of the pair is kept"


def test_finishing_a_lone_request_leaves_nothing_behind(base_config):
    scheduler = build(base_config)
    guide, _ = pair("r0", 6)
    scheduler.add_request(guide)
    scheduler.finish_requests(["r0-guide"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.pair_stats.partner_aborts == 0 and len(scheduler.pair_book) == 0


def test_pairs_that_finish_together_are_forgotten(base_config):
    scheduler = build(base_config)
    guide, plain = pair("r0", 6, max_tokens=3)
    scheduler.add_request(guide)
    scheduler.add_request(plain)
    finished = {}
    while scheduler.has_requests():
        finished |= step(scheduler)[1]
    assert set(finished) == {"r0-guide", "r0-plain"} and len(scheduler.pair_book) == 0


# -- refusal ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "prompt_len", "cause"),
    [
        (dict(tokens=64), 31, "max_num_batched_tokens = 64"),  # 34 + 31 > 64
        (dict(tokens=256, long_prefill=32), 31, "long_prefill_token_threshold = 32"),  # the guide has 34
        (dict(tokens=256, blocks=4), 20, "KV-cache blocks"),  # 2 + 2 blocks, 3 usable
    ],
)
def test_a_pair_one_step_cannot_prefill_is_refused(base_config, caplog, settings, prompt_len, cause):
    scheduler = build(base_config, **settings)
    guide, plain = pair("r0", prompt_len)
    scheduler.add_request(guide)
    with caplog.at_level("WARNING", logger="prodsample.vllm.scheduler"):
        scheduler.add_request(plain)
    assert cause in caplog.text and "refused the pair of rollout 'r0'" in caplog.text
    scheduled, finished = step(scheduler)
    assert scheduled == {} and {r: o.finish_reason.name for r, o in finished.items()} == {
        "r0-guide": "ERROR", "r0-plain": "ERROR"}
    assert scheduler.pair_stats.refused == 1 and not scheduler.requests


def test_a_second_request_for_the_same_role_is_refused(base_config):
    scheduler = build(base_config)
    guide, _ = pair("r0", 6)
    twin = tagged("r0", Role.GUIDE, 9, request_id="twin")
    scheduler.add_request(guide)
    scheduler.add_request(twin)
    _, finished = step(scheduler)
    assert finished["twin"].finish_reason.name == "ERROR" and guide.status == RequestStatus.WAITING


# -- timeout ---------------------------------------------------------------------------------------------


def test_a_lone_request_runs_alone_after_the_timeout(base_config, caplog):
    scheduler = build(base_config, timeout=0.0)
    guide, plain = pair("r0", 6)
    scheduler.add_request(guide)
    with caplog.at_level("WARNING", logger="prodsample.vllm.scheduler"):
        assert step(scheduler)[0] == {"r0-guide": 9}
    assert "runs alone" in caplog.text and scheduler.pair_stats.released_alone == 1
    scheduler.add_request(plain)  # its partner, too late: it runs at once, alone as well
    assert step(scheduler)[0] == {"r0-guide": 1, "r0-plain": 6}
    assert scheduler.pair_stats.released_alone == 2 and scheduler.pair_stats.pairs == 0


def test_a_late_partner_is_still_a_partner_however_late_it_comes(base_config, monkeypatch):
    """By default no clock decides: the first request of a pair waits through any number of steps and any wall
    time (a loaded machine, where the partner reaches the engine late), and enters with its partner when that
    comes. Only its client giving up (an abort) ends the wait."""
    clock = [0.0]
    monkeypatch.setattr(scheduler_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    scheduler = build(base_config, timeout=None)
    guide, plain = pair("r0", 6)
    scheduler.add_request(guide)
    for _ in range(5):
        clock[0] += 3600.0
        assert step(scheduler)[0] == {}
    scheduler.add_request(plain)
    assert step(scheduler)[0] == {"r0-guide": 9, "r0-plain": 6}
    assert scheduler.pair_stats.pairs == 1 and scheduler.pair_stats.released_alone == 0
    other, _ = pair("r1", 6)
    scheduler.add_request(other)
    clock[0] += 3600.0
    step(scheduler)
    scheduler.finish_requests(other.request_id, RequestStatus.FINISHED_ABORTED)  # its client gave up
    assert other.request_id not in scheduler.requests and len(scheduler.pair_book) == 1


def test_a_lone_request_waits_until_the_timeout(base_config):
    scheduler = build(base_config, timeout=3600.0)
    scheduler.add_request(pair("r0", 6)[0])
    for _ in range(3):
        assert step(scheduler)[0] == {}
    assert scheduler.has_requests(), "the engine keeps stepping while a request waits for its partner"
