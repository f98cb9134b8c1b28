"""Guided rollouts from a running vLLM server: the client of server mode.

A server with prodsample installed in its environment, started as

    vllm serve MODEL --scheduler-cls prodsample.vllm.scheduler.PairedScheduler \\
        --worker-extension-cls prodsample.vllm.processor.RecordsExtension \\
        --middleware prodsample.vllm.middleware.TagCheck --middleware prodsample.vllm.middleware.RecordsEndpoint

runs guided pairs: a rollout is two requests to the OpenAI-compatible `/v1/completions` endpoint (the plain
prompt and the prompt with the hint, as token ids), each with the flat prodsample tag in `vllm_xargs`. The
logits processor the package registers draws every token from q and forces it into both requests, and the
scheduler keeps the two in step (`prodsample.vllm.scheduler`). `AsyncGuidedClient.generate` (asyncio) and
`GuidedClient.generate` (blocking) return the same `GuidedRollout` as `prodsample.hf.guided_generate`, with
its tokens under the same seed.

The records (log q, log π(o | prompt), log π(o | prompt ⊕ hint), desync causes) come from the server's
workers through prodsample's endpoint (`prodsample.vllm.middleware`, under the server's API key), or, on a
server in vLLM's dev mode without it, through `/collective_rpc`. A server that serves neither is refused:
without the records no rollout's pairing can be verified (docs/server.md, "Records").

Nothing here imports vLLM: the client runs in a trainer's environment with httpx (the `server` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import warnings
from collections.abc import Sequence
from typing import Any

import httpx

from .guided_call import NEUTRAL_SAMPLING, GuidedCall
from .pacing import EngineRequest, GenerationStats, RolloutRequests, check_pairs_fit, settle, warn_record_losses
from .pairing import RolloutRecord, records_from_workers
from .record_reader import RecordReader
from .routes import DP_RANK_HEADER, ENGINE_INFO_PATH, MIDDLEWARE, RECORDS_PATH
from ..prompts import pad_token_id
from ..rollout import GuidedRollout
from ..settings import SamplingSettings, check_integer

__all__ = ["AsyncGuidedClient", "GuidedClient", "ServerBackend"]

# Idle connections are dropped before the server would drop them: vLLM's HTTP server closes a connection idle
# for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s), httpx by default reuses one for 5 s, and a request sent on a
# connection the server is closing fails with httpx.ReadError (seen under a 16-client load).
KEEPALIVE_EXPIRY_S = 2.0


class AsyncGuidedClient:
    """Guided rollouts from a vLLM server, per-request calls over asyncio (module docstring).

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000".
        tokenizer: the served model's tokenizer (it renders the prompts the server receives as token ids).
        model: the served model's name (default: the server's only model, read from `/v1/models`).
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
        self, base_url: str, tokenizer, *, model: str | None = None, max_concurrency: int = 64, timeout: float = 3600.0, api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_integer(max_concurrency, "max_concurrency", low=1)
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport
        self.last_stats: GenerationStats | None = None

    async def generate(
        self, prompts: Sequence, answers: Sequence[str], settings: SamplingSettings | None = None, **changes
    ) -> GuidedRollout:
        """Guided rollouts, prompt-major (rollout r = i·G + g), as `prodsample.vllm.GuidedLLM.generate`
        returns them (`settings` and `changes` as there). Sets `last_stats` (engine_steps 0: a server does not
        say)."""
        call = GuidedCall.plan(self.tokenizer, prompts, answers, SamplingSettings.build(settings, **changes))
        # a connection for each request in flight: a pair's first request must never hold the last connection
        # while its partner waits for one (the scheduler holds the first until the second arrives)
        limits = httpx.Limits(max_connections=2 * self.max_concurrency + 1, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.timeout, headers=self.headers, transport=self.transport, limits=limits
        ) as http:
            server = _Server(http, self.model)
            await _check_server(server, call)
            completions, records = await _run(server, call.rollouts, self.max_concurrency)
        outcomes = settle(call.rollouts, completions, records)
        warn_record_losses(outcomes)
        self.last_stats = GenerationStats.of(outcomes, engine_steps=0)
        return call.rollout(outcomes, pad_token_id(self.tokenizer))


async def _check_server(server: _Server, call: GuidedCall) -> None:
    """Refuse a server that does not serve prodsample's records (without them no rollout's pairing can be
    verified: docs/server.md), or holds no or several processors; warn if it does not keep pairs; refuse
    the call's pairs that one step of it cannot prefill."""
    info, why_not = await server.engine_info()
    if info is None:
        raise RuntimeError(
            f"the server does not serve prodsample's records ({why_not}): start it with "
            f"--worker-extension-cls prodsample.vllm.processor.RecordsExtension --middleware {' --middleware '.join(MIDDLEWARE)}"
        )
    workers = info["workers"]
    samplers = [worker["samplers"] for worker in workers]
    if set(samplers) != {1}:
        raise RuntimeError(
            f"the server's workers hold {samplers} prodsample logits processors, expected 1 each: install "
            "prodsample in the server's environment (it registers the vllm.logits_processors entry point)"
        )
    if not all(worker["keeps_pairs"] for worker in workers):
        warnings.warn(
            "prodsample: the server does not run prodsample.vllm.scheduler.PairedScheduler: pairs may fall "
            "out of step (flagged desynced, never guided)", stacklevel=4,
        )
    check_pairs_fit(call.rollouts, min(worker["max_num_batched_tokens"] for worker in workers))


class _Server:
    """The HTTP calls to one server, during one `generate`."""

    def __init__(self, http: httpx.AsyncClient, model: str | None) -> None:
        self.http = http
        self._model = model
        # What `engine_info` learns of the server, for this object's own later calls:
        self._dev_mode = False  # records through /collective_rpc rather than prodsample's endpoint
        self._data_parallel_size = 1  # the server's engines: each rollout is pinned to one of them

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
        """{"workers": every worker's `prodsample_engine_info`, "data_parallel_size": engines}, or None and why
        it is not available. From prodsample's
        endpoint (`prodsample.vllm.middleware`) where the server has it, else from dev mode's `/collective_rpc`,
        which then serves the records too."""
        response = await self.http.get(ENGINE_INFO_PATH)
        if response.status_code == 404:
            response = await self.http.post("/collective_rpc", json={"method": "prodsample_engine_info"})
            if response.status_code == 404:
                return None, (f"neither {ENGINE_INFO_PATH} (--middleware {' --middleware '.join(MIDDLEWARE)}) nor "
                              "dev mode's /collective_rpc")
            self._dev_mode = True
        if response.status_code >= 400:
            return None, f"the worker extension is missing: HTTP {response.status_code}: {response.text[:200]}"
        body = response.json()  # the data-parallel size: only prodsample's endpoint says (dev mode: 1 engine)
        self._data_parallel_size = body.get("data_parallel_size", 1)
        return {"workers": body["results"], "data_parallel_size": self._data_parallel_size}, None

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
        # both requests of a pair to one data-parallel engine, the rollouts spread over all of them
        ranks = self._data_parallel_size
        headers = {DP_RANK_HEADER: str(request.tag.rollout_index % ranks)} if ranks > 1 else {}
        response = await self.http.post("/v1/completions", json=await self.completion_body(request), headers=headers)
        _raise_for_status(response, f"request {request.request_id}")
        choice = response.json()["choices"][0]
        if choice["finish_reason"] not in ("stop", "length"):
            raise RuntimeError(
                f"the server ended request {request.request_id} with finish reason {choice['finish_reason']!r} (the "
                "pair scheduler aborts a request whose partner was aborted or failed)"
            )
        return list(choice["token_ids"])

    async def take_records(self, rollouts: list[str]) -> dict[str, RolloutRecord]:
        if self._dev_mode:
            body = {"method": "prodsample_take_records", "args": [json.dumps(rollouts)]}
            response = await self.http.post("/collective_rpc", json=body)
            _raise_for_status(response, "reading prodsample's records")
            return records_from_workers(response.json()["results"])
        response = await self.http.post(RECORDS_PATH, json={"rollouts": rollouts})
        _raise_for_status(response, "reading prodsample's records")
        return records_from_workers([response.text])  # NaN literals: json.loads reads them


def _raise_for_status(response: httpx.Response, what: str) -> None:
    if response.status_code < 400:
        return
    hint = ""
    if response.status_code >= 500:
        hint = " (prodsample's scheduler refuses a pair that one step cannot prefill: the server log says why)"
    raise RuntimeError(f"the server failed {what}: HTTP {response.status_code}: {response.text[:500]}{hint}")


async def _run(
    server: _Server, rollouts: Sequence[RolloutRequests], max_concurrency: int
) -> tuple[dict[str, list[int]], dict[str, RolloutRecord]]:
    """Every rollout's two requests sent together, at most `max_concurrency` rollouts at once; a rollout's
    records are read as soon as it finishes (the processor forgets records nobody reads, see `record_ttl_s`).
    On any failure the requests in flight are cancelled (the server aborts them) and their records dropped."""
    gate = asyncio.Semaphore(max_concurrency)
    reader = RecordReader(server.take_records)

    async def one(rollout: RolloutRequests):
        async with gate:
            tokens = await asyncio.gather(*(server.complete(request) for request in rollout.requests))
            records = await reader.take(rollout.name)
        return {request.request_id: t for request, t in zip(rollout.requests, tokens)}, records

    tasks = [asyncio.ensure_future(one(rollout)) for rollout in rollouts]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.take_records([rollout.name for rollout in rollouts])
        raise
    completions: dict[str, list[int]] = {}
    records: dict[str, RolloutRecord] = {}
    for rollout_completions, rollout_records in results:
        completions.update(rollout_completions)
        records.update(rollout_records)
    return completions, records


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



class ServerBackend:
    """A rollout backend of the TRL hook that samples through a vLLM server running prodsample:
    `prodsample.trl.GuidedGRPOConfig(guidance_backend="server", use_vllm=True, vllm_mode="server")` (TRL's server
    mode) uses it with its defaults; `GuidedGRPOTrainer(rollout_backend=ServerBackend(...))` with others. TRL pushes the trained weights into the server before
    each rollout call (its NCCL weight transfer, which needs GPUs: not verified here); this backend sends the
    rollouts with `GuidedClient`, rendering prompts with the trainer's tokenizer.

    Args:
        base_url: the server (default: TRL's `vllm_server_base_url`, else `vllm_server_host`:`vllm_server_port`).
        client_kwargs: for `GuidedClient` (e.g. `api_key=`).
    """

    def __init__(self, base_url: str | None = None, **client_kwargs) -> None:
        self.base_url = base_url
        self.client_kwargs = client_kwargs

    def __call__(self, trainer, prompts, answers, settings: SamplingSettings) -> GuidedRollout:
        args = trainer.args
        url = self.base_url or args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        return GuidedClient(url, trainer.processing_class, **self.client_kwargs).generate(prompts, answers, settings)
