"""Who samples the rollouts: the trained model (HF) or TRL's colocated vLLM engine.

A backend takes the trainer, this process's prompts and answers and the sampling settings, and returns a
prompt-major `GuidedRollout`; `GuidedGRPOConfig(guidance_backend=...)` names one of `ROLLOUT_BACKENDS`, and
`GuidedGRPOTrainer(rollout_backend=...)` takes any callable with that contract.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from trl.models import unwrap_model_for_generation

from ..hf import guided_generate
from ..rollout import GuidedRollout
from ..settings import SamplingSettings

__all__ = ["ROLLOUT_BACKENDS", "RolloutBackend", "unwrapped_model"]


class RolloutBackend(Protocol):
    """What samples the rollouts of a `GuidedRolloutFunc`: called with the trainer, this process's distinct
    prompts and their answers, and the call's settings (λ per prompt or per rollout, G, the length, TRL's
    temperature and filters, the seed, the hint template); returns the prompt-major `GuidedRollout`."""

    def __call__(self, trainer, prompts: list, answers: list[str], settings: SamplingSettings) -> GuidedRollout: ...


def unwrapped_model(trainer):
    """The trained model, unwrapped as TRL does for generate (a context manager)."""
    return unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    )


def _hf_backend(trainer, prompts, answers, settings: SamplingSettings) -> GuidedRollout:
    """The trained model itself, through `prodsample.hf.guided_generate`."""
    with unwrapped_model(trainer) as model:
        return guided_generate(model, trainer.processing_class, prompts, answers, settings)


# One GuidedLLM per vLLM engine, built on first use and dropped with the engine.
_GUIDED_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vllm_backend(trainer, prompts, answers, settings: SamplingSettings) -> GuidedRollout:
    """The vLLM engine TRL runs in colocate mode (and syncs the weights into before each rollout_func call)."""
    try:
        from ..vllm import GuidedLLM
    except ImportError as error:
        raise ImportError(
            "backend='vllm' needs prodsample.vllm.GuidedLLM, which this installation does not have (install "
            "prodsample[vllm] with a prodsample version that ships it), or use backend='hf'"
        ) from error
    llm = trainer.vllm_generation.llm
    if llm not in _GUIDED_ENGINES:
        # The trainer's tokenizer renders the prompts, as on the HF backend, so both give TRL the same prompt ids.
        _GUIDED_ENGINES[llm] = GuidedLLM(llm, tokenizer=trainer.processing_class)
    return _GUIDED_ENGINES[llm].generate(prompts, answers, settings)


def _server_backend(trainer, prompts, answers, settings: SamplingSettings) -> GuidedRollout:
    """A vLLM server running prodsample, in TRL's server mode (`prodsample.vllm.client.ServerBackend`)."""
    from ..vllm.client import ServerBackend

    return ServerBackend()(trainer, prompts, answers, settings)


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {"hf": _hf_backend, "vllm": _vllm_backend, "server": _server_backend}
