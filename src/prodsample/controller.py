"""`GuidanceController`: the framework-free piece a trainer calls to get λ per group and to report rewards.

It owns a schedule and what it has seen of each prompt, and checkpoints both. The TRL adapter
(`prodsample.trl`) uses it; a custom loop or another framework (verl, OpenRLHF) can use it the same way:

    controller = GuidanceController(Linear(start=0.5, end_step=200))
    for step, batch in enumerate(loader):
        lams = controller.lambdas(step, batch.prompt_keys)            # one λ per prompt (group)
        rollouts = guided_generate(model, tok, batch.prompts, batch.answers, lam=lams, ...)
        controller.record(step, batch.prompt_keys, lams, group_rewards)  # success rate per group
"""

from __future__ import annotations

from collections.abc import Sequence

from .schedules import Adaptive, PromptRecord, Schedule, schedule_from_dict

__all__ = ["GuidanceController"]


class GuidanceController:
    """Schedule + per-prompt history → λ per group of rollouts.

    Args:
        schedule: any `prodsample.schedules.Schedule`.
        success_threshold: a rollout counts as a success when its reward is above this.
    """

    def __init__(self, schedule: Schedule, *, success_threshold: float = 0.0):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a prodsample.schedules.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.success_threshold = success_threshold
        self.records: dict[str, PromptRecord] = {}

    def lambdas(self, step: int, prompt_keys: Sequence[str]) -> list[float]:
        """λ for each group (one per prompt key) at `step`."""
        return self.schedule.group_lambdas(step, [self.records.get(key) for key in prompt_keys])

    @property
    def probes(self) -> bool:
        """True when groups are first sampled plain and all-fail ones resampled (Guide-GRPO style)."""
        return isinstance(self.schedule, Adaptive) and self.schedule.mode == "probe"

    def followup_lambdas(self, step: int, group_rewards: Sequence[Sequence[float]]) -> list[float | None]:
        """Probe mode: λ to resample each plain group with, or None where the group needs no help."""
        guided = self.schedule.value(step)
        return [
            guided if guided < 1.0 and self._success_rate(rewards) <= self.schedule.solved_rate else None
            for rewards in group_rewards
        ]

    def record(
        self, step: int, prompt_keys: Sequence[str], lambdas: Sequence[float], group_rewards: Sequence[Sequence[float]]
    ) -> None:
        """Remember each group's λ and success rate (the last group of a prompt wins)."""
        if not len(prompt_keys) == len(lambdas) == len(group_rewards):
            raise ValueError(
                f"prompt_keys, lambdas and group_rewards must have one entry per group, got "
                f"{len(prompt_keys)}, {len(lambdas)} and {len(group_rewards)}"
            )
        for key, lam, rewards in zip(prompt_keys, lambdas, group_rewards):
            self.records[key] = PromptRecord(float(lam), self._success_rate(rewards), int(step))

    def _success_rate(self, rewards: Sequence[float]) -> float:
        return sum(float(r) > self.success_threshold for r in rewards) / max(len(rewards), 1)

    def state_dict(self) -> dict:
        return {
            "schedule": self.schedule.to_dict(),
            "success_threshold": self.success_threshold,
            "records": {key: [r.lam, r.success_rate, r.step] for key, r in self.records.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> GuidanceController:
        controller = cls(schedule_from_dict(state["schedule"]), success_threshold=state["success_threshold"])
        controller.records = {key: PromptRecord(*values) for key, values in state["records"].items()}
        return controller

    def load_state_dict(self, state: dict) -> None:
        """Restore, in place, what `state_dict` saved (schedule, threshold and records): whoever holds this
        controller sees the restored one, as a trainer resuming from a checkpoint needs."""
        restored = GuidanceController.from_state_dict(state)
        self.schedule, self.success_threshold, self.records = restored.schedule, restored.success_threshold, restored.records
