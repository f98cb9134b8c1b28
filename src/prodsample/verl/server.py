"""verl's vLLM rollout server, handing out prodsample's records with each finished rollout.

verl runs a vLLM engine per rollout replica inside a Ray actor (`vLLMHttpServer`) and calls its `generate`
once per request. A guided rollout is two such calls (`prodsample.verl.GuidedAgentLoop`); prodsample's logits
processor draws the tokens in the engine and keeps the per-token records there (log q, log π(o | prompt),
log π(o | prompt ⊕ hint), desync causes). The log-probs vLLM returns for a forced token are not log q, and
verl's own `collective_rpc` discards results, so this server subclass reads the records itself: when the
last request of a rollout finishes, it takes the rollout's records from the engine's workers
(`prodsample.vllm.processor.RecordsExtension`, mixed into verl's worker extension) and attaches them to that request's
`TokenOutput.extra_fields[RECORDS_KEY]`. The rollouts that finish while a read is in flight are read together
by the next one (`prodsample.vllm.record_reader.RecordReader`): at most one read per finished rollout, fewer
when rollouts finish together. Untagged requests pass through untouched.

With `rollout.data_parallel_size > 1` the server's engine client balances each request on its own, and could
send the two requests of a pair to different engines. verl's `generate` passes no `data_parallel_rank` to
the engine, so the server wraps its engine client (`PairPinnedEngine`): both requests of a guided rollout go
to the engine its name picks; the records are read from every engine's workers.

`prodsample.verl` registers `GuidedVllmReplica` for the name "vllm" in verl's replica registry (the plugin
does it on `import verl`), so `actor_rollout_ref.rollout.name=vllm` runs this server with no patch to verl.
Imports vLLM and verl's vLLM server module: loaded only where verl builds its replicas.
"""

from __future__ import annotations

import functools
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import ray
from verl.workers.rollout.replica import TokenOutput
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from ..settings import check_integer
from ..vllm.pairing import RECORDS_KEY, GuidanceTag, RolloutRecord
from ..vllm.processor import RecordsExtension
from ..vllm.record_reader import RecordReader, take_records_from

__all__ = ["GuidedVllmHttpServer", "GuidedVllmReplica", "GuidedWorkerExtension", "PairPinnedEngine", "RolloutFinish"]

WORKER_EXTENSION_CLS = "prodsample.verl.server.GuidedWorkerExtension"


class GuidedWorkerExtension(RecordsExtension, vLLMColocateWorkerExtension):
    """verl's worker extension (weight sync, LoRA, quantisation patches) with prodsample's record reading."""


TakeRecord = Callable[[str], Awaitable[dict[str, RolloutRecord]]]  # a rollout → {rollout: its record} or {}


class RolloutFinish:
    """Which rollouts have a request finished on this server, so that a rollout's records are taken once, when
    its last request finishes (taking them earlier would leave the other request's rows unforced).

    Args:
        max_waiting: rollouts remembered with one request finished; beyond this the oldest is forgotten (its
            partner failed or went to another server: the rollout then has no records, which the loop flags).
    """

    def __init__(self, max_waiting: int = 100_000) -> None:
        check_integer(max_waiting, "max_waiting", low=1)
        self.max_waiting = max_waiting
        self._one_finished: OrderedDict[str, None] = OrderedDict()

    async def finished(self, tag: GuidanceTag, take_record: TakeRecord) -> RolloutRecord | None:
        """The rollout's record if the request tagged `tag` was its last to finish here (None otherwise, or if
        the engine holds none for it)."""
        if tag.paired and tag.rollout not in self._one_finished:
            self._one_finished[tag.rollout] = None
            if len(self._one_finished) > self.max_waiting:
                self._one_finished.popitem(last=False)
            return None
        self._one_finished.pop(tag.rollout, None)
        return (await take_record(tag.rollout)).get(tag.rollout)


class PairPinnedEngine:
    """vLLM's engine client (`AsyncLLM`) whose `generate` sends both requests of a guided rollout to one
    data-parallel engine: `crc32(rollout name) mod data_parallel_size`, which both requests compute alike
    wherever they come from (Python's `hash` of a str differs between processes). Untagged requests, and an
    engine without data parallelism, go as the client routes them. Everything else is the client's.

    Example (a fake client that echoes the rank it is given):
        >>> import types
        >>> from prodsample.settings import SamplingSettings
        >>> fake = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        ...     parallel_config=types.SimpleNamespace(data_parallel_size=2)),
        ...     generate=lambda *args, data_parallel_rank=None, **kwargs: data_parallel_rank)
        >>> def params(rollout, role):
        ...     tag = GuidanceTag(rollout, role, 0, 0, 0, SamplingSettings(lam=0.5).draw_settings())
        ...     return types.SimpleNamespace(extra_args=tag.to_extra_args())
        >>> engine = PairPinnedEngine(fake)
        >>> [engine.generate(prompt=None, sampling_params=params(name, role), request_id="r")
        ...  for name in ("rollout-7", "rollout-1") for role in ("guide", "plain")]
        [0, 0, 1, 1]
        >>> engine.generate(prompt=None, sampling_params=types.SimpleNamespace(extra_args=None), request_id="r") is None
        True
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.ranks = engine.vllm_config.parallel_config.data_parallel_size

    def generate(self, *args, sampling_params, **kwargs):
        if self.ranks > 1:  # one engine: no tag to read (the server has read it once already)
            tag = GuidanceTag.from_extra_args(sampling_params.extra_args)
            if tag is not None:
                kwargs["data_parallel_rank"] = zlib.crc32(tag.rollout.encode()) % self.ranks
        return self.engine.generate(*args, sampling_params=sampling_params, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


class GuidedVllmHttpServer(vLLMHttpServer):
    """verl's `vLLMHttpServer` whose workers serve prodsample's records, attached to the output of each
    rollout's last request under `extra_fields[RECORDS_KEY]` (a `RolloutRecord` as a list)."""

    @functools.cached_property
    def rollout_finish(self) -> RolloutFinish:
        return RolloutFinish()

    @functools.cached_property
    def record_reader(self) -> RecordReader:
        return RecordReader(self.take_records)

    def _get_worker_extension_cls(self) -> str:
        return WORKER_EXTENSION_CLS

    async def run_server(self, args) -> None:
        await super().run_server(args)
        self.engine = PairPinnedEngine(self.engine)

    async def generate(self, prompt_ids: list[int], sampling_params: dict, request_id: str, **kwargs) -> TokenOutput:
        # read before vLLMHttpServer.generate, which takes sampling_params apart
        tag = GuidanceTag.from_extra_args(sampling_params.get("extra_args"))
        output = await super().generate(prompt_ids, sampling_params, request_id, **kwargs)
        if tag is not None:
            record = await self.rollout_finish.finished(tag, self.record_reader.take)
            if record is not None:
                output.extra_fields[RECORDS_KEY] = list(record)
        return output

    async def take_records(self, rollouts: list[str]) -> dict[str, RolloutRecord]:
        """The records of `rollouts` from the workers of every engine, forgetting them there."""
        return await take_records_from(self.engine, rollouts)


class GuidedVllmReplica(vLLMReplica):
    """verl's vLLM replica running `GuidedVllmHttpServer`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(GuidedVllmHttpServer)
