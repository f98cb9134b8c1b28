"""TRL integration: answer-guided rollouts inside `trl.GRPOTrainer`, trained with explicit off-policy handling.

    from prodsample.schedules import Linear
    from prodsample.trl import GuidedGRPOTrainer, HeldOutEvalCallback, guided_rollout_func

    rollout_func = guided_rollout_func(Linear(start=0.5, end_step=200), answer_column="answer")
    trainer = GuidedGRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=dataset,
                                processing_class=tokenizer, rollout_func=rollout_func)
    trainer.add_callback(HeldOutEvalCallback(trainer, heldout, verifier, eval_steps=50))
    trainer.train()

`guided_rollout_func` is TRL's `rollout_func`: it samples each prompt's `num_generations` rollouts from
q ∝ π(·|prompt)^λ · π(·|prompt ⊕ answer hint)^(1−λ) with λ from the schedule at `trainer.state.global_step`
(one λ per group by default) and the sampling settings of `trainer.args`, and returns log q as the sampling
log-probs. `GuidedGRPOTrainer` is `GRPOTrainer` with four small overrides, because TRL exposes the rewards,
π_old and the checkpoint folder only inside its trainer:

- the off-policy weights of the chosen mode reach the loss as a per-token factor on the advantage (exactly
  TRL's own `per_token_loss * importance_sampling_ratio`, since every TRL loss is positively homogeneous in
  the advantage), with either backend;
- the guidance controller records each group's rewards, and its state checkpoints and resumes with the trainer;
- the guidance metrics go to `trainer._metrics`, so they reach `report_to` averaged like TRL's own.

The framework-free pieces (`prodsample.controller`, `prodsample.importance`, `prodsample.hf`) do the work;
this module only adapts them to TRL's contracts. See docs/trl.md for each mode's math and the metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from .controller import GuidanceController
from .hf import check_tokenizer_matches, guided_generate
from .importance import (
    OFF_POLICY_MODES,
    ImportanceConfig,
    OffPolicyWeights,
    effective_sample_size,
    kl_q_pi,
    off_policy_weights,
)
from .prompts import DEFAULT_HINT_TEMPLATE, hint_leakage
from .rollout import GuidedRollout
from .schedules import Schedule

__all__ = [
    "DEFAULT_OFF_POLICY_MODE",
    "TRL_OFF_POLICY_MODES",
    "ROLLOUT_BACKENDS",
    "GuidedRolloutFunc",
    "guided_rollout_func",
    "GuidedGRPOTrainer",
    "HeldOutEvalCallback",
    "off_policy_mode_weights",
    "engine_importance_config",
    "prompt_key",
    "hint_leakage",
    "guidance_metrics",
]

# The off-policy mode used when none is named: "none", the original recipe (the bias it leaves vanishes as
# λ → 1, and it costs nothing). In the claim benchmark (README, "The claim, tested") "token_truncate"
# learned worse than "none" on the same rollouts; docs/trl.md gives the figures.
DEFAULT_OFF_POLICY_MODE = "none"

# The core's weight modes, plus LUFFY's policy shaping applied as a weight (see `off_policy_mode_weights`).
TRL_OFF_POLICY_MODES = (*OFF_POLICY_MODES, "luffy_shaping")

CHECKPOINT_FILE = "prodsample_guidance.json"


# ---------------------------------------------------------------------------------------------------------
# Backends: who samples the rollouts
# ---------------------------------------------------------------------------------------------------------

# A backend samples guided rollouts: backend(trainer, prompts, answers, *, lam, num_generations, seed,
# max_new_tokens, temperature, top_k, top_p, min_p, hint_template) -> GuidedRollout (prompt-major).
RolloutBackend = Callable[..., GuidedRollout]


def _hf_backend(trainer, prompts, answers, **sampling) -> GuidedRollout:
    """The trained model itself, through `prodsample.hf.guided_generate` (unwrapped as TRL does for generate)."""
    with unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    ) as model:
        return guided_generate(model, trainer.processing_class, prompts, answers, **sampling)


# One GuidedLLM per vLLM engine, built on first use and dropped with the engine.
_GUIDED_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vllm_backend(trainer, prompts, answers, **sampling) -> GuidedRollout:
    """The vLLM engine TRL runs in colocate mode (and syncs the weights into before each rollout_func call)."""
    try:
        from .vllm import GuidedLLM
    except ImportError as error:
        raise ImportError(
            "backend='vllm' needs prodsample.vllm.GuidedLLM, which this installation does not have (install "
            "prodsample[vllm] with a prodsample version that ships it), or use backend='hf'"
        ) from error
    llm = trainer.vllm_generation.llm
    if llm not in _GUIDED_ENGINES:
        # The trainer's tokenizer renders the prompts, as on the HF backend, so both give TRL the same prompt ids.
        _GUIDED_ENGINES[llm] = GuidedLLM(llm, tokenizer=trainer.processing_class)
    return _GUIDED_ENGINES[llm].generate(prompts, answers, **sampling)


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {"hf": _hf_backend, "vllm": _vllm_backend}


# ---------------------------------------------------------------------------------------------------------
# Off-policy weights
# ---------------------------------------------------------------------------------------------------------


def engine_importance_config(args) -> ImportanceConfig:
    """TRL's engine-mismatch settings (`vllm_importance_sampling_mode`, `..._clip_max`, `..._clip_min`) as a
    `prodsample.importance.ImportanceConfig`, so the engine weight is the one TRL would have applied."""
    level, constraint = args.vllm_importance_sampling_mode.split("_")
    floor = args.vllm_importance_sampling_clip_min
    if constraint == "truncate" and floor is not None:
        raise ValueError(
            "vllm_importance_sampling_clip_min with a *_truncate vllm_importance_sampling_mode is not supported by "
            "guided rollouts (their engine weight is truncated from above only); set it to None or use a *_mask mode"
        )
    cap = args.vllm_importance_sampling_clip_max
    return ImportanceConfig(level, constraint, cap=math.inf if cap is None else cap, floor=floor)


def off_policy_mode_weights(
    mode: str,
    logprobs: torch.Tensor,
    plain_logprobs: torch.Tensor,
    mask: torch.Tensor,
    guided: torch.Tensor,
    trainer_logprobs: torch.Tensor | None = None,
    *,
    engine: ImportanceConfig = ImportanceConfig(),
    luffy_gamma: float = 0.1,
) -> OffPolicyWeights:
    """Per-token stop-gradient weights `[B, T]` for one of `TRL_OFF_POLICY_MODES`, engine mismatch included.

    The guidance weight (π_engine/q under the mode's `ImportanceConfig`) comes from `prodsample.importance`;
    "none" uses weight 1 (the rollout is treated as drawn from π_engine), and "luffy_shaping" weights the tokens
    of guided rollouts by γ·π/(π+γ)², which makes the gradient of TRL's ratio term at θ = θ_old equal the
    gradient of LUFFY's shaped objective A·π_θ/(π_θ+γ). The engine weight π_trainer/π_engine (when
    `trainer_logprobs` is given, i.e. a separate engine sampled) multiplies every mode.
    """
    if mode not in TRL_OFF_POLICY_MODES:
        raise ValueError(f"off_policy must be one of {TRL_OFF_POLICY_MODES}, got {mode!r}")
    guidance = OFF_POLICY_MODES.get(mode)
    # Modes without a guidance ratio pass log π_engine as the sampling log-prob: their guidance weight is 1 and
    # only the engine weight (and its clipping statistics) remains.
    weights = off_policy_weights(
        logprobs if guidance is not None else plain_logprobs,
        plain_logprobs,
        mask,
        trainer_logprobs,
        guidance=guidance or ImportanceConfig(),
        engine=engine,
    )
    if mode != "luffy_shaping":
        return weights
    # LUFFY shapes the trained policy's probability: π_trainer when an engine sampled, else the engine's
    # (which is then the trained model).
    probability = (plain_logprobs if trainer_logprobs is None else trainer_logprobs).exp()
    shaping = torch.where(
        guided.bool().unsqueeze(1), luffy_gamma * probability / (probability + luffy_gamma) ** 2, 1.0
    ) * mask
    combined = weights.weights * shaping
    return weights._replace(
        weights=combined, guidance=shaping, effective_sample_size=effective_sample_size(combined, mask)
    )


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _mean_or_nan(values: torch.Tensor) -> float:
    values = values.double()
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def guidance_metrics(
    *,
    lam: torch.Tensor,
    guided: torch.Tensor,
    desynced: torch.Tensor,
    leaked: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    success_threshold: float,
    logprobs: torch.Tensor,
    plain_logprobs: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    clipped_fraction: float,
) -> dict[str, float]:
    """The per-step guidance metrics of a batch of R rollouts (prompt-major groups of `group_size`).

    Per-rollout tensors are `[R]`, per-token ones `[R, L]`. A reward is a success when above
    `success_threshold`; NaN rewards (unscorable rollouts) are left out. Means over an empty set are NaN,
    which TRL's logger drops from its averages.
    """
    guided, desynced, leaked, mask = guided.bool(), desynced.bool(), leaked.bool(), mask.bool()
    lengths = mask.sum(dim=1).double()
    groups = rewards.double().view(-1, group_size)
    scored = ~torch.isnan(groups)
    successes = (groups > success_threshold) & scored
    failures = (groups <= success_threshold) & scored
    high = torch.where(scored, groups, -math.inf).amax(dim=1)
    low = torch.where(scored, groups, math.inf).amin(dim=1)
    return {
        "guidance/lambda_mean": float(lam.double().mean()),
        "guidance/lambda_std": float(lam.double().std(unbiased=False)),
        "guidance/guided_fraction": _mean_or_nan(guided),
        "guidance/reward_guided": _mean_or_nan(rewards.double()[guided]),
        "guidance/reward_plain": _mean_or_nan(rewards.double()[~guided]),
        "guidance/groups_informative": _mean_or_nan(high > low),
        "guidance/groups_all_fail": _mean_or_nan(~successes.any(dim=1) & scored.any(dim=1)),
        "guidance/groups_all_pass": _mean_or_nan(~failures.any(dim=1) & scored.any(dim=1)),
        "guidance/kl_q_pi": float(kl_q_pi(logprobs, plain_logprobs, mask)),
        "guidance/is_weight_mean": _mean_or_nan(weights.double()[mask]),
        "guidance/is_clipped_fraction": clipped_fraction,
        "guidance/is_ess": float(effective_sample_size(weights, mask)),
        "guidance/length_guided": _mean_or_nan(lengths[guided]),
        "guidance/length_plain": _mean_or_nan(lengths[~guided]),
        "guidance/hint_leakage_guided": _mean_or_nan(leaked[guided]),
        "guidance/hint_leakage_plain": _mean_or_nan(leaked[~guided]),
        "guidance/desynced_fraction": _mean_or_nan(desynced),
    }


# ---------------------------------------------------------------------------------------------------------
# The rollout function
# ---------------------------------------------------------------------------------------------------------


def prompt_key(prompt) -> str:
    """A stable key for a prompt (string or chat messages): the controller's per-prompt records use it."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _rollout_seed(*parts) -> int:
    """A keyed-noise seed that differs per (run seed, mode, step, process, call) and repeats on resume."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, the range guided_generate draws from


@dataclass
class GuidedBatch:
    """What the rollout function generated on this process: the rollouts and, per rollout, its prompt's key
    and answer."""

    rollout: GuidedRollout
    prompt_keys: list[str]
    answers: list[str]


class GuidedRolloutFunc:
    """TRL's `rollout_func` for answer-guided rollouts. Build it with `guided_rollout_func`.

    Attributes:
        controller: the `GuidanceController` (schedule + per-prompt records) that sets λ per group.
        last_batch: the `GuidedBatch` of the latest call, which `GuidedGRPOTrainer` reads after scoring.
    """

    def __init__(
        self,
        controller: GuidanceController,
        *,
        answer_column: str,
        backend: str | RolloutBackend,
        off_policy: str,
        hint_template: str,
        guided_per_group: int | None,
        luffy_gamma: float,
    ):
        self.controller = controller
        self.answer_column = answer_column
        self.backend = backend
        self.off_policy = off_policy
        self.hint_template = hint_template
        self.guided_per_group = guided_per_group
        self.luffy_gamma = luffy_gamma
        self.last_batch: GuidedBatch | None = None
        self._calls_key: tuple[str, int] | None = None  # (mode, step) of the latest call
        self._calls = 0  # calls before the latest one at that (mode, step): eval runs several per step

    def _generate(self, trainer, prompts, answers, lam, num_generations, seed) -> GuidedRollout:
        backend = ROLLOUT_BACKENDS[self.backend] if isinstance(self.backend, str) else self.backend
        args = trainer.args
        return backend(
            trainer,
            prompts,
            answers,
            lam=lam,
            num_generations=num_generations,
            seed=seed,
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            hint_template=self.hint_template,
        )

    def rollout_lambdas(self, trainer, prompts: Sequence, training: bool) -> list[float]:
        """λ for each prompt entry: the controller's per-group λ in training, 1 in evaluation (the plain policy).

        TRL hands each process its slice of the generation batch, whose groups are `num_generations`
        consecutive entries of the global batch; with `guided_per_group=k`, only the first k rollouts of each
        group are guided.
        """
        if not training:
            return [1.0] * len(prompts)
        lams = self.controller.lambdas(trainer.state.global_step, [prompt_key(p) for p in prompts])
        if self.guided_per_group is not None:
            first = trainer.accelerator.process_index * len(prompts)
            lams = [
                lam if (first + i) % trainer.num_generations < self.guided_per_group else 1.0
                for i, lam in enumerate(lams)
            ]
        return lams

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        if not isinstance(trainer, GuidedGRPOTrainer):
            raise TypeError(
                "guided rollouts need prodsample.trl.GuidedGRPOTrainer (it reads the answers, applies the off-policy "
                f"weights and checkpoints the schedule), got {type(trainer).__name__}"
            )
        rows = trainer.generation_rows
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("the rollout function was called outside GuidedGRPOTrainer's generation step")
        answers = []
        for i, row in enumerate(rows):
            answer = row.get(self.answer_column)
            if answer is None or not str(answer).strip():
                raise ValueError(
                    f"row {i} of the batch has no answer in column {self.answer_column!r} (answer_column); its columns "
                    f"are {sorted(row)}"
                )
            answers.append(str(answer))
        training = trainer.model.training
        lams = self.rollout_lambdas(trainer, prompts, training)

        # Consecutive copies of a prompt share their context's prefill when every run has the same length.
        runs = [1]
        for previous, current in zip(prompts, prompts[1:]):
            if current == previous:
                runs[-1] += 1
            else:
                runs.append(1)
        num_generations = runs[0] if len(set(runs)) == 1 else 1
        firsts = range(0, len(prompts), num_generations)

        mode, step = ("train" if training else "eval"), trainer.state.global_step
        self._calls = self._calls + 1 if self._calls_key == (mode, step) else 0
        self._calls_key = (mode, step)
        seed = _rollout_seed(trainer.args.seed, mode, step, trainer.accelerator.process_index, self._calls)

        rollout = self._generate(
            trainer, [prompts[i] for i in firsts], [answers[i] for i in firsts], lams, num_generations, seed
        )
        self.last_batch = GuidedBatch(rollout, [prompt_key(p) for p in prompts], answers)
        return {
            "prompt_ids": rollout.prompt_ids,
            "completion_ids": rollout.completion_lists(),
            "logprobs": rollout.token_lists("logprobs"),
            # Extra fields reach the reward functions (as keyword arguments) next to the dataset's columns.
            "lam": rollout.lam.tolist(),
            "guided": rollout.guided.tolist(),
            "plain_logprobs": rollout.token_lists("plain_logprobs"),
        }


def guided_rollout_func(
    schedule: Schedule | GuidanceController,
    *,
    answer_column: str = "answer",
    backend: str | RolloutBackend = "hf",
    off_policy: str = DEFAULT_OFF_POLICY_MODE,
    hint_template: str = DEFAULT_HINT_TEMPLATE,
    guided_per_group: int | None = None,
    luffy_gamma: float = 0.1,
) -> GuidedRolloutFunc:
    """A TRL `rollout_func` that samples answer-guided rollouts; use it with `GuidedGRPOTrainer`.

    Args:
        schedule: a `prodsample.schedules.Schedule`, or a `GuidanceController` (schedule + per-prompt records)
            to share or to restore. λ comes from it at `trainer.state.global_step`, one value per group.
        answer_column: the dataset column holding each prompt's answer (the hint; reward functions get it too).
        backend: "hf" (the trained model, `prodsample.hf`), "vllm" (TRL's colocated vLLM engine,
            `prodsample.vllm`), or a callable with the backend contract (see `RolloutBackend`).
        off_policy: one of `TRL_OFF_POLICY_MODES` (docs/trl.md gives each one's math).
        hint_template: how the answer joins the prompt (`prodsample.prompts.add_hint`).
        guided_per_group: None (every rollout of a group shares its λ, so the group baseline compares like with
            like) or k: only the first k rollouts of each group are guided, the rest plain (LUFFY-style mixing).
        luffy_gamma: γ of the "luffy_shaping" mode.
    """
    controller = schedule if isinstance(schedule, GuidanceController) else GuidanceController(schedule)
    if controller.probes:
        raise ValueError(
            "Adaptive(mode='probe') resamples groups after scoring them, which TRL's rollout_func contract (one "
            "completion per prompt entry, scored afterwards) cannot express; use Adaptive(mode='history')"
        )
    if isinstance(backend, str) and backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"backend must be one of {sorted(ROLLOUT_BACKENDS)} or a callable, got {backend!r}")
    if not isinstance(backend, str) and not callable(backend):
        raise TypeError(f"backend must be a name or a callable, got {type(backend).__name__}")
    if off_policy not in TRL_OFF_POLICY_MODES:
        raise ValueError(f"off_policy must be one of {TRL_OFF_POLICY_MODES}, got {off_policy!r}")
    if not answer_column:
        raise ValueError("answer_column must name the dataset column that holds the answers")
    if guided_per_group is not None and guided_per_group < 1:
        raise ValueError(f"guided_per_group must be None or >= 1, got {guided_per_group}")
    if not luffy_gamma > 0:
        raise ValueError(f"luffy_gamma must be > 0, got {luffy_gamma}")
    return GuidedRolloutFunc(
        controller,
        answer_column=answer_column,
        backend=backend,
        off_policy=off_policy,
        hint_template=hint_template,
        guided_per_group=guided_per_group,
        luffy_gamma=luffy_gamma,
    )


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------


def _check_guided_args(args, rollout_func: GuidedRolloutFunc) -> None:
    """Refuse settings under which the recorded log q is not what TRL's ratios assume."""
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
    if rollout_func.backend == "vllm" and not (args.use_vllm and args.vllm_mode == "colocate"):
        raise ValueError("backend='vllm' samples with TRL's colocated engine: set use_vllm=True, vllm_mode='colocate'")
    if rollout_func.backend == "vllm" and args.vllm_enable_sleep_mode:
        raise ValueError("backend='vllm' does not wake a sleeping engine: set vllm_enable_sleep_mode=False")
    if rollout_func.backend == "vllm" and args.vllm_tensor_parallel_size != 1:
        raise ValueError(
            "backend='vllm' drives each process's engine with that process's prompts: set vllm_tensor_parallel_size=1"
        )
    if rollout_func.backend == "hf" and args.use_vllm:
        raise ValueError("backend='hf' samples with the trained model; with use_vllm=True use backend='vllm'")
    if args.use_vllm and not args.vllm_importance_sampling_correction:
        raise ValueError(
            "a vLLM engine samples the rollouts, so the engine-mismatch correction must stay on: set "
            "vllm_importance_sampling_correction=True"
        )
    if args.use_vllm:
        engine_importance_config(args)  # raises on settings it cannot express
    generate_every = args.steps_per_generation * args.num_iterations
    if rollout_func.off_policy == "luffy_shaping" and args.gradient_accumulation_steps % generate_every:
        raise ValueError(
            "off_policy='luffy_shaping' equals LUFFY's gradient only at θ = θ_old: it needs every generation "
            "batch used within one optimizer step (num_iterations=1, steps_per_generation dividing "
            "gradient_accumulation_steps)"
        )
    if rollout_func.guided_per_group is not None and rollout_func.guided_per_group > args.num_generations:
        raise ValueError(
            f"guided_per_group ({rollout_func.guided_per_group}) must not exceed num_generations "
            f"({args.num_generations})"
        )


def _pad_columns(tensor: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """Right-pad `[R, L]` to `[R, width]` (TRL may pad completions wider than the rollout's longest)."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


class GuidedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` trained on answer-guided rollouts from a `guided_rollout_func`.

    Takes GRPOTrainer's arguments unchanged; `rollout_func` must come from `guided_rollout_func`. After TRL
    scores a generation batch, the trainer multiplies each token's advantage by the off-policy weight of the
    rollout function's mode (π_trainer/π_engine included when a vLLM engine sampled), records every group's
    rewards in the controller, and logs the `guidance/*` metrics. The controller's state is saved in each
    checkpoint (`prodsample_guidance.json`) and restored by `train(resume_from_checkpoint=...)`.

    Attributes:
        generation_rows: the dataset rows of the batch being generated (the rollout function reads answers here).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        *positional,
        rollout_func: GuidedRolloutFunc | None = None,
        **kwargs,
    ):
        if not isinstance(rollout_func, GuidedRolloutFunc):
            raise TypeError(
                "GuidedGRPOTrainer needs rollout_func=prodsample.trl.guided_rollout_func(...), got "
                f"{type(rollout_func).__name__}"
            )
        if kwargs.get("tools") or kwargs.get("environment_factory"):
            raise ValueError("guided rollouts are single-turn: tools and environment_factory are not supported")
        if args is not None:  # before GRPOTrainer loads a model or starts a vLLM engine
            _check_guided_args(args, rollout_func)
        super().__init__(model, reward_funcs, args, *positional, rollout_func=rollout_func, **kwargs)
        if args is None:  # GRPOTrainer built its default config
            _check_guided_args(self.args, rollout_func)
        # TRL recomputes π_old for the engine-mismatch weight only when an engine samples.
        self.engine_config = engine_importance_config(self.args) if self.use_vllm else None
        self.generation_rows: list[dict] | None = None
        self._batch_rewards: torch.Tensor | None = None
        check_tokenizer_matches(self.accelerator.unwrap_model(self.model), self.processing_class)
        self._check_answers(self.train_dataset, "train_dataset")
        self._check_answers(self.eval_dataset, "eval_dataset")
        self._warn_if_never_plain()

    def _warn_if_never_plain(self) -> None:
        end_step, max_steps = self.rollout_func.controller.schedule.end_step, self.args.max_steps
        if end_step is None:
            warnings.warn(
                "the schedule never reaches lam = 1: the policy keeps training on guided rollouts and never learns "
                "without the answer's help",
                UserWarning,
                stacklevel=3,
            )
        elif max_steps > 0 and end_step > max_steps:
            warnings.warn(
                f"the schedule reaches lam = 1 at step {end_step} but training stops at max_steps={max_steps}: "
                "the policy never trains without the answer's help",
                UserWarning,
                stacklevel=3,
            )

    def _check_answers(self, dataset, name: str) -> None:
        """Every row of a map-style dataset has an answer (iterable ones are checked batch by batch)."""
        column_names = getattr(dataset, "column_names", None)
        if not isinstance(column_names, list) or not hasattr(dataset, "__getitem__"):
            return
        column = self.rollout_func.answer_column
        if column not in column_names:
            raise ValueError(f"{name} has no {column!r} column (answer_column); its columns are {column_names}")
        for index, answer in enumerate(dataset[column]):
            if answer is None or not str(answer).strip():
                raise ValueError(f"{name} row {index} has no answer in column {column!r}")

    # -- after scoring: weights, controller, metrics --------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # TRL's total reward (gathered over processes); NaN where every reward function returned None.
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        self._batch_rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), math.nan)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self.generation_rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.generation_rows = None
        batch = self.rollout_func.last_batch
        rollout, device = batch.rollout, output["advantages"].device
        width = output["completion_ids"].shape[1]
        mask = _pad_columns(rollout.completion_mask, width, False).to(device)
        logprobs = _pad_columns(rollout.logprobs, width).to(device)
        plain_logprobs = _pad_columns(rollout.plain_logprobs, width).to(device)
        # With an engine, TRL recomputed π_old with the trained model: the engine weight is π_old/π_engine.
        trainer_logprobs = output["old_per_token_logps"] if self.use_vllm else None
        weights = off_policy_mode_weights(
            self.rollout_func.off_policy,
            logprobs,
            plain_logprobs,
            mask,
            rollout.guided.to(device),
            trainer_logprobs,
            engine=self.engine_config or ImportanceConfig(),
            luffy_gamma=self.rollout_func.luffy_gamma,
        )
        output["advantages"] = output["advantages"].unsqueeze(1) * weights.weights
        if self.use_vllm:
            # TRL's own ratio (π_old over the sampling log-probs, i.e. over q) would correct the guidance a second
            # time; the weights above already hold the engine correction.
            output["importance_sampling_ratio"] = torch.ones_like(output["importance_sampling_ratio"])
        self._record_guidance(batch, logprobs, plain_logprobs, mask, weights)
        return output

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rollout tensor over processes, in TRL's global (group-contiguous) order."""
        flags = tensor.dtype == torch.bool
        tensor = tensor.to(self.accelerator.device, torch.uint8 if flags else tensor.dtype)
        if tensor.dim() > 1:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1)
        gathered = self.accelerator.gather(tensor)
        return gathered.bool() if flags else gathered

    def _record_guidance(self, batch: GuidedBatch, logprobs, plain_logprobs, mask, weights: OffPolicyWeights) -> None:
        mode = "train" if self.model.training else "eval"
        rollout = batch.rollout
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        texts = self.processing_class.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
        leaked = torch.tensor(hint_leakage(texts, batch.answers, self.rollout_func.hint_template))
        lam = self._gather_rows(rollout.lam)
        rewards = self._batch_rewards
        token_count = mask.sum().double()
        clipped_tokens = weights.clipped_fraction.double() * token_count
        clipped, tokens = self._gather_rows(torch.stack([clipped_tokens, token_count]).unsqueeze(0)).sum(0)

        if mode == "train":
            keys = gather_object(batch.prompt_keys)
            groups = [keys[start : start + group_size] for start in range(0, len(keys), group_size)]
            if any(group != [group[0]] * group_size for group in groups):
                raise RuntimeError("TRL's generation batch is not made of contiguous groups of num_generations")
            self.rollout_func.controller.record(
                self.state.global_step,
                [group[0] for group in groups],
                lam.view(-1, group_size).amin(dim=1).tolist(),
                rewards.view(-1, group_size).tolist(),
            )
        metrics = guidance_metrics(
            lam=lam.cpu(),
            guided=self._gather_rows(rollout.guided).cpu(),
            desynced=self._gather_rows(rollout.desynced).cpu(),
            leaked=self._gather_rows(leaked).cpu(),
            rewards=rewards.cpu(),
            group_size=group_size,
            success_threshold=self.rollout_func.controller.success_threshold,
            logprobs=self._gather_rows(logprobs).cpu(),
            plain_logprobs=self._gather_rows(plain_logprobs).cpu(),
            mask=self._gather_rows(mask).cpu(),
            weights=self._gather_rows(weights.weights).cpu(),
            clipped_fraction=float(clipped / tokens) if tokens > 0 else 0.0,
        )
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), checkpoint)
            with open(os.path.join(folder, CHECKPOINT_FILE), "w") as file:
                json.dump({"controller": self.rollout_func.controller.state_dict()}, file)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by GuidedGRPOTrainer, so the schedule and the "
                "controller's records cannot resume where they were"
            )
        with open(path) as file:
            restored = GuidanceController.from_state_dict(json.load(file)["controller"])
        current = self.rollout_func.controller
        if restored.schedule != current.schedule:
            warnings.warn(
                f"resuming with the checkpoint's schedule {restored.schedule} instead of {current.schedule}",
                UserWarning,
                stacklevel=2,
            )
        self.rollout_func.controller = restored


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------------


class HeldOutEvalCallback(TrainerCallback):
    """Evaluates the plain policy (λ = 1, no hint) on a fixed held-out set every `eval_steps` steps.

    Logs, through the trainer's logging (`report_to`), `heldout/pass@1` (greedy), and `heldout/mean@k` and
    `heldout/pass@k` over `num_samples` = k rollouts per problem at the training temperature, top-k, top-p and
    min-p, with a fixed noise seed, so every evaluation point sees the same draws for the same policy. A
    problem counts as solved when `verifier` scores it above `success_threshold`. Generation uses the trained
    model (`prodsample.hf`); under `accelerate launch` each process evaluates a shard.

    Args:
        trainer: the `GRPOTrainer` (or `GuidedGRPOTrainer`) being trained.
        dataset: held-out rows with a "prompt" and `answer_column` (and whatever the verifier reads).
        verifier: a TRL reward function, `verifier(prompts=..., completions=..., completion_ids=..., **columns)`.
        eval_steps: evaluate at every multiple of this global step (and at step 0 when `eval_on_start`).

    Attributes:
        history: one dict per evaluation, {"step": …, "heldout/…": …}.
    """

    def __init__(
        self,
        trainer,
        dataset,
        verifier: Callable[..., list[float]],
        *,
        eval_steps: int,
        num_samples: int = 8,
        answer_column: str = "answer",
        success_threshold: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        eval_on_start: bool = True,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if len(dataset) == 0:
            raise ValueError("dataset must hold at least one held-out row")
        if "prompt" not in dataset.column_names or answer_column not in dataset.column_names:
            raise ValueError(f"dataset needs 'prompt' and {answer_column!r} columns, has {dataset.column_names}")
        self.trainer = trainer
        self.dataset = dataset
        self.verifier = verifier
        self.eval_steps = eval_steps
        self.num_samples = num_samples
        self.answer_column = answer_column
        self.success_threshold = success_threshold
        self.batch_size = batch_size
        self.seed = seed
        self.eval_on_start = eval_on_start
        self.history: list[dict] = []

    def _solved(self, rows: list[dict], rollout: GuidedRollout, repeats: int) -> list[bool]:
        rows = [row for row in rows for _ in range(repeats)]
        texts = self.trainer.processing_class.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
        prompts = [row["prompt"] for row in rows]
        completions = (
            [[{"role": "assistant", "content": text}] for text in texts]
            if is_conversational({"prompt": prompts[0]})
            else texts
        )
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        rewards = self.verifier(
            prompts=prompts,
            completions=completions,
            completion_ids=rollout.completion_lists(),
            trainer_state=self.trainer.state,
            **columns,
        )
        return [reward is not None and float(reward) > self.success_threshold for reward in rewards]

    def evaluate(self) -> dict[str, float]:
        """Run the evaluation now (every process) and return the metrics."""
        trainer, args = self.trainer, self.trainer.args
        accelerator = trainer.accelerator
        shard = range(accelerator.process_index, len(self.dataset), accelerator.num_processes)
        greedy, sampled = [], []
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
            for start in range(0, len(shard), self.batch_size):
                rows = [self.dataset[i] for i in shard[start : start + self.batch_size]]
                prompts = [row["prompt"] for row in rows]
                answers = [str(row[self.answer_column]) for row in rows]
                common = dict(lam=1.0, max_new_tokens=args.max_completion_length)
                plain = guided_generate(model, trainer.processing_class, prompts, answers, temperature=0, **common)
                drawn = guided_generate(
                    model,
                    trainer.processing_class,
                    prompts,
                    answers,
                    num_generations=self.num_samples,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    min_p=args.min_p,
                    seed=_rollout_seed(self.seed, "heldout", accelerator.process_index, start),
                    **common,
                )
                greedy += self._solved(rows, plain, 1)
                solved = self._solved(rows, drawn, self.num_samples)
                sampled += [sum(solved[i : i + self.num_samples]) for i in range(0, len(solved), self.num_samples)]
        greedy, sampled = gather_object(greedy), gather_object(sampled)
        k = self.num_samples
        return {
            "heldout/pass@1": sum(greedy) / len(greedy),
            f"heldout/mean@{k}": sum(sampled) / (k * len(sampled)),
            f"heldout/pass@{k}": sum(count > 0 for count in sampled) / len(sampled),
        }

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start and state.global_step == 0:
            metrics = self.evaluate()
            self.history.append({"step": 0, **metrics})
            # Trainer.log, not GRPOTrainer.log: nothing of TRL's is pending yet, and GRPOTrainer.log would file
            # these under "eval_" while the model is not yet in training mode.
            Trainer.log(self.trainer, dict(metrics))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps:
            return
        metrics = self.evaluate()
        self.history.append({"step": state.global_step, **metrics})
        # Into TRL's metric buffer, and a log now: the values reach report_to at this very step.
        for name, value in metrics.items():
            self.trainer._metrics["train"][name].append(value)
        control.should_log = True
