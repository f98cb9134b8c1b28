"""TRL's `rollout_func` for answer-guided rollouts: λ per group from the controller, sampled by a backend."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..controller import GuidanceController
from ..grpo import DEFAULT_DISTILL_CLIP, DistillCoefficient
from ..prompts import DEFAULT_HINT_TEMPLATE
from ..schedules import Schedule
from ..settings import SamplingSettings, check_integer
from .backends import ROLLOUT_BACKENDS, RolloutBackend
from .batch import prompt_key
from .off_policy import DEFAULT_OFF_POLICY_MODE, TRL_OFF_POLICY_MODES

__all__ = ["GuidedRolloutFunc", "guided_rollout_func", "rollout_seed"]


def rollout_seed(*parts) -> int:
    """A keyed-noise seed that differs per (run seed, mode, step, process, call) and repeats on resume."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, prodsample.settings.SEED_BOUND


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
        # GuidedGRPOTrainer, named by what it offers: the trainer module builds on this one.
        if not callable(getattr(trainer, "guided_batch", None)):
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
        settings = SamplingSettings(
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
        rollout = backend(trainer, [prompts[i] for i in firsts], [batch.answers[i] for i in firsts], settings)
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
        return rollout_seed(trainer.args.seed, mode, step, trainer.accelerator.process_index, self._calls)


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
    if guided_per_group is not None:
        check_integer(guided_per_group, "guided_per_group", low=1)
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
