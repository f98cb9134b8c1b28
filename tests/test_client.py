"""The server client against a fake server (httpx.MockTransport): what it sends, the records it reads back or
recomputes, and how it fails. The real server runs in tests/test_server.py."""

import asyncio
import json
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers", reason="the client's tests need the hf extra (the tiny model and score)")
httpx = pytest.importorskip("httpx", reason="the client needs the server extra (httpx)")

from prodsample.vllm.client import AsyncGuidedClient, GuidedClient, ServerBackend  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.vllm.pairing import GuidanceTag, Role  # noqa: E402
from prodsample.prompts import add_hint, render_prompt  # noqa: E402
from prodsample.rollout import GuidedRollout  # noqa: E402
from prodsample.testing import tiny_tokenizer  # noqa: E402
from prodsample.vllm.routes import ENGINE_INFO_PATH, RECORDS_PATH  # noqa: E402

PROMPTS, ANSWERS = ["What is 2+3?", "Name a prime."], ["5", "7"]
EOS = 2


class FakeServer:
    """A vLLM server in miniature: `tokens(tag)` says what a tagged request returns; records are served by
    rollout name when `records` is set, through prodsample's endpoint (`endpoint`), else through dev mode's
    /collective_rpc (`dev_mode`). Logs every request body by path."""

    def __init__(self, tokens, *, records=None, endpoint=True, dev_mode=False, info=None, fail=None, hang=False,
                 slow_first_read=False):
        self.tokens, self.records, self.endpoint, self.dev_mode = tokens, records, endpoint, dev_mode
        self.info = {"samplers": 1, "keeps_pairs": True, "max_num_batched_tokens": 2048, "max_model_len": 256}
        self.info |= info or {}
        self.fail = fail  # tag → an httpx.Response to answer that request with
        self.hang = hang  # requests not failed never finish: they wait to be cancelled
        self.slow_first_read = slow_first_read  # the first read of records takes 50 ms
        self.log: dict[str, list] = {}
        self.cancelled = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.log.setdefault(request.url.path, []).append(body)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        if path == ENGINE_INFO_PATH and self.endpoint:
            return httpx.Response(200, json={"results": [self.info]})
        if path == RECORDS_PATH and self.endpoint:
            return httpx.Response(200, text=json.dumps(await self._records(body["rollouts"], path)))
        if path == "/collective_rpc" and self.dev_mode:
            if body["method"] == "prodsample_engine_info":
                return httpx.Response(200, json={"results": [self.info]})
            records = await self._records(json.loads(body["args"][0]), path)
            return httpx.Response(200, json={"results": [json.dumps(records)]})
        if path != "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        tag = GuidanceTag.from_extra_args(body["vllm_xargs"])
        if self.fail is not None and self.fail(tag) is not None:
            return self.fail(tag)
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        tokens = self.tokens(tag)
        return httpx.Response(200, json={"choices": [{"token_ids": tokens, "finish_reason": "stop"}]})

    async def _records(self, names, path):
        if self.slow_first_read and len(self.log[path]) == 1:
            await asyncio.sleep(0.05)
        return {name: self.records[name] for name in names if name in self.records}

    def reads(self):
        """The rollout names of each read of records, in order."""
        if self.endpoint:
            return [body["rollouts"] for body in self.log.get(RECORDS_PATH, [])]
        return [json.loads(body["args"][0]) for body in self.log["/collective_rpc"][1:]]


def client(server, **kwargs):
    return GuidedClient("http://server", tiny_tokenizer(), transport=httpx.MockTransport(server), **kwargs)


def record(tokens, offset=0.0):
    n = len(tokens)
    return [tokens, [-1.0 - offset - t for t in range(n)], [-2.0 - t for t in range(n)], [-3.0 - t for t in range(n)],
            None, None]


def test_requests_carry_the_tag_and_neutral_sampling_and_records_come_from_the_server():
    completion = [40, 41, EOS]
    calls = {}
    server = FakeServer(lambda tag: completion)
    server.records = calls  # filled below, once the names are known
    tokenizer = tiny_tokenizer()

    def tokens(tag):
        calls[tag.rollout] = record(completion, offset=tag.rollout_index)
        return completion

    server.tokens = tokens
    server.slow_first_read = True
    got = client(server).generate(PROMPTS, ANSWERS, lam=0.5, num_generations=2, max_new_tokens=3, seed=9)
    reads = server.reads()
    assert len(reads) == 2 and sorted(map(len, reads)) == [1, 3], "the rollouts that finish during a read wait for one"
    bodies = server.log["/v1/completions"]
    assert len(bodies) == 8, "two requests per rollout"
    for body in bodies:
        tag = GuidanceTag.from_extra_args(body["vllm_xargs"])
        prompt = PROMPTS[tag.rollout_index // 2]
        hinted = add_hint(prompt, ANSWERS[tag.rollout_index // 2]) if tag.role is Role.GUIDE else prompt
        assert body["prompt"] == render_prompt(tokenizer, hinted) and body["max_tokens"] == 3
        assert body["temperature"] == 0.0 and body["presence_penalty"] == 0.0 and body["return_token_ids"] is True
        assert tag.seed == 9 and tag.release_token == EOS and tag.settings.lam == 0.5
        assert all(not isinstance(value, dict) for value in body["vllm_xargs"].values()), "vllm_xargs is flat"
    assert got.completion_lists() == [completion] * 4 and bool(got.guided.all())
    assert got.logprobs[:, 0].tolist() == [-1.0, -2.0, -3.0, -4.0], "each rollout its own record, in order"
    assert got.prompt_ids[0] == render_prompt(tokenizer, PROMPTS[0])


def test_a_desync_in_the_server_records_is_flagged():
    def tokens(tag):
        return [40, EOS] if tag.role is Role.GUIDE else [40, 41, EOS]

    server = FakeServer(tokens, records={})
    server.records = _RecordsFor(lambda name: [[40, 41, EOS], [-1.0] * 3, [-1.0] * 3, [-1.0, math.nan, math.nan], 1,
                                               "out_of_step"])
    shell = client(server)
    got = shell.generate(PROMPTS[:1], ANSWERS[:1], lam=0.5, max_new_tokens=3, seed=0)
    assert got.desynced.tolist() == [True] and got.guided.tolist() == [False]
    assert shell.last_stats.causes == {"out_of_step": 1}


class _RecordsFor(dict):
    """Records for any rollout name (but those `skip` says)."""

    def __init__(self, make, skip=lambda name: False):
        super().__init__()
        self.make, self.skip = make, skip

    def __contains__(self, name):
        return not self.skip(name)

    def __getitem__(self, name):
        return self.make(name)


def test_a_server_without_prodsample_records_is_refused_before_any_rollout():
    """No rollout's pairing can be verified without the engine's records (docs/server.md): no endpoint and no
    dev mode is an error that says how to start the server, before anything is sent."""
    server = FakeServer(lambda tag: [40, EOS], endpoint=False, dev_mode=False)
    with pytest.raises(RuntimeError, match="--middleware prodsample.vllm.middleware.TagCheck"):
        client(server).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
    assert "/v1/completions" not in server.log


def test_records_through_dev_mode_when_the_server_has_no_endpoint():
    completion = [40, EOS]
    server = FakeServer(lambda tag: completion, records=_RecordsFor(lambda name: record(completion)), endpoint=False,
                        dev_mode=True)
    got = client(server).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2, seed=0)
    assert bool(got.guided.all()) and RECORDS_PATH not in server.log and len(server.reads()) >= 1


def test_a_server_with_several_processors_is_refused():
    server = FakeServer(lambda tag: [40, EOS], records={}, info={"samplers": 2})
    with pytest.raises(RuntimeError, match=r"hold \[2\] prodsample logits processors"):
        client(server).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
    assert "/v1/completions" not in server.log


@pytest.mark.parametrize("lost", ["missing", "evicted", "other tokens"])
def test_a_rollout_whose_records_are_lost_comes_back_flagged_and_the_others_intact(lost):
    """A fault loses one rollout, never the call: rollout 1's record is missing (forgotten after record_ttl_s),
    evicted while it ran, or holds other tokens; it comes back with its tokens, desynced, unguided and masked
    like padding (mask False, log-probs 0, not NaN) and a warning naming the cause; rollout 0 keeps its record."""
    completion = [40, 41, EOS]

    def make(name):
        if not name.endswith("-1"):
            return record(completion)
        if lost == "evicted":
            return [completion[1:], [-1.0] * 2, [-1.0] * 2, [math.nan] * 2, 0, "record_evicted"]
        return record([40, 9, EOS])

    records = _RecordsFor(make, skip=lambda name: lost == "missing" and name.endswith("-1"))
    shell = client(FakeServer(lambda tag: completion, records=records))
    cause = {"missing": "record_missing", "evicted": "record_evicted", "other tokens": "record_mismatch"}[lost]
    with pytest.warns(UserWarning, match=f"1 of 2 rollouts came back without their records.*1 {cause}"):
        got = shell.generate(PROMPTS[:1], ANSWERS[:1], lam=0.5, num_generations=2, max_new_tokens=3, seed=0)
    assert got.desynced.tolist() == [False, True] and got.guided.tolist() == [True, False]
    assert shell.last_stats.causes == {cause: 1}
    assert got.masked.tolist() == [False, True] and got.completion_mask.tolist() == [[True] * 3, [False] * 3]
    for name in ("logprobs", "plain_logprobs", "guide_logprobs"):
        assert getattr(got, name)[1].tolist() == [0.0] * 3
    assert got.logprobs[0, :3].tolist() == [-1.0, -2.0, -3.0]
    assert got.completion_lists() == [completion] * 2
    joined = GuidedRollout.concat([got, got], pad_token_id=0)  # a masked rollout stays masked, its tokens kept
    assert joined.masked.tolist() == [False, True] * 2 and joined.completion_lists() == [completion] * 4


def test_pairs_the_server_cannot_prefill_whole_are_refused_before_sending():
    server = FakeServer(lambda tag: [40, EOS], records={}, info={"max_num_batched_tokens": 40})
    with pytest.raises(ValueError, match="max_num_batched_tokens = 40"):
        client(server).generate(["x" * 30], ["1"], lam=0.5, max_new_tokens=2)
    assert "/v1/completions" not in server.log


def test_a_failed_request_cancels_the_rest_and_drops_their_records():
    def fail(tag):
        if tag.rollout_index == 0 and tag.role is Role.PLAIN:
            return httpx.Response(200, json={"choices": [{"token_ids": [], "finish_reason": "abort"}]})
        return None

    server = FakeServer(lambda tag: [40, EOS], records={}, fail=fail, hang=True)
    with pytest.raises(RuntimeError, match="finish reason 'abort'"):
        client(server, max_concurrency=4).generate(PROMPTS, ANSWERS, lam=0.5, num_generations=3, max_new_tokens=2)
    sent = len(server.log["/v1/completions"])
    assert sent < 12 and server.cancelled == sent - 1, "every request in flight but the failed one cancelled"
    dropped = server.reads()[-1]
    assert len(dropped) == 6, "the records of every rollout of the call are dropped"


def test_a_server_error_names_the_request_and_the_likely_cause():
    server = FakeServer(lambda tag: [40, EOS], records={},
                        fail=lambda tag: httpx.Response(500, json={"error": {"message": "Internal server error"}}))
    with pytest.raises(RuntimeError, match=r"HTTP 500.*refuses a pair that one step cannot prefill"):
        client(server).generate(PROMPTS[:1], ANSWERS[:1], lam=0.5, max_new_tokens=2)


def test_the_blocking_client_refuses_to_run_inside_an_event_loop_and_the_async_one_runs_there():
    completion = [40, EOS]
    server = FakeServer(lambda tag: completion, records=_RecordsFor(lambda name: record(completion)))

    async def inside():
        with pytest.raises(RuntimeError, match="use AsyncGuidedClient"):
            client(server).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
        asynchronous = AsyncGuidedClient("http://server", tiny_tokenizer(), transport=httpx.MockTransport(server))
        return await asynchronous.generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)

    assert asyncio.run(inside()).completion_lists() == [completion] * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_concurrency=0), "max_concurrency must be a positive integer"),
    ],
)
def test_bad_client_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidedClient("http://server", tiny_tokenizer(), **kwargs)


@pytest.mark.parametrize(
    ("args", "url"),
    [
        (dict(vllm_server_base_url="http://base:1", vllm_server_host="h", vllm_server_port=2), "http://base:1"),
        (dict(vllm_server_base_url=None, vllm_server_host="h", vllm_server_port=2), "http://h:2"),
    ],
)
def test_the_trl_server_backend_finds_trls_server_and_uses_the_trainers_tokenizer(args, url):
    """The TRL hook's backend contract: backend(trainer, prompts, answers, settings) -> GuidedRollout."""
    completion = [40, EOS]
    server = FakeServer(lambda tag: completion, records=_RecordsFor(lambda name: record(completion)))
    seen = []

    def recorded(request):
        seen.append(str(request.url))
        return server(request)

    trainer = SimpleNamespace(args=SimpleNamespace(**args), processing_class=tiny_tokenizer())
    backend = ServerBackend(transport=httpx.MockTransport(recorded))
    settings = SamplingSettings(lam=0.5, num_generations=2, seed=0, max_new_tokens=2, temperature=1.0,
                                hint_template="{prompt} ({answer})")
    got = backend(trainer, PROMPTS, ANSWERS, settings)
    assert len(got) == 4 and all(address.startswith(url) for address in seen)
