"""Guided rollouts from a running vLLM server: the client of server mode.

A server with prodsample installed in its environment, started as

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \\
        --scheduler-cls prodsample.vllm.scheduler.PairedScheduler \\
        --worker-extension-cls prodsample.vllm.processor.RecordsExtension

runs guided pairs: a rollout is two requests to the OpenAI-compatible `/v1/completions` endpoint (the plain
prompt and the prompt with the hint, as token ids), each with the flat prodsample tag in `vllm_xargs`. The
logits processor the package registers draws every token from q and forces it into both requests, and the
scheduler keeps the two in step (`prodsample.vllm.scheduler`). `AsyncGuidedClient.generate` (asyncio) and
`GuidedClient.generate` (blocking) return the same `GuidedRollout` as `prodsample.hf.guided_generate`, with
its tokens under the same seed.

The records (log q, log π(o | prompt), log π(o | prompt ⊕ hint), desync causes) come from the server's
workers through `/collective_rpc`, which vLLM serves only in dev mode (VLLM_SERVER_DEV_MODE=1). Without it
the client recomputes them with teacher-forced `prodsample.hf.score` on a local copy of the policy
(`policy`) and says so (`last_records_source == "recomputed"`, and a warning); it can then see a desync
only where the pair's two requests returned different tokens, and it cannot check that the server runs
prodsample's scheduler.

Nothing here imports vLLM: the client runs in a trainer's environment with httpx (the `server` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from .guided_call import NEUTRAL_SAMPLING, GuidedCall
from .pacing import EngineRequest, GenerationStats, RolloutRequests, check_pairs_fit, settle
from .pairing import DesyncCause, RolloutRecord, records_from_workers
from ..prompts import pad_token_id
from ..rollout import GuidedRollout
from ..settings import SamplingSettings, check_integer

__all__ = ["AsyncGuidedClient", "GuidedClient", "ServerBackend", "recompute_records"]

# Idle connections are dropped before the server would drop them: vLLM's HTTP server closes a connection idle
# for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s), httpx by default reuses one for 5 s, and a request sent on a
# connection the server is closing fails with httpx.ReadError (seen under a 16-client load).
KEEPALIVE_EXPIRY_S = 2.0

RECORDS_MODES = ("auto", "server", "recompute")


class AsyncGuidedClient:
    """Guided rollouts from a vLLM server, per-request calls over asyncio (module docstring).

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000".
        tokenizer: the served model's tokenizer (it renders the prompts the server receives as token ids).
        model: the served model's name (default: the server's only model, read from `/v1/models`).
        policy: a transformers copy of the served policy, to recompute records where the server does not give
            them; None if it must.
        records: "auto" (from the server when it gives them, else recomputed with `policy`), "server" or
            "recompute".
        max_concurrency: rollouts in flight at once per `generate` call (each is two requests).
        timeout: seconds an HTTP request may take (a request lasts as long as its rollout).
        api_key: the server's `--api-key`, if it has one.
        transport: an httpx transport to send through instead of the network (tests use `httpx.MockTransport`).

    Example:
        >>> client = AsyncGuidedClient("http://127.0.0.1:8000", tokenizer)  # doctest: +SKIP
        >>> settings = SamplingSettings(lam=0.5, num_generations=4, max_new_tokens=64, seed=0)
        >>> rollouts = await client.generate(["What is 2+3?"], ["5"], settings)  # doctest: +SKIP
    """

    def __init__(
        self, base_url: str, tokenizer, *, model: str | None = None, policy=None, records: str = "auto",
        max_concurrency: int = 64, timeout: float = 3600.0, api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if records not in RECORDS_MODES:
            raise ValueError(f"records must be one of {RECORDS_MODES}, got {records!r}")
        if records == "recompute" and policy is None:
            raise ValueError("records='recompute' needs policy: a local transformers copy of the served model")
        check_integer(max_concurrency, "max_concurrency", low=1)
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.model = model
        self.policy = policy
        self.records = records
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport
        self.last_stats: GenerationStats | None = None
        self.last_records_source: str | None = None  # "server" or "recomputed"

    async def generate(
        self, prompts: Sequence, answers: Sequence[str], settings: SamplingSettings | None = None, **changes
    ) -> GuidedRollout:
        """Guided rollouts, prompt-major (rollout r = i·G + g), as `prodsample.vllm.GuidedLLM.generate`
        returns them (`settings` and `changes` as there). Sets `last_stats` (engine_steps 0: a server does not
        say) and `last_records_source`."""
        call = GuidedCall.plan(self.tokenizer, prompts, answers, SamplingSettings.build(settings, **changes))
        # a connection for each request in flight: a pair's first request must never hold the last connection
        # while its partner waits for one (the scheduler holds the first until the second arrives)
        limits = httpx.Limits(max_connections=2 * self.max_concurrency + 1, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.timeout, headers=self.headers, transport=self.transport, limits=limits
        ) as http:
            server = _Server(http, self.model)
            source = await self._records_source(server, call)
            completions, records = await _run(server, call.rollouts, self.max_concurrency,
                                              take_records=source == "server")
        if source == "recomputed":
            warnings.warn(
                "prodsample: records recomputed with teacher-forced score on the local policy (the server does not "
                "serve them: start it with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                "prodsample.vllm.processor.RecordsExtension); desyncs are seen only where a pair's outputs differ",
                stacklevel=2,
            )
            records = recompute_records(call, completions, self.policy, self.tokenizer)
        outcomes = settle(call.rollouts, completions, records)
        self.last_stats = GenerationStats.of(outcomes, engine_steps=0)
        self.last_records_source = source
        return call.rollout(outcomes, pad_token_id(self.tokenizer))

    async def _records_source(self, server: _Server, call: GuidedCall) -> str:
        """"server" or "recomputed", per `records` and what the server offers; checks the server and the call's
        pairs against it on the way."""
        info, why_not = await server.engine_info() if self.records != "recompute" else (None, "not asked for")
        if info is not None:
            if info["samplers"] != 1:
                raise RuntimeError(
                    f"the server's workers hold {info['samplers']} prodsample logits processors, expected 1: install "
                    "prodsample in the server's environment (it registers the vllm.logits_processors entry point)"
                )
            if not info["keeps_pairs"]:
                warnings.warn(
                    "prodsample: the server does not run prodsample.vllm.scheduler.PairedScheduler: pairs may fall "
                    "out of step (flagged desynced, never guided)", stacklevel=3,
                )
            check_pairs_fit(call.rollouts, info["max_num_batched_tokens"])
            return "server"
        if self.records == "server" or self.policy is None:
            reason = "records='server' was asked for" if self.records == "server" else "no policy to recompute them"
            raise RuntimeError(
                f"the server does not serve prodsample's records ({why_not}) and {reason}: start it with "
                "VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls prodsample.vllm.processor.RecordsExtension, or pass policy="
            )
        await server.check_processor(call.rollouts[0].plain)
        return "recomputed"


class _Server:
    """The HTTP calls to one server, during one `generate`."""

    def __init__(self, http: httpx.AsyncClient, model: str | None) -> None:
        self.http = http
        self._model = model

    async def model(self) -> str:
        """The served model's name: as given, or the server's only one."""
        if self._model is None:
            response = await self.http.get("/v1/models")
            _raise_for_status(response, "listing the served models")
            names = [entry["id"] for entry in response.json()["data"]]
            if len(names) != 1:
                raise RuntimeError(f"the server serves {names}: pass model= to choose one")
            self._model = names[0]
        return self._model

    async def engine_info(self) -> tuple[dict[str, Any] | None, str | None]:
        """The workers' `prodsample_engine_info`, or None and why it is not available."""
        response = await self.http.post("/collective_rpc", json={"method": "prodsample_engine_info"})
        if response.status_code == 404:
            return None, "no /collective_rpc endpoint: VLLM_SERVER_DEV_MODE is not 1"
        if response.status_code >= 400:
            return None, f"the worker extension is missing: {response.text[:200]}"
        return response.json()["results"][0], None

    async def check_processor(self, request: EngineRequest) -> None:
        """Refuse a server without prodsample's logits processor, which would run tagged requests as plain
        greedy ones: the processor refuses a tagged request with a presence penalty, a stock server does not."""
        body = await self.completion_body(request) | {"presence_penalty": 0.5, "max_tokens": 1}
        response = await self.http.post("/v1/completions", json=body)
        if response.status_code != 400 or "prodsample" not in response.text:
            raise RuntimeError(
                "the server accepted a prodsample-tagged request that prodsample's logits processor refuses: install "
                "prodsample in the server's environment (it registers the vllm.logits_processors entry point)"
            )

    async def completion_body(self, request: EngineRequest) -> dict[str, Any]:
        return {
            "model": await self.model(),
            "prompt": list(request.prompt_token_ids),
            "max_tokens": request.max_new_tokens,
            **NEUTRAL_SAMPLING,
            "return_token_ids": True,
            "vllm_xargs": request.tag.to_extra_args(),
            "request_id": request.request_id,
        }

    async def complete(self, request: EngineRequest) -> list[int]:
        """The tokens the server returns for one tagged request."""
        response = await self.http.post("/v1/completions", json=await self.completion_body(request))
        _raise_for_status(response, f"request {request.request_id}")
        choice = response.json()["choices"][0]
        if choice["finish_reason"] not in ("stop", "length"):
            raise RuntimeError(
                f"the server ended request {request.request_id} with finish reason {choice['finish_reason']!r} (the "
                "pair scheduler aborts a request whose partner was aborted or failed)"
            )
        return list(choice["token_ids"])

    async def take_records(self, rollouts: list[str]) -> dict[str, RolloutRecord]:
        body = {"method": "prodsample_take_records", "args": [json.dumps(rollouts)]}
        response = await self.http.post("/collective_rpc", json=body)
        _raise_for_status(response, "reading prodsample's records")
        return records_from_workers(response.json()["results"])


def _raise_for_status(response: httpx.Response, what: str) -> None:
    if response.status_code < 400:
        return
    hint = ""
    if response.status_code >= 500:
        hint = " (prodsample's scheduler refuses a pair that one step cannot prefill: the server log says why)"
    raise RuntimeError(f"the server failed {what}: HTTP {response.status_code}: {response.text[:500]}{hint}")


async def _run(
    server: _Server, rollouts: Sequence[RolloutRequests], max_concurrency: int, *, take_records: bool
) -> tuple[dict[str, list[int]], dict[str, RolloutRecord]]:
    """Every rollout's two requests sent together, at most `max_concurrency` rollouts at once; a rollout's
    records are read as soon as it finishes (the processor forgets records nobody reads, see `record_ttl_s`).
    On any failure the requests in flight are cancelled (the server aborts them) and their records dropped."""
    gate = asyncio.Semaphore(max_concurrency)
    reader = _RecordReader(server)

    async def one(rollout: RolloutRequests):
        async with gate:
            tokens = await asyncio.gather(*(server.complete(request) for request in rollout.requests))
            records = await reader.take(rollout.name) if take_records else {}
        return {request.request_id: t for request, t in zip(rollout.requests, tokens)}, records

    tasks = [asyncio.ensure_future(one(rollout)) for rollout in rollouts]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if take_records:
            with contextlib.suppress(Exception):
                await server.take_records([rollout.name for rollout in rollouts])
        raise
    completions: dict[str, list[int]] = {}
    records: dict[str, RolloutRecord] = {}
    for rollout_completions, rollout_records in results:
        completions.update(rollout_completions)
        records.update(rollout_records)
    return completions, records


class _RecordReader:
    """Reads the records of finished rollouts, many per call: the rollouts that finish while a read is in
    flight are read together by the next one (each read is a `/collective_rpc`, which the engine serves
    between two steps)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.waiting: dict[str, asyncio.Future] = {}
        self.reading = asyncio.Lock()

    async def take(self, rollout: str) -> dict[str, RolloutRecord]:
        """{rollout: its record}, or {} if the server has none for it."""
        mine = asyncio.get_running_loop().create_future()
        self.waiting[rollout] = mine
        async with self.reading:
            if not mine.done():  # no earlier read took it along
                batch, self.waiting = self.waiting, {}
                try:
                    records = await self.server.take_records(list(batch))
                except BaseException as error:
                    for waiter in batch.values():
                        if waiter is mine:
                            continue  # raised here
                        if isinstance(error, Exception):
                            waiter.set_exception(error)
                        else:
                            waiter.cancel()
                    raise
                for name, waiter in batch.items():
                    waiter.set_result({name: records[name]} if name in records else {})
        return await mine


def recompute_records(
    call: GuidedCall, completions: Mapping[str, list[int]], policy, tokenizer
) -> dict[str, RolloutRecord]:
    """Records from teacher-forced `prodsample.hf.score` on a local copy of the policy, for a server that does
    not serve its own. A pair whose two requests returned different tokens lost step by the first position
    where they differ: from there its record holds log π (λ = 1) and NaN guide log-probs, as the engine's
    record would had it lost step there (it may have lost step earlier; either way it is flagged, cause
    `outputs_differ`). A desync that leaves both outputs equal is not seen."""
    from ..hf import score

    generations = call.settings.num_generations
    prompts = [call.prompts[r // generations] for r in range(len(call.rollouts))]
    answers = [call.answers[r // generations] for r in range(len(call.rollouts))]
    plain = [completions[rollout.plain.request_id] for rollout in call.rollouts]
    guided = score(policy, tokenizer, prompts, answers, plain, call.settings, lam=call.lams)
    lost_at = {
        r: _first_difference(plain[r], completions[rollout.guide.request_id])
        for r, rollout in enumerate(call.rollouts) if rollout.paired
    }
    lost_at = {r: position for r, position in lost_at.items() if position is not None}
    lost = sorted(lost_at)
    on_policy = score(policy, tokenizer, [prompts[r] for r in lost], [answers[r] for r in lost],
                      [plain[r] for r in lost], call.settings, lam=1.0) if lost else None
    records = {}
    for r, rollout in enumerate(call.rollouts):
        length = len(plain[r])
        logprobs, plain_logprobs, guide_logprobs = (
            getattr(guided, name)[r, :length].tolist() for name in ("logprobs", "plain_logprobs", "guide_logprobs")
        )
        cause = None
        if r in lost_at:
            row, start = lost.index(r), lost_at[r]
            logprobs[start:] = on_policy.logprobs[row, start:length].tolist()
            guide_logprobs[start:] = [math.nan] * (length - start)
            cause = DesyncCause.OUTPUTS_DIFFER.value
        records[rollout.name] = RolloutRecord(
            list(plain[r]), logprobs, plain_logprobs, guide_logprobs, lost_at.get(r), cause
        )
    return records


def _first_difference(plain: Sequence[int], guide: Sequence[int]) -> int | None:
    """The first position where the two outputs differ (a shorter one ends there), None if equal."""
    for position, (a, b) in enumerate(zip(plain, guide)):
        if a != b:
            return position
    return None if len(plain) == len(guide) else min(len(plain), len(guide))


class GuidedClient:
    """`AsyncGuidedClient` for blocking code: each `generate` runs it on an event loop of its own, so threads
    may call it at once (give each thread its own client to read its `last_stats`). Inside a running event
    loop, use `AsyncGuidedClient`. Same arguments as `AsyncGuidedClient`."""

    def __init__(self, *args, **kwargs) -> None:
        self.client = AsyncGuidedClient(*args, **kwargs)

    def generate(
        self, prompts: Sequence, answers: Sequence[str], settings: SamplingSettings | None = None, **changes
    ) -> GuidedRollout:
        """`AsyncGuidedClient.generate`, blocking."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.client.generate(prompts, answers, settings, **changes))
        raise RuntimeError("GuidedClient.generate blocks, so it cannot run inside an event loop: use AsyncGuidedClient")

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.client.last_stats

    @property
    def last_records_source(self) -> str | None:
        return self.client.last_records_source


class ServerBackend:
    """A rollout backend of the TRL hook that samples through a vLLM server running prodsample:
    `prodsample.trl.GuidedGRPOConfig(guidance_backend="server", use_vllm=True, vllm_mode="server")` (TRL's server
    mode) uses it with its defaults; `GuidedGRPOTrainer(rollout_backend=ServerBackend(...))` with others. TRL pushes the trained weights into the server before
    each rollout call (its NCCL weight transfer, which needs GPUs: not verified here); this backend sends the
    rollouts with `GuidedClient`, rendering prompts with the trainer's tokenizer.

    Args:
        base_url: the server (default: TRL's `vllm_server_base_url`, else `vllm_server_host`:`vllm_server_port`).
        client_kwargs: for `GuidedClient` (e.g. `policy=` to recompute records when the server has no dev mode).
    """

    def __init__(self, base_url: str | None = None, **client_kwargs) -> None:
        self.base_url = base_url
        self.client_kwargs = client_kwargs

    def __call__(self, trainer, prompts, answers, settings: SamplingSettings) -> GuidedRollout:
        args = trainer.args
        url = self.base_url or args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        return GuidedClient(url, trainer.processing_class, **self.client_kwargs).generate(prompts, answers, settings)
