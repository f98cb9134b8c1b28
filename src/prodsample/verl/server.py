"""verl's vLLM rollout server, handing out prodsample's records with each finished rollout.

verl runs a vLLM engine per rollout replica inside a Ray actor (`vLLMHttpServer`) and calls its `generate`
once per request. A guided rollout is two such calls (`prodsample.verl.GuidedAgentLoop`); prodsample's logits
processor draws the tokens in the engine and keeps the per-token records there (log q, log π(o | prompt),
log π(o | prompt ⊕ hint), desync causes). The log-probs vLLM returns for a forced token are not log q, and
verl's own `collective_rpc` discards results, so this server subclass reads the records itself: when the
last request of a rollout finishes, it takes the rollout's records from the engine's workers
(`prodsample.vllm.processor.RecordsExtension`, mixed into verl's worker extension) and attaches them to that request's
`TokenOutput.extra_fields[RECORDS_KEY]`. The rollouts that finish while a read is in flight are read together
by the next one (`prodsample.vllm.record_reader.RecordReader`): a batch's records take a few RPCs, not one per
rollout. Untagged requests pass through untouched.

`prodsample.verl` registers `GuidedVllmReplica` for the name "vllm" in verl's replica registry (the plugin
does it on `import verl`), so `actor_rollout_ref.rollout.name=vllm` runs this server with no patch to verl.
Imports vLLM and verl's vLLM server module: loaded only where verl builds its replicas.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import ray
from verl.workers.rollout.replica import TokenOutput
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from ..settings import check_integer
from ..vllm.pairing import RECORDS_KEY, GuidanceTag, RolloutRecord, records_from_workers
from ..vllm.processor import RecordsExtension
from ..vllm.record_reader import RecordReader

__all__ = ["GuidedVllmHttpServer", "GuidedVllmReplica", "GuidedWorkerExtension", "RolloutFinish"]

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
        """The records of `rollouts` from the engine's workers, forgetting them there."""
        results = await self.engine.collective_rpc("prodsample_take_records", args=(json.dumps(rollouts),))
        return records_from_workers(results)


class GuidedVllmReplica(vLLMReplica):
    """verl's vLLM replica running `GuidedVllmHttpServer`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(GuidedVllmHttpServer)
