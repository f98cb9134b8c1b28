"""`GuidedLLM`: guided rollouts on a vLLM engine, in process.

`GuidedLLM` wraps an engine (one it builds, or an existing `vllm.LLM`, e.g. the one TRL syncs weights
into) and returns the same `GuidedRollout` as `prodsample.hf.guided_generate`, with identical tokens under
the same seed (same contexts, same keyed noise r = i·G + g, t). An engine it builds runs prodsample's
scheduler (`prodsample.vllm.scheduler.PairedScheduler`), which admits, preempts and finishes the two
requests of a pair together, so every rollout is added at once (`prodsample.vllm.pacing.AdmitAll`). On an
engine built by others with vLLM's own scheduler, its driver (`prodsample.vllm.pacing.PacedDriver`) admits
pairs between engine steps only as far as the engine can prefill them in one step and hold them to the end
without preemption. Either way, a pair that falls out of step is detected, continues on-policy and is
flagged `desynced` (see `prodsample.vllm.pairing`). The records come back from the engine's workers
through `LLM.collective_rpc` (`prodsample.vllm.processor`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm.sampling_params import RequestOutputKind, SamplingParams

from ..prompts import pad_token_id
from ..rollout import GuidedRollout
from ..settings import SamplingSettings
from .guided_call import GuidedCall
from .pacing import (
    AdmitAll,
    EngineLimits,
    EngineRequest,
    FinishedRequest,
    GenerationStats,
    PacedDriver,
    RolloutDriver,
    settle,
    warn_record_losses,
)
from .pairing import RolloutRecord, records_from_workers
from .processor import count_samplers, take_records
from .scheduler import SCHEDULER_CLS, keeps_pairs

if TYPE_CHECKING:
    import vllm

__all__ = ["GuidedLLM", "GenerationStats", "build_engine", "engine_limits", "DEFAULT_ENGINE_KWARGS"]

# What GuidedLLM changes from vLLM's defaults when it builds its engine: the scheduler that keeps pairs
# together, and a prefill budget that takes many pairs in one step (pairs wait rather than split when it runs
# out). The engine core also runs in-process (see `build_engine`), so each `step()` is one scheduler step.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {"max_num_batched_tokens": 16384, "scheduler_cls": SCHEDULER_CLS}


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
    """`prodsample.vllm.pacing.SteppedEngine` over a `vllm.LLM`'s V1 `LLMEngine`. Requests ask vLLM's own sampler
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
        driver: what admits the requests and steps the engine (default: `prodsample.vllm.pacing.AdmitAll` when the
            engine runs `prodsample.vllm.scheduler.PairedScheduler`, as one `GuidedLLM` builds does, else
            `prodsample.vllm.pacing.PacedDriver`).

    Example:
        >>> guided = GuidedLLM("path/to/model", dtype="float32")  # doctest: +SKIP
        >>> settings = SamplingSettings(lam=0.5, num_generations=4, max_new_tokens=64, seed=0)
        >>> rollouts = guided.generate(["What is 2+3?"], ["5"], settings)  # doctest: +SKIP
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
        counts = self._rpc(count_samplers, self.instance_id)
        if any(count != 1 for count in counts):
            raise RuntimeError(
                f"expected one prodsample logits processor per engine worker, found {counts}: install "
                "prodsample in the engine's environment (it registers the `vllm.logits_processors` entry "
                "point) and do not also pass it in `logits_processors`"
            )

    def generate(
        self, prompts: Sequence, answers: Sequence[str], settings: SamplingSettings | None = None, **changes
    ) -> GuidedRollout:
        """Guided rollouts, prompt-major (rollout r = i·G + g), as `prodsample.hf.guided_generate` returns
        them and with its tokens under the same seed. `settings`: the call's `SamplingSettings`; `changes`:
        fields that replace its own, or, without it, build it (`lam=0.5, num_generations=4, ...`). Sets
        `last_stats`."""
        call = GuidedCall.plan(self.tokenizer, prompts, answers, SamplingSettings.build(settings, **changes))
        try:
            driven = self.driver.run(_SteppedLLM(self.llm), call.rollouts)
        except BaseException:
            self._take(call.names)  # drop whatever the processor holds for them
            raise
        outcomes = settle(call.rollouts, driven.completions, self._take(call.names))
        warn_record_losses(outcomes)
        self.last_stats = GenerationStats.of(outcomes, driven.engine_steps)
        return call.rollout(outcomes, pad_token_id(self.tokenizer))

    def _take(self, rollouts: list[str]) -> dict[str, RolloutRecord]:
        return records_from_workers(self._rpc(take_records, self.instance_id, rollouts))
