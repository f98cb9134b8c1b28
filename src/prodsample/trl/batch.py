"""One generation batch's state, shared by the rollout function and the trainer, and its view over processes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from ..controller import GuidanceController
from ..grpo import baseline_keeping_advantages, self_distill_token_advantages
from ..importance import ImportanceConfig, OffPolicyWeights, effective_sample_size, off_policy_mode_weights
from ..metrics import guidance_metrics, self_distill_metrics
from ..rollout import GuidedRollout

__all__ = ["GuidedBatch", "GatheredBatch", "OpenBatches", "gather_batch", "prompt_key"]

# TRL's GRPO divides by the group's std + 1e-4 (with Bessel's correction); the baseline-keeping advantages
# follow it, so that they equal TRL's when q = π.
TRL_STD_EPS = 1e-4


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


class OpenBatches:
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
        lam, guided, desynced: each rollout's λ, whether it was guided, or lost guidance (vLLM).
        leaked, echoed: whether it stated the answer before deriving it
            (`prodsample.prompts.answer_without_derivation`), and whether it restated the hint
            (`prodsample.prompts.hint_leakage`).
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
    echoed: torch.Tensor
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
            echoed=self.echoed.cpu(),
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
    echoed: torch.Tensor,
    trainer_logprobs=None,
    teacher_logprobs=None,
) -> GatheredBatch:
    """`batch` over every process, its per-token tensors first right-padded to TRL's completion width `width`.

    `leaked` and `echoed` are bool `[R]` for this process's rollouts (`GatheredBatch`); `trainer_logprobs` TRL's π_old `[R, width]` or None;
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
        echoed=_gather_rows(accelerator, echoed),
        logprobs=tokens(rollout.logprobs),
        plain_logprobs=tokens(rollout.plain_logprobs),
        trainer_logprobs=None if trainer_logprobs is None else tokens(trainer_logprobs),
        mask=tokens(rollout.completion_mask, False),
        process_rows=slice(first, first + len(rollout)),
        teacher_logprobs=None if teacher_logprobs is None else tokens(teacher_logprobs),
    )
