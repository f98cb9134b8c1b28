"""The settings the trainer refuses before it starts: those under which the recorded log q is not what TRL's
ratios assume, and a schedule that never lets the policy train without the answer."""

from __future__ import annotations

import warnings

from ..grpo import DistillCoefficient
from ..schedules import Schedule
from .config import GuidedGRPOConfig
from .off_policy import OFF_POLICY_MODES, engine_importance_config

__all__ = ["check_guided_args", "check_distill_ends", "check_answers", "warn_if_never_plain"]


def check_guided_args(args: GuidedGRPOConfig, backend: str | None) -> None:
    """Refuse settings under which the recorded log q is not what TRL's ratios assume. `backend`: the name of
    the backend that samples, None for a backend given as a callable."""
    if not args.temperature > 0:
        raise ValueError(
            f"temperature must be > 0 for guided rollouts, got {args.temperature}: TRL recomputes π_old at the "
            "training temperature, and greedy (T = 0) rollouts have no valid importance ratio"
        )
    if args.repetition_penalty != 1.0 or args.generation_kwargs:
        raise ValueError(
            "repetition_penalty and generation_kwargs are not supported by guided rollouts: q is sampled with "
            "temperature, top_k, top_p and min_p only, and any other change would not be in the recorded log q"
        )
    if args.chat_template_kwargs:
        raise ValueError(
            "chat_template_kwargs are not supported by guided rollouts (prompts render with the plain chat template)"
        )
    if args.max_completion_length is None:
        raise ValueError("max_completion_length must be set: it bounds every guided rollout")
    if backend == "vllm" and not (args.use_vllm and args.vllm_mode == "colocate"):
        raise ValueError("backend='vllm' samples with TRL's colocated engine: set use_vllm=True, vllm_mode='colocate'")
    if backend == "server" and not (args.use_vllm and args.vllm_mode == "server"):
        raise ValueError("backend='server' samples through TRL's vLLM server: set use_vllm=True, vllm_mode='server'")
    colocated = args.use_vllm and args.vllm_mode == "colocate"
    if colocated and args.vllm_enable_sleep_mode:
        raise ValueError(
            "guided rollouts in vLLM colocate mode do not wake a sleeping engine (and TRL's wake-up sync would "
            "bypass the checked weight sync): set vllm_enable_sleep_mode=False"
        )
    if colocated and args.vllm_tensor_parallel_size != 1:
        raise ValueError(
            "guided rollouts in vLLM colocate mode drive and sync each process's own single-worker engine: set "
            "vllm_tensor_parallel_size=1"
        )
    if backend == "hf" and args.use_vllm:
        raise ValueError("backend='hf' samples with the trained model; with use_vllm=True use backend='vllm'")
    if args.use_vllm and not args.vllm_importance_sampling_correction:
        raise ValueError(
            "a vLLM engine samples the rollouts, so the engine-mismatch correction must stay on: set "
            "vllm_importance_sampling_correction=True"
        )
    if args.use_vllm:
        engine_importance_config(args)  # raises on settings it cannot express
    if args.guided_per_group is not None and args.guided_per_group > args.num_generations:
        raise ValueError(
            f"guided_per_group ({args.guided_per_group}) must not exceed num_generations "
            f"({args.num_generations})"
        )
    OFF_POLICY_MODES[args.off_policy].check(args)
    coefficient = args.distill_coefficient()
    if coefficient is not None and args.importance_sampling_level != "token":
        raise ValueError(
            "self_distill adds a per-token advantage, which a sequence-level ratio would spread over the whole "
            f"completion: importance_sampling_level must be 'token', got {args.importance_sampling_level!r}"
        )
    if coefficient is not None and args.max_steps > 0:
        check_distill_ends(coefficient, args.max_steps)


def check_distill_ends(coefficient: DistillCoefficient, max_steps: int) -> None:
    """The final policy must not need the hint: β must be 0 from `max_steps` on."""
    if coefficient.shape.end_step > max_steps:
        raise ValueError(
            f"self_distill's β reaches 0 at step {coefficient.shape.end_step}, after training stops at "
            f"max_steps={max_steps}: the final policy would still be pulled toward the hinted context; end its "
            "shape by max_steps"
        )


def check_answers(dataset, name: str, column: str) -> None:
    """Every row of a map-style dataset has an answer (iterable ones are checked batch by batch)."""
    column_names = getattr(dataset, "column_names", None)
    if not isinstance(column_names, list) or not hasattr(dataset, "__getitem__"):
        return
    if column not in column_names:
        raise ValueError(f"{name} has no {column!r} column (answer_column); its columns are {column_names}")
    for index, answer in enumerate(dataset[column]):
        if answer is None or not str(answer).strip():
            raise ValueError(f"{name} row {index} has no answer in column {column!r}")


def warn_if_never_plain(schedule: Schedule, max_steps: int) -> None:
    if schedule.end_step is None:
        warnings.warn(
            "the schedule never reaches lam = 1: the policy keeps training on guided rollouts and never learns "
            "without the answer's help",
            UserWarning,
            stacklevel=3,
        )
    elif max_steps > 0 and schedule.end_step > max_steps:
        warnings.warn(
            f"the schedule reaches lam = 1 at step {schedule.end_step} but training stops at max_steps={max_steps}: "
            "the policy never trains without the answer's help",
            UserWarning,
            stacklevel=3,
        )
