"""The engine side of guided rollouts on stock vLLM: the logits processor and the records it keeps.

vLLM decodes one context per request, so a guided rollout runs as two requests, the plain prompt and the
prompt with the hint, tagged through `SamplingParams.extra_args` (`prodsample.vllm.pairing.GuidanceTag`).
The logits processor registered under the `vllm.logits_processors` entry point finds both rows of each pair
in the batch, draws the token from the mixture with the core sampler and forces it into both rows, and
keeps per-token records (log q, log π(o|prompt), log π(o|prompt ⊕ hint)) in the engine's worker, read back
through `LLM.collective_rpc` (`prodsample.vllm.llm.GuidedLLM`) or, on a server, through `RecordsExtension`
(called by `prodsample.vllm.middleware`'s endpoint, or dev mode's `/collective_rpc`). Requests without the
tag pass through untouched.

Adapters, thin on purpose (the logic lives in `prodsample.vllm.pairing`):
  `ProductLogitsProcessorV1`  the V1 runner interface (vllm.v1.sample.logits_processor), which the CPU
                              engine runs: tested on a real engine.
  `ProductLogitsProcessorV2`  Model Runner V2 (vllm.v1.worker.gpu.sample.logits_processor), the GPU
                              default: tested against V2's interface classes with fabricated inputs only.
  `ProductLogitsProcessor`    the entry-point target: both runners load plugins from the same group, so it
                              is a subclass of both interfaces and builds the adapter of the runner that
                              constructs it.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .pairing import GuidanceTag, PairedSampler, RequestKey, RowView
from .scheduler import EngineSettings, keeps_pairs

__all__ = [
    "ProductLogitsProcessor",
    "ProductLogitsProcessorV1",
    "ProductLogitsProcessorV2",
    "RecordsExtension",
    "count_samplers",
    "take_records",
]


# -- request validation (frontend) ----------------------------------------------------------------------

# SamplingParams fields that act on a request's logits before the processor sees them, or on its tokens
# after, and so would make the recorded log q wrong or split the pair: neutral values only.
_NEUTRAL_PARAMS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "structured_outputs": None,
    "stop": None,
    "thinking_token_budget": None,
    "trace_decode_token_ids": None,
}


class _ChecksTaggedParams:
    """`validate_params`, which both runners call at admission (in the frontend, before the engine)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject a malformed tag, or a tagged request whose other settings would interfere with the draw."""
        if GuidanceTag.from_extra_args(sampling_params.extra_args) is None:
            return
        for name, neutral in _NEUTRAL_PARAMS.items():
            value = getattr(sampling_params, name, neutral)
            if value not in (neutral, [], {}):
                raise ValueError(
                    f"a prodsample-tagged request must leave SamplingParams.{name} at {neutral!r}, got {value!r}"
                )
        if getattr(sampling_params, "watermarking", None):
            raise ValueError("a prodsample-tagged request cannot use watermarking (it changes the logits)")


# -- adapters -------------------------------------------------------------------------------------------

# Live samplers by engine instance (vllm_config.instance_id), in this process; the RPC functions below read
# them in the worker process.
_SAMPLERS: dict[str, weakref.WeakSet[PairedSampler]] = {}


def _register(vllm_config) -> PairedSampler:
    sampler = PairedSampler(backend="auto_engine", record_ttl_s=EngineSettings.of(vllm_config).record_ttl_s,
                            vocab_size=vllm_config.model_config.get_vocab_size())
    _SAMPLERS.setdefault(vllm_config.instance_id, weakref.WeakSet()).add(sampler)
    return sampler


class ProductLogitsProcessorV1(_ChecksTaggedParams, V1LogitsProcessor):
    """V1 runner adapter: rows are persistent-batch indices kept up to date from `BatchUpdate`s; a row's
    position is the length of its request's output list (a live reference the runner appends to). V1
    does not say which rows are mid-prefill: the pairing finds out from the next step (see pairing)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.sampler = _register(vllm_config)
        self.rows: dict[int, tuple[RequestKey, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token, greedy or not

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            tag = GuidanceTag.from_extra_args(params.extra_args)
            key = None if tag is None else self.sampler.admit(tag)
            self._put(index, None if key is None else (key, output_ids))
        for source, target, direction in batch_update.moved:
            moving = self.rows.pop(source, None)
            if direction is MoveDirectionality.SWAP:
                self._put(source, self.rows.pop(target, None))
            self._put(target, moving)

    def _put(self, index: int, entry: tuple[RequestKey, list[int]] | None) -> None:
        if entry is None:
            self.rows.pop(index, None)
        else:
            self.rows[index] = entry

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.sampler.sweep()  # every step, tagged rows or not: the record TTL runs on the clock
        if not self.rows:
            return logits
        # Under async scheduling (GPU) the runner may leave -1 placeholders for tokens it has not copied
        # back yet: those count for the position but say nothing about which token was kept.
        views = [
            RowView(index, key, len(output), None, output[-1] if output and output[-1] >= 0 else None)
            for index, (key, output) in self.rows.items()
        ]
        return self.sampler.step(logits, views)


class ProductLogitsProcessorV2(_ChecksTaggedParams, V2LogitsProcessor):
    """Model Runner V2 adapter: requests live in slots (`add_request`), rows are reordered every step
    (`ctx.idx_mapping_np`: row → slot). A row samples completion position seq_len − prompt_len and is
    mid-prefill while seq_len < prefill_len, which V2 tells in advance. Reads only the host mirrors
    `prompt_len.np` / `prefill_len.np` and `ctx.seq_lens_upper_bound_np` (exact without speculative
    decoding, which custom logits processors do not support), plus `ctx.input_ids` for the last token."""

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        self.sampler = _register(vllm_config)
        self.req_states = req_states
        self.slots: dict[int, RequestKey] = {}

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        tag = GuidanceTag.from_extra_args(sampling_params.extra_args)
        key = None if tag is None else self.sampler.admit(tag)
        if key is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = key
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        self.sampler.sweep()  # every step, tagged rows or not: the record TTL runs on the clock
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            raise RuntimeError("prodsample: one logits row per request expected (speculative decoding is unsupported)")
        tagged = [(row, int(slot)) for row, slot in enumerate(slots) if int(slot) in self.slots]
        if not tagged:
            return logits
        row_index = torch.tensor([row for row, _ in tagged], device=ctx.input_ids.device)
        last_tokens = ctx.input_ids.index_select(0, row_index).tolist()
        views = []
        for (row, slot), last_token in zip(tagged, last_tokens):
            seq_len = int(ctx.seq_lens_upper_bound_np[row])
            position = seq_len - int(self.req_states.prompt_len.np[slot])
            produces = seq_len >= int(self.req_states.prefill_len.np[slot])
            views.append(RowView(row, self.slots[slot], position, produces, int(last_token) if position > 0 else None))
        return self.sampler.step(logits, views)


class ProductLogitsProcessor(_ChecksTaggedParams, V1LogitsProcessor, V2LogitsProcessor):
    """The `vllm.logits_processors` entry point. vLLM's V1 runner and Model Runner V2 load every plugin of
    that group, and V2 refuses a class that is not a V2 processor, so this one is both: constructing it
    yields the adapter for the runner that calls it, `(vllm_config, device, is_pin_memory)` → V1,
    `(vllm_config, req_states)` → V2."""

    def __new__(cls, vllm_config, *args):
        if len(args) == 1 and isinstance(args[0], LogitsProcRequestState):
            return ProductLogitsProcessorV2(vllm_config, *args)
        return ProductLogitsProcessorV1(vllm_config, *args)


# -- reading records back (these run in the worker, through LLM.collective_rpc) ------------------------


def count_samplers(_worker, instance_id: str) -> int:
    return len(_SAMPLERS.get(instance_id, ()))


def take_records(_worker, instance_id: str, rollouts: list[str]) -> dict[str, tuple]:
    records: dict[str, tuple] = {}
    for sampler in list(_SAMPLERS.get(instance_id, ())):
        records.update({name: tuple(record) for name, record in sampler.take(rollouts).items()})
    return records


class RecordsExtension:
    """The records for a server's clients: `vllm serve ... --worker-extension-cls prodsample.vllm.processor.RecordsExtension`
    mixes these methods into every engine worker; `prodsample.vllm.middleware.RecordsEndpoint` calls them by
    name under the server's API key (or, with VLLM_SERVER_DEV_MODE=1, the unguarded `/collective_rpc`
    endpoint does). That endpoint passes only strings in and stringifies what is not a dict or list out, and
    its JSON encoder refuses NaN (a record's guide log-probs after a desync), so records travel as a JSON
    string with NaN literals."""

    def prodsample_take_records(self, rollouts_json: str) -> str:
        """`json.dumps` of {rollout: RolloutRecord as a list} for the named rollouts, forgetting them."""
        rollouts = json.loads(rollouts_json)
        if not isinstance(rollouts, list) or not all(isinstance(name, str) for name in rollouts):
            raise ValueError(f"prodsample_take_records expects a JSON list of rollout names, got {rollouts_json!r}")
        return json.dumps(take_records(self, self.vllm_config.instance_id, rollouts))

    def prodsample_engine_info(self) -> dict[str, Any]:
        """What a client checks before sending: the processor loaded once, the pair scheduler, the budgets."""
        config = self.vllm_config
        return {
            "samplers": count_samplers(self, config.instance_id),
            "keeps_pairs": keeps_pairs(config),
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_model_len": config.model_config.max_model_len,
        }
