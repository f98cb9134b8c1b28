"""Weight sync for a colocated vLLM engine: a trainer's weights loaded in place, then checked.

An engine that samples a policy's rollouts must hold the policy's current weights. Loading each tensor with
the model's `load_weights`, as TRL's colocate mode does, breaks on an engine that processes its weights
after loading: vLLM's CPU backend packs the linear layers' weights and swaps in parameters without a
`weight_loader` (vllm/model_executor/layers/linear.py), so the load raises part-way and leaves an engine
that still generates with some layers updated and others not. vLLM's in-place reload
(`Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`,
vllm/model_executor/model_loader/reload/) takes checkpoint-format tensors instead: it puts each layer back
in checkpoint form, loads it, repeats the layer's post-load processing (packing, quantisation) once all of
its tensors arrived, and copies the result into the tensors the engine already runs with.

`EngineWeightSync.sync` runs that reload and then checks, before anything is sampled:

1. every tensor offered was read, and vLLM loaded every parameter of its model (the reload reports a
   parameter it did not load only as a logged warning; here it is an error);
2. the prefix cache is emptied (its KV blocks were computed with the old weights);
3. the probe: log π of a fixed short token sequence (`probe_token_ids`) under the engine (vLLM's prompt
   log-probs) and under the trainer agree, mean |Δ log π| ≤ the tolerance (`default_tolerance`).

Any failure raises `WeightSyncError`. A failed sync may leave the engine with some layers updated, or with
layers that have no weights at all (a reload interrupted part-way leaves them on the meta device, where
the next forward crashes the process), so the sync object refuses every later sync, and a trainer that
syncs before each generation never samples from such an engine.

The reload runs in the worker through `LLM.collective_rpc` with the tensors themselves, so the engine's
worker must live in this process: TRL's colocate engines (`external_launcher`) and
`prodsample.vllm.build_engine`'s do.

Example (the trainer's side: `weights` are (checkpoint name, tensor) pairs, `trainer_logprobs` the
trainer's log π of the probe's tokens 1…n−1, float `[n − 1]`):
    >>> sync = EngineWeightSync(llm, probe_token_ids(tokenizer), tolerance=1e-3)  # doctest: +SKIP
    >>> report = sync.sync(model.named_parameters(), trainer_logprobs)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from vllm import SamplingParams
from vllm.model_executor.model_loader.reload import inplace as _vllm_reload

if TYPE_CHECKING:
    import vllm

__all__ = [
    "PROBE_TEXT",
    "FLOAT32_TOLERANCE",
    "HALF_PRECISION_TOLERANCE",
    "WeightSyncError",
    "SyncReport",
    "EngineWeightSync",
    "probe_token_ids",
    "engine_probe_logprobs",
    "default_tolerance",
]

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 7 = 19, and 3 * 4 = 12."

# Mean |Δ log π| over the probe's tokens that still counts as "the same weights". Measured on this repo's
# CPU engine: float32 engine vs float32 transformers ≤ 1e-5 (tiny Llama, SmolLM2-135M); bfloat16 engine vs
# float32 transformers 0.024-0.041 (SmolLM2-135M). A sync that failed outright (untouched or unloaded
# layers after training moved the weights, wrong tensors) differs by far more; a layer left one small
# step behind may not, which is why the structural checks (1 in the module docstring) come first.
FLOAT32_TOLERANCE = 1e-3
HALF_PRECISION_TOLERANCE = 0.2


class WeightSyncError(RuntimeError):
    """The engine does not hold the trainer's weights, and must not sample for it."""


class SyncReport(NamedTuple):
    """What one sync did."""

    tensors: int  # tensors the trainer offered (and the engine read)
    probe_mean_abs_diff: float  # mean |log π_engine − log π_trainer| over the probe's tokens
    probe_max_abs_diff: float
    tolerance: float
    seconds: float


def probe_token_ids(tokenizer, text: str = PROBE_TEXT) -> list[int]:
    """The probe sequence: `text` as `tokenizer` encodes it (with its special tokens, e.g. BOS)."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise ValueError(f"the probe text must encode to at least 2 tokens, got {len(ids)}")
    return ids


def default_tolerance(*dtypes: torch.dtype) -> float:
    """`FLOAT32_TOLERANCE` when every side computes in float32 or float64, else `HALF_PRECISION_TOLERANCE`."""
    return FLOAT32_TOLERANCE if all(dtype in (torch.float32, torch.float64) for dtype in dtypes) else HALF_PRECISION_TOLERANCE


def engine_probe_logprobs(llm: vllm.LLM, token_ids: Sequence[int]) -> torch.Tensor:
    """log π_engine(token_ids[t] | token_ids[:t]) for t = 1…n−1, float64 `[n − 1]`, from vLLM's prompt
    log-probs (raw log-softmax of the logits: no temperature or logits processor acts on prompt tokens)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    (output,) = llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)
    entries = output.prompt_logprobs
    return torch.tensor([entries[t][token_ids[t]].logprob for t in range(1, len(token_ids))], dtype=torch.float64)


class _Offered:
    """The trainer's tensors as the engine reads them: how many it read, and whether it read them all."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._weights = iter(weights)
        self.read = 0
        self.finished = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for item in self._weights:
            self.read += 1
            yield item
        self.finished = True

    def drain(self) -> None:
        """Run the rest of the trainer's iterator, so that the collectives it takes part in (ZeRO-3 and FSDP
        gather each tensor on every process) stay matched across processes."""
        for _ in self._weights:
            pass


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _reload_in_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Runs in the engine's worker (`LLM.collective_rpc`): vLLM's in-place reload from checkpoint-format
    tensors. Returns what the reload logged at warning level, which in this use means parameters it left
    unloaded (vllm/model_executor/model_loader/reload/inplace.py)."""
    if not hasattr(worker, "reload_weights"):
        raise WeightSyncError(f"this vLLM's worker ({type(worker).__name__}) has no in-place reload_weights")
    logger = _vllm_reload.logger
    handler, level = _Warnings(), logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.WARNING):  # VLLM_LOGGING_LEVEL=ERROR must not hide the report
        logger.setLevel(logging.WARNING)
    try:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.messages


class EngineWeightSync:
    """Loads a trainer's weights into a vLLM engine in place and checks that the engine then holds them
    (the module docstring lists the checks). After one failure it refuses every later sync.

    Args:
        llm: the engine, with its worker in this process.
        probe_ids: the probe sequence (`probe_token_ids`), at least 2 tokens.
        tolerance: the largest mean |Δ log π| over the probe's tokens that passes (`default_tolerance`).
    """

    def __init__(self, llm: vllm.LLM, probe_ids: Sequence[int], *, tolerance: float) -> None:
        if len(probe_ids) < 2:
            raise ValueError(f"probe_ids must hold at least 2 tokens, got {len(probe_ids)}")
        if not (isinstance(tolerance, (int, float)) and tolerance > 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be a positive finite number, got {tolerance!r}")
        self.llm = llm
        self.probe_ids = list(probe_ids)
        self.tolerance = float(tolerance)
        self.failure: str | None = None

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]], trainer_logprobs: torch.Tensor) -> SyncReport:
        """Load `weights` ((checkpoint name, tensor) pairs, as the model's checkpoint names them) and check.
        `trainer_logprobs`: the trainer's log π of the probe's tokens 1…n−1, `[n − 1]`, with these weights.
        Raises `WeightSyncError` when the engine does not hold them."""
        if self.failure is not None:
            raise WeightSyncError(
                f"an earlier weight sync into this engine failed ({self.failure}); the engine may hold a mix of "
                "old and new weights, or none, and must not sample: restart from the last checkpoint"
            )
        expected = (len(self.probe_ids) - 1,)
        if tuple(trainer_logprobs.shape) != expected:
            raise ValueError(f"trainer_logprobs must have shape {expected}, got {tuple(trainer_logprobs.shape)}")
        try:
            return self._sync(weights, trainer_logprobs.detach().to("cpu", torch.float64))
        except BaseException as error:
            self.failure = f"{type(error).__name__}: {error}"
            if isinstance(error, Exception) and not isinstance(error, WeightSyncError):
                raise WeightSyncError(
                    f"the weight sync into the vLLM engine failed part-way ({self.failure}); the engine may hold a "
                    "mix of old and new weights, or none, and must not sample"
                ) from error
            raise

    def _sync(self, weights, trainer_logprobs: torch.Tensor) -> SyncReport:
        started = time.perf_counter()
        offered = _Offered(weights)
        try:
            warned = [message for messages in self.llm.collective_rpc(_reload_in_worker, args=(offered,))
                      for message in messages]
        except BaseException:
            offered.drain()
            raise
        if not offered.finished:
            offered.drain()
            raise WeightSyncError(f"the engine stopped reading the trainer's weights after {offered.read} tensors")
        if warned:
            raise WeightSyncError(f"vLLM's in-place reload left weights unloaded: {'; '.join(warned)[:2000]}")
        if not self.llm.reset_prefix_cache():
            raise WeightSyncError("the engine's prefix cache (KV of the old weights) could not be reset: requests "
                                  "are still running in it")
        difference = (engine_probe_logprobs(self.llm, self.probe_ids) - trainer_logprobs).abs()
        mean, worst = float(difference.mean()), float(difference.max())
        if not mean <= self.tolerance:  # NaN fails too
            raise WeightSyncError(
                f"after the sync the engine's log π of the probe sequence differs from the trainer's by {mean:.3g} "
                f"on average (largest {worst:.3g}; tolerance {self.tolerance:g}): the engine does not hold the "
                "trainer's weights"
            )
        return SyncReport(offered.read, mean, worst, self.tolerance, time.perf_counter() - started)
