"""A lean, framework-free GRPO loop over `guided_generate` and `GuidanceController`, and the arms it runs.

One step: take the next `prompts_per_step` problems of the RL set (a seeded shuffle, epoch after epoch),
ask the controller for λ per group, generate G rollouts per prompt, score them with the verifier, and take
one optimiser step on the GRPO objective (`prodsample.grpo`) with π_old = π_θ (one update per batch, so the
PPO ratio is 1 and only the importance weights and advantages shape the gradient). The policy's log-probs
are recomputed under the *plain* prompt: the trained policy never sees the hint. The generator is the
trained model itself in float32, so there is no engine mismatch to correct.

Cost is counted as the protocol defines it: rollouts consumed (every rollout generated, probes included) and
generated row-tokens (a completion token costs one row, two when its rollout was guided: plain + guide).
This loop doubles as the short custom-loop example for the framework-free controller (issue 6).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from prodsample.controller import GuidanceController
from prodsample.grpo import (
    DistillCoefficient,
    baseline_keeping_advantages,
    group_advantages,
    grpo_loss,
    self_distill_kl_loss,
)
from prodsample.importance import OFF_POLICY_MODES, off_policy_weights
from prodsample.rollout import GuidedRollout
from prodsample.schedules import Adaptive, Constant, Linear, Piecewise, Schedule

from .evaluate import completions_rewards, evaluate
from prodsample.hf import build_contexts, guided_generate
from .task import HINT_TEMPLATE, MAX_NEW_TOKENS, Problem


@dataclass(frozen=True)
class Arm:
    """What defines an arm; everything else is the shared `RunConfig`.

    guidance: "plain" (λ = 1 throughout), "annealed" (λ linear from `lam_start` to 1), "probe" (plain first,
        all-fail groups resampled at the annealed λ: Guide-GRPO), "history" (annealed λ only for prompts not
        yet solved plainly: `Adaptive(mode="history")`), "star" (λ = 0 throughout).
    off_policy: a key of `prodsample.importance.OFF_POLICY_MODES` (per-token weights on the "grpo" objective).
    objective: "grpo" (group advantages, token mean), "baseline_keeping" (self-normalised sequence-level π/q
        weights with the baseline taken under them, `prodsample.grpo.baseline_keeping_advantages`; each
        rollout's token sum over MAX_NEW_TOKENS), or "star" (maximum likelihood on the rewarded rollouts under
        the plain prompt).
    self_distill: add β·KL(π(·|prompt, o<t) ‖ sg π(·|prompt ⊕ hint, o<t)) on every rollout's positions, β from
        `RunConfig.distill_coef` linearly to 0 at the last step. The full-vocabulary KL (the vocabulary has 19
        tokens), so guided rollouts need no token weight; the hinted forward is teacher-forced on the rollout.
    group_multiplier: rollouts per prompt as a multiple of the shared G.
    """

    guidance: str = "plain"
    off_policy: str = "none"
    objective: str = "grpo"
    self_distill: bool = False
    group_multiplier: int = 1


ARMS: dict[str, Arm] = {
    "plain": Arm(),
    "plain_2g": Arm(group_multiplier=2),
    "annealed_none": Arm(guidance="annealed"),
    "annealed_is": Arm(guidance="annealed", off_policy="token_truncate"),
    "guide_grpo": Arm(guidance="probe"),
    "star": Arm(guidance="star", objective="star"),
    "adaptive": Arm(guidance="history"),
    "annealed_bk": Arm(guidance="annealed", objective="baseline_keeping"),
    "self_distill_plain": Arm(self_distill=True),
    "self_distill_annealed": Arm(guidance="annealed", self_distill=True),
}


@dataclass(frozen=True)
class RunConfig:
    """Hyper-parameters shared by every arm (PROTOCOL.md fixes their values)."""

    steps: int = 2000
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4  # pilots: 3e-4 and above make the policy worse; 3e-5 barely moves it
    warmup_steps: int = 50  # linear lr warm-up: Adam's first, sign-like steps on a noisy gradient do harm
    temperature: float = 1.0
    clip_eps: float = 0.2
    lam_start: float = 0.5
    anneal_fraction: float = 0.5  # λ reaches 1 at this fraction of the steps
    anneal_hold_fraction: float = 0.0  # λ stays at lam_start up to this fraction, then rises linearly
    eval_every: int = 200
    eval_k: int = 8
    threads: int = 1
    distill_coef: float = 1.0  # β at step 0 of the self_distill arms, linear to 0 at the last step (not piloted yet)
    bk_truncate: float = math.inf  # c of the baseline-keeping weights: w̃ cut at c/G, renormalised (inf: not cut)

    @property
    def anneal_steps(self) -> int:
        return max(1, round(self.anneal_fraction * self.steps))

    @property
    def hold_steps(self) -> int:
        return round(self.anneal_hold_fraction * self.steps)


def make_schedule(arm: Arm, config: RunConfig) -> Schedule:
    if config.hold_steps >= config.anneal_steps:
        raise ValueError(f"anneal_hold_fraction ({config.anneal_hold_fraction}) must be below anneal_fraction "
                         f"({config.anneal_fraction})")
    annealed = (
        Piecewise(points=((0, config.lam_start), (config.hold_steps, config.lam_start), (config.anneal_steps, 1.0)))
        if config.hold_steps else Linear(start=config.lam_start, end_step=config.anneal_steps)
    )
    return {
        "plain": lambda: Constant(lam=1.0),
        "annealed": lambda: annealed,
        "probe": lambda: Adaptive(base=annealed, mode="probe"),
        "history": lambda: Adaptive(base=annealed, mode="history"),
        "star": lambda: Constant(lam=0.0, end_step=config.steps),
    }[arm.guidance]()


def vocabulary_logprobs(
    model, contexts: list[list[int]], rollout: GuidedRollout, pad_id: int, temperature: float
) -> torch.Tensor:
    """Teacher-forced log π_θ(· | context, o<t) at `temperature` over the vocabulary, `[R, L, V]`, with gradient.

    `contexts` holds one prompt per rollout: `rollout.prompt_ids` (plain) or the hinted prompts.
    """
    width = max(map(len, contexts))
    prompts = torch.full((len(rollout), width), pad_id)
    prompt_mask = torch.zeros((len(rollout), width), dtype=torch.long)
    for row, ids in enumerate(contexts):
        prompts[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
    input_ids = torch.cat([prompts, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, rollout.completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    predicting = logits[:, width - 1 : -1].float() / temperature
    return torch.log_softmax(predicting, dim=-1)


def token_logprobs(vocabulary: torch.Tensor, rollout: GuidedRollout) -> torch.Tensor:
    """The sampled tokens' entries of `[R, L, V]` log-probs, `[R, L]`."""
    return vocabulary.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


@dataclass
class StepStats:
    """Counters since the start of the run, and figures for the log averaged over what they count.

    A rollout figure is a mean over every rollout since the last flush, a group figure over every group, so
    a step that generates twice (Guide-GRPO's probe batch and its smaller resample batch) counts each batch
    by its size, not as two equal halves.
    """

    rollouts: int = 0
    row_tokens: int = 0
    totals: dict[str, list[float]] = field(default_factory=dict)  # figure → [weighted sum, weight]

    def record(self, name: str, total: float, weight: float) -> None:
        """Add `total` (a sum over `weight` items) to the figure `name`."""
        entry = self.totals.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += weight

    def add(self, rollout: GuidedRollout, rewards: torch.Tensor, group_size: int, lams: list[float]) -> None:
        """One generated batch: `rewards` `[R]` in groups of `group_size`, `lams` one λ per group."""
        lengths = rollout.completion_mask.sum(dim=1)
        self.rollouts += len(rollout)
        self.row_tokens += int((lengths * (1 + rollout.guided.long())).sum())
        groups = rewards.view(-1, group_size)
        guided, plain = rewards[rollout.guided], rewards[~rollout.guided]
        self.record("reward", rewards.sum().item(), len(rewards))
        self.record("guided_reward", guided.sum().item(), len(guided))
        self.record("plain_reward", plain.sum().item(), len(plain))
        self.record("guided_share", rollout.guided.sum().item(), len(rollout))
        self.record("informative_groups", (groups.std(dim=1) > 0).sum().item(), len(groups))
        self.record("all_fail_groups", (groups.max(dim=1).values == 0).sum().item(), len(groups))
        self.record("lam_mean", sum(lams), len(lams))

    def flush(self) -> dict:
        """Each figure's mean since the last flush (None where it counted nothing)."""
        summary = {name: total / weight if weight else None for name, (total, weight) in self.totals.items()}
        self.totals = {}
        return summary


class Batch(NamedTuple):
    """One step's training data: the rollouts, their rewards `[R]`, and the problem of each group."""

    rollout: GuidedRollout
    rewards: torch.Tensor
    problems: list[Problem]  # indexed by `rollout.group_ids`


class GRPORun:
    """One arm, one seed: the model, optimiser, controller and RL-set order, stepped by `step()`."""

    def __init__(self, arm: Arm, config: RunConfig, seed: int, model, tokenizer, rl_set: list[Problem]):
        self.arm, self.config, self.seed = arm, config, seed
        self.model, self.tokenizer, self.rl_set = model, tokenizer, rl_set
        self.group_size = config.group_size * arm.group_multiplier
        self.controller = GuidanceController(make_schedule(arm, config))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1))
        )
        self.guidance = OFF_POLICY_MODES[arm.off_policy]
        self.distill = None
        if arm.self_distill:
            self.distill = DistillCoefficient(config.distill_coef, Linear(start=0.0, end_step=config.steps))
        self.order: list[int] = []
        self.shuffle = random.Random(seed)
        self.stats = StepStats()

    def next_problems(self) -> list[Problem]:
        if len(self.order) < self.config.prompts_per_step:
            self.order += self.shuffle.sample(range(len(self.rl_set)), len(self.rl_set))
        batch, self.order = self.order[: self.config.prompts_per_step], self.order[self.config.prompts_per_step :]
        return [self.rl_set[i] for i in batch]

    def generate(self, problems: list[Problem], lams: list[float], step: int, salt: int = 0) -> tuple[GuidedRollout, torch.Tensor]:
        rollout = guided_generate(
            self.model, self.tokenizer, [p.prompt for p in problems], [p.answer for p in problems], lam=lams,
            num_generations=self.group_size, max_new_tokens=MAX_NEW_TOKENS, temperature=self.config.temperature,
            seed=(self.seed * 1_000_003 + step) * 2 + salt, hint_template=HINT_TEMPLATE,
        )
        rewards = completions_rewards(self.model, self.tokenizer, problems, rollout)
        self.stats.add(rollout, rewards, self.group_size, lams)
        return rollout, rewards

    @torch.no_grad()
    def rollouts(self, step: int) -> Batch:
        problems = self.next_problems()
        keys = [p.expression for p in problems]
        lams = self.controller.lambdas(step, keys)
        rollout, rewards = self.generate(problems, lams, step)
        group_rewards = rewards.view(-1, self.group_size).tolist()
        if self.controller.probes:  # Guide-GRPO: resample the groups that need help, guided, and train on both
            followup = self.controller.followup_lambdas(step, group_rewards)
            needy = [i for i, lam in enumerate(followup) if lam is not None]
            if needy:
                guided_lams = [followup[i] for i in needy]
                extra, extra_rewards = self.generate([problems[i] for i in needy], guided_lams, step, salt=1)
                self.controller.record(step, [keys[i] for i in needy], guided_lams,
                                       extra_rewards.view(-1, self.group_size).tolist())
                joined = GuidedRollout.concat([rollout, extra], pad_token_id=self.tokenizer.pad_token_id)
                return Batch(joined, torch.cat([rewards, extra_rewards]), problems + [problems[i] for i in needy])
        self.controller.record(step, keys, lams, group_rewards)
        return Batch(rollout, rewards, problems)

    def policy_loss(self, logprobs: torch.Tensor, rollout: GuidedRollout, rewards: torch.Tensor) -> torch.Tensor:
        """The arm's objective on `[R, L]` log π_θ(o_t | plain prompt)."""
        mask = rollout.completion_mask
        if self.arm.objective == "star":
            keep = mask & (rewards > 0).unsqueeze(1)
            return -(logprobs * keep).sum() / keep.sum().clamp_min(1)
        if self.arm.objective == "baseline_keeping":
            # π_old and q as the generator recorded them, from the same logits: at λ = 1 the ratio is exactly 1
            # (the generator is the trained model in float32, so π_old = π_θ up to rounding).
            weighted = baseline_keeping_advantages(rewards, rollout.plain_logprobs, rollout.logprobs, mask,
                                                   self.group_size, truncate=self.config.bk_truncate)
            rewarded = rewards > 0
            rewarded_weight = (self.group_size * weighted.weights[rewarded]).sum().item()
            self.stats.record("rewarded_weight", rewarded_weight, int(rewarded.sum()))
            return grpo_loss(logprobs, logprobs.detach(), weighted.loss_weights, mask, clip_eps=self.config.clip_eps,
                             max_new_tokens=MAX_NEW_TOKENS)
        weights = None
        if self.guidance is not None:
            weights = off_policy_weights(rollout.logprobs, rollout.plain_logprobs, mask, guidance=self.guidance).weights
        advantages = group_advantages(rewards, self.group_size)
        return grpo_loss(logprobs, logprobs.detach(), advantages, mask, weights=weights, clip_eps=self.config.clip_eps)

    def hinted_contexts(self, batch: Batch) -> list[list[int]]:
        """The hinted prompt of each rollout's problem, as token ids."""
        problems = batch.problems
        _, hinted = build_contexts(self.tokenizer, [p.prompt for p in problems], [p.answer for p in problems], HINT_TEMPLATE)
        return [hinted[group] for group in batch.rollout.group_ids.tolist()]

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        rollout, pad_id, temperature = batch.rollout, self.tokenizer.pad_token_id, self.config.temperature
        vocabulary = vocabulary_logprobs(self.model, rollout.prompt_ids, rollout, pad_id, temperature)
        loss = self.policy_loss(token_logprobs(vocabulary, rollout), rollout, batch.rewards)
        beta = self.distill.value(step) if self.distill is not None else 0.0
        if beta > 0:
            with torch.no_grad():  # the teacher: the same weights under the hinted prompt, no gradient
                teacher = vocabulary_logprobs(self.model, self.hinted_contexts(batch), rollout, pad_id, temperature)
            distill = self_distill_kl_loss(vocabulary, teacher, rollout.completion_mask, max_new_tokens=MAX_NEW_TOKENS)
            self.stats.record("distill_kl", distill.item() * MAX_NEW_TOKENS, 1)  # per rollout, summed over its tokens
            self.stats.record("distill_coef", beta, 1)
            loss = loss + beta * distill
        return loss

    def step(self, step: int) -> None:
        loss = self.loss(self.rollouts(step), step)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()


def run(arm_name: str, seed: int, config: RunConfig, model, tokenizer, rl_set, evaluate_policy, on_eval) -> None:
    """Train one arm from `model` (modified in place), calling `on_eval(record)` at every evaluation point.

    `evaluate_policy(model)` returns the figures an evaluation point records (see `run.py`).
    """
    torch.manual_seed(seed)
    trainer = GRPORun(ARMS[arm_name], config, seed, model, tokenizer, rl_set)
    start = time.perf_counter()
    for step in range(config.steps + 1):
        if step % config.eval_every == 0 or step == config.steps:
            figures = evaluate_policy(model)
            on_eval({
                "arm": arm_name, "seed": seed, "step": step, "rollouts": trainer.stats.rollouts,
                "row_tokens": trainer.stats.row_tokens, "seconds": round(time.perf_counter() - start, 1),
                "lam": trainer.controller.schedule.value(step), **figures, "train": trainer.stats.flush(),
            })
        if step < config.steps:
            trainer.step(step)


def config_dict(config: RunConfig) -> dict:
    return asdict(config) | {"arms": {name: asdict(arm) for name, arm in ARMS.items()}}
