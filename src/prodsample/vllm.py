"""vLLM integration: guided rollouts on stock vLLM, through its logits-processor plugin point.

vLLM decodes one context per request, so a guided rollout runs as two requests, the plain prompt and the
prompt with the hint, tagged through `SamplingParams.extra_args` (`prodsample.pairing.GuidanceTag`). The
logits processor registered under the `vllm.logits_processors` entry point finds both rows of each pair in
the batch, draws the token from the mixture with the core sampler and forces it into both rows, and keeps
per-token records (log q, log π(o|prompt), log π(o|prompt ⊕ hint)) in the engine's worker, read back
through `LLM.collective_rpc`. Requests without the tag pass through untouched.

`GuidedLLM` wraps an engine (one it builds, or an existing `vllm.LLM`, e.g. the one TRL syncs weights
into) and returns the same `GuidedRollout` as `prodsample.hf.guided_generate`, with identical tokens under
the same seed (same contexts, same keyed noise r = i·G + g, t). An engine it builds runs prodsample's
scheduler (`prodsample.vllm_scheduler.PairedScheduler`), which admits, preempts and finishes the two
requests of a pair together, so every rollout is added at once (`prodsample.pacing.AdmitAll`). On an engine
built by others with vLLM's own scheduler, its driver (`prodsample.pacing.PacedDriver`) admits pairs between
engine steps only as far as the engine can prefill them in one step and hold them to the end without
preemption. Either way, a pair that falls out of step is detected, continues on-policy and is flagged
`desynced` (see `prodsample.pairing`).

Adapters, thin on purpose (the logic lives in `prodsample.pairing`):
  `ProductLogitsProcessorV1`  the V1 runner interface (vllm.v1.sample.logits_processor), which the CPU
                              engine runs: tested on a real engine.
  `ProductLogitsProcessorV2`  Model Runner V2 (vllm.v1.worker.gpu.sample.logits_processor), the GPU
                              default: tested against V2's interface classes with fabricated inputs only.
  `ProductLogitsProcessor`    the entry-point target: both runners load plugins from the same group, so it
                              is a subclass of both interfaces and builds the adapter of the runner that
                              constructs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .guided_call import GuidedCall, pad_token_id
from .pacing import (
    AdmitAll,
    EngineLimits,
    EngineRequest,
    FinishedRequest,
    GenerationStats,
    PacedDriver,
    RolloutDriver,
    settle,
)
from .pairing import GuidanceTag, PairedSampler, RequestKey, RolloutRecord, RowView, records_from_workers
from .prompts import DEFAULT_HINT_TEMPLATE
from .rollout import GuidedRollout
from .vllm_scheduler import SCHEDULER_CLS, EngineSettings, keeps_pairs

if TYPE_CHECKING:
    import vllm

__all__ = [
    "GuidedLLM",
    "GenerationStats",
    "ProductLogitsProcessor",
    "ProductLogitsProcessorV1",
    "ProductLogitsProcessorV2",
    "RecordsExtension",
    "build_engine",
    "engine_limits",
    "DEFAULT_ENGINE_KWARGS",
]

# What GuidedLLM changes from vLLM's defaults when it builds its engine: the scheduler that keeps pairs
# together, and a prefill budget that takes many pairs in one step (pairs wait rather than split when it runs
# out). The engine core also runs in-process (see `build_engine`), so each `step()` is one scheduler step.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {"max_num_batched_tokens": 16384, "scheduler_cls": SCHEDULER_CLS}


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
    sampler = PairedSampler(backend="auto_engine", record_ttl_s=EngineSettings.of(vllm_config).record_ttl_s)
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
            self._put(index, None if tag is None else (self.sampler.admit(tag), output_ids))
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
        if tag is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = self.sampler.admit(tag)
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
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


def _count_samplers(_worker, instance_id: str) -> int:
    return len(_SAMPLERS.get(instance_id, ()))


def _take_records(_worker, instance_id: str, rollouts: list[str]) -> dict[str, tuple]:
    records: dict[str, tuple] = {}
    for sampler in list(_SAMPLERS.get(instance_id, ())):
        records.update({name: tuple(record) for name, record in sampler.take(rollouts).items()})
    return records


class RecordsExtension:
    """The records for a server's clients: `vllm serve ... --worker-extension-cls prodsample.vllm.RecordsExtension`
    mixes these methods into every engine worker, and with VLLM_SERVER_DEV_MODE=1 the server's
    `/collective_rpc` endpoint calls them by name (`prodsample.client` does). That endpoint passes only
    strings in and stringifies what is not a dict or list out, and its JSON encoder refuses NaN (a record's
    guide log-probs after a desync), so records travel as a JSON string with NaN literals."""

    def prodsample_take_records(self, rollouts_json: str) -> str:
        """`json.dumps` of {rollout: RolloutRecord as a list} for the named rollouts, forgetting them."""
        rollouts = json.loads(rollouts_json)
        if not isinstance(rollouts, list) or not all(isinstance(name, str) for name in rollouts):
            raise ValueError(f"prodsample_take_records expects a JSON list of rollout names, got {rollouts_json!r}")
        return json.dumps(_take_records(self, self.vllm_config.instance_id, rollouts))

    def prodsample_engine_info(self) -> dict[str, Any]:
        """What a client checks before sending: the processor loaded once, the pair scheduler, the budgets."""
        config = self.vllm_config
        return {
            "samplers": _count_samplers(self, config.instance_id),
            "keeps_pairs": keeps_pairs(config),
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "max_model_len": config.model_config.max_model_len,
        }


# -- the wrapper ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _in_process_engine_core():
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def build_engine(model: str | os.PathLike, **engine_kwargs) -> vllm.LLM:
    """A `vllm.LLM` set up for guided rollouts: `DEFAULT_ENGINE_KWARGS` under `engine_kwargs`, and the
    engine core in this process, so that each `step()` is one scheduler step and a pair added between two
    steps is scheduled together (a separate engine process may step between the two requests' arrival).
    A single-GPU/CPU engine also keeps its worker in-process (no worker process to feed every step)."""
    from vllm import LLM

    kwargs = DEFAULT_ENGINE_KWARGS | engine_kwargs
    if kwargs.get("tensor_parallel_size", 1) == 1 and kwargs.get("pipeline_parallel_size", 1) == 1:
        kwargs.setdefault("distributed_executor_backend", "uni")
    with _in_process_engine_core():
        return LLM(str(model), **kwargs)


def engine_limits(llm: vllm.LLM) -> EngineLimits:
    """What one step of `llm`'s engine can take: its scheduler's and KV cache's sizes."""
    config = llm.llm_engine.vllm_config
    return EngineLimits(
        max_num_seqs=config.scheduler_config.max_num_seqs,
        max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
        kv_blocks=config.cache_config.num_gpu_blocks,
        block_size=config.cache_config.block_size,
    )


class _SteppedLLM:
    """`prodsample.pacing.SteppedEngine` over a `vllm.LLM`'s V1 `LLMEngine`. Requests ask vLLM's own sampler
    for greedy (so it can only keep the token the processor forces) and return their tokens once, finished."""

    def __init__(self, llm: vllm.LLM) -> None:
        self.llm = llm

    def limits(self) -> EngineLimits:
        return engine_limits(self.llm)

    def add_request(self, request: EngineRequest) -> None:
        params = SamplingParams(
            max_tokens=request.max_new_tokens, temperature=0.0, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY, extra_args=request.tag.to_extra_args(),
        )
        self.llm.llm_engine.add_request(request.request_id, {"prompt_token_ids": request.prompt_token_ids}, params)

    def step(self) -> list[FinishedRequest]:
        finished = [output for output in self.llm.llm_engine.step() if output.finished]
        failed = [output.request_id for output in finished if output.outputs[0].finish_reason == "error"]
        if failed:
            raise RuntimeError(
                f"the engine failed requests {failed[:4]} (finish reason 'error'; prodsample's scheduler refuses a "
                "pair that one step cannot prefill, and says why in the log)"
            )
        return [FinishedRequest(output.request_id, output.outputs[0].token_ids) for output in finished]

    def abort(self, request_ids: Sequence[str]) -> None:
        self.llm.llm_engine.abort_request(list(request_ids))

    def has_unfinished_requests(self) -> bool:
        # the frontend's count: LLMEngine.has_unfinished_requests may synchronise data-parallel ranks
        return self.llm.llm_engine.get_num_unfinished_requests() > 0


class GuidedLLM:
    """Guided rollouts on a vLLM engine.

    Args:
        llm: an existing `vllm.LLM` to wrap, or a model path/name for `build_engine` (then `engine_kwargs`
            go to it). A wrapped engine must have prodsample installed in its environment (the entry
            point loads the processor); one whose engine core runs in another process needs
            VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send back records, and may let a pair's requests
            arrive in different steps (flagged, never silent).
        tokenizer: the tokenizer that renders prompts (default: the engine's).
        driver: what admits the requests and steps the engine (default: `prodsample.pacing.AdmitAll` when the
            engine runs `prodsample.vllm_scheduler.PairedScheduler`, as one `GuidedLLM` builds does, else
            `prodsample.pacing.PacedDriver`).

    Example:
        >>> guided = GuidedLLM("path/to/model", dtype="float32")  # doctest: +SKIP
        >>> rollouts = guided.generate(["What is 2+3?"], ["5"], lam=0.5, num_generations=4,
        ...                            max_new_tokens=64, seed=0)  # doctest: +SKIP
    """

    def __init__(
        self, llm: vllm.LLM | str | os.PathLike, *, tokenizer=None, driver: RolloutDriver | None = None,
        **engine_kwargs,
    ) -> None:
        if isinstance(llm, (str, os.PathLike)):
            llm = build_engine(llm, **engine_kwargs)
        elif engine_kwargs:
            raise ValueError(f"engine_kwargs ({sorted(engine_kwargs)}) only apply when GuidedLLM builds the engine")
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: guided generation needs one to end rollouts")
        if driver is None:
            driver = AdmitAll() if keeps_pairs(llm.llm_engine.vllm_config) else PacedDriver()
        self.driver = driver
        self.instance_id = llm.llm_engine.vllm_config.instance_id
        self.last_stats: GenerationStats | None = None
        self._check_processor_loaded()

    def _rpc(self, function, *args) -> list:
        try:
            return self.llm.collective_rpc(function, args=args)
        except TypeError as error:
            if "not serializable" not in str(error):
                raise
            raise RuntimeError(
                "prodsample reads its records from the engine's worker through LLM.collective_rpc with a "
                "function, which an engine core in a separate process only accepts with "
                "VLLM_ALLOW_INSECURE_SERIALIZATION=1; set it, or build the engine with "
                "prodsample.vllm.build_engine (in-process)"
            ) from error

    def _check_processor_loaded(self) -> None:
        counts = self._rpc(_count_samplers, self.instance_id)
        if any(count != 1 for count in counts):
            raise RuntimeError(
                f"expected one prodsample logits processor per engine worker, found {counts}: install "
                "prodsample in the engine's environment (it registers the `vllm.logits_processors` entry "
                "point) and do not also pass it in `logits_processors`"
            )

    def generate(
        self,
        prompts: Sequence,
        answers: Sequence[str],
        *,
        lam,
        num_generations: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        hint_template: str = DEFAULT_HINT_TEMPLATE,
    ) -> GuidedRollout:
        """Guided rollouts, prompt-major (rollout r = i·G + g), as `prodsample.hf.guided_generate` returns
        them and with its tokens under the same `seed`. `lam`: a float, one per prompt or one per rollout.
        Sets `last_stats`."""
        call = GuidedCall.plan(
            self.tokenizer, prompts, answers, lam=lam, num_generations=num_generations,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            seed=seed, hint_template=hint_template,
        )
        try:
            driven = self.driver.run(_SteppedLLM(self.llm), call.rollouts)
        except BaseException:
            self._take(call.names)  # drop whatever the processor holds for them
            raise
        outcomes = settle(call.rollouts, driven.completions, self._take(call.names))
        self.last_stats = GenerationStats.of(outcomes, driven.engine_steps)
        return call.rollout(outcomes, pad_token_id(self.tokenizer))

    def _take(self, rollouts: list[str]) -> dict[str, RolloutRecord]:
        return records_from_workers(self._rpc(_take_records, self.instance_id, rollouts))
