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
from prodsample.hf import score  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.vllm.pairing import GuidanceTag, Role  # noqa: E402
from prodsample.prompts import add_hint, render_prompt  # noqa: E402
from prodsample.testing import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS, ANSWERS = ["What is 2+3?", "Name a prime."], ["5", "7"]
EOS = 2


class FakeServer:
    """A vLLM server in miniature: `tokens(tag)` says what a tagged request returns; records are served (dev
    mode) when `records` is set, by rollout name. Logs every request body by path."""

    def __init__(self, tokens, *, records=None, dev_mode=True, processor=True, info=None, fail=None, hang=False,
                 slow_first_read=False):
        self.tokens, self.records, self.dev_mode, self.processor = tokens, records, dev_mode, processor
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
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        if request.url.path == "/collective_rpc":
            if not self.dev_mode:
                return httpx.Response(404, json={"detail": "Not Found"})
            if body["method"] == "prodsample_engine_info":
                return httpx.Response(200, json={"results": [self.info]})
            names = json.loads(body["args"][0])
            if self.slow_first_read and len(self.log["/collective_rpc"]) == 2:  # after the engine info
                await asyncio.sleep(0.05)
            records = {name: self.records[name] for name in names if name in self.records}
            return httpx.Response(200, json={"results": [json.dumps(records)]})
        tag = GuidanceTag.from_extra_args(body["vllm_xargs"])
        if body.get("presence_penalty"):  # the processor refuses it
            if self.processor:
                return httpx.Response(400, json={"error": {"message": "a prodsample-tagged request must leave ..."}})
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
    reads = [json.loads(body["args"][0]) for body in server.log["/collective_rpc"][1:]]
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
    assert shell.last_stats.causes == {"out_of_step": 1} and shell.last_records_source == "server"


class _RecordsFor(dict):
    """Records for any rollout name."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __contains__(self, name):
        return True

    def __getitem__(self, name):
        return self.make(name)


@pytest.mark.parametrize("mode", ["no policy", "records=server"])
def test_without_dev_mode_the_client_needs_a_policy(mode):
    server = FakeServer(lambda tag: [40, EOS], dev_mode=False)
    kwargs = {"records": "server", "policy": object()} if mode == "records=server" else {}
    with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls"):
        client(server, **kwargs).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
    assert "/v1/completions" not in server.log


def test_a_server_without_the_processor_is_refused_before_any_rollout():
    server = FakeServer(lambda tag: [40, EOS], dev_mode=False, processor=False)
    with pytest.raises(RuntimeError, match="install prodsample in the server's environment"):
        client(server, policy=object()).generate(PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
    assert len(server.log["/v1/completions"]) == 1, "only the probe was sent"


def test_recomputed_records_follow_score_and_flag_outputs_that_differ():
    """Without dev mode: log q of λ while the two outputs agree; where they part (rollout 1's guide stops at
    position 1), log π and NaN guide log-probs from there, cause outputs_differ."""
    tokenizer = tiny_tokenizer()
    policy = tiny_model(tokenizer, arch="llama", seed=0)

    def tokens(tag):
        if tag.rollout_index == 1 and tag.role is Role.GUIDE:
            return [40, EOS]
        return [40, 41, 42, EOS]

    shell = client(FakeServer(tokens, dev_mode=False), policy=policy)
    with pytest.warns(UserWarning, match="records recomputed"):
        got = shell.generate(PROMPTS[:1], ANSWERS[:1], lam=0.3, num_generations=2, max_new_tokens=4, seed=0)
    assert shell.last_records_source == "recomputed"
    assert got.desynced.tolist() == [False, True] and got.guided.tolist() == [True, False]
    completions = [[40, 41, 42, EOS]] * 2
    with_lam = score(policy, tokenizer, PROMPTS[:1] * 2, ANSWERS[:1] * 2, completions, lam=0.3)
    on_policy = score(policy, tokenizer, PROMPTS[:1] * 2, ANSWERS[:1] * 2, completions, lam=1.0)
    assert torch.allclose(got.logprobs[0], with_lam.logprobs[0])
    assert torch.allclose(got.logprobs[1], torch.cat([with_lam.logprobs[1, :1], on_policy.logprobs[1, 1:]]))
    assert torch.allclose(got.plain_logprobs, with_lam.plain_logprobs)
    assert got.guide_logprobs[1, 1:].isnan().all() and not got.guide_logprobs[1, :1].isnan().any()


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
    dropped = json.loads(server.log["/collective_rpc"][-1]["args"][0])
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
        (dict(records="sometimes"), "records must be one of"),
        (dict(records="recompute"), "records='recompute' needs policy"),
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
