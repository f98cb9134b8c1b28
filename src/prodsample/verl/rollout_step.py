"""What a guided loop must know of the batch it runs in, which verl's `AgentLoopBase.run` does not receive: the
training step and whether it validates. The agent-loop workers of both of verl's trainers
(`prodsample.verl.agent_loop.GuidedAgentLoopWorker`, V0; `prodsample.verl.transfer_queue.GuidedAgentLoopWorkerTQ`,
V1) set it per batch in a context variable, which each loop's task copies when the worker creates it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

__all__ = ["RolloutStep", "current_rollout_step", "rollout_step_of_batch"]


class RolloutStep(NamedTuple):
    """What a loop must know of the batch it runs in: the training step, and whether it validates."""

    step: int
    validate: bool


_ROLLOUT_STEP: ContextVar[RolloutStep | None] = ContextVar("prodsample_rollout_step", default=None)


@contextmanager
def rollout_step_of_batch(global_steps, validate) -> Iterator[None]:
    """The batch's `RolloutStep`, visible to the loops started inside."""
    if global_steps is None:
        raise ValueError("prodsample's agent loop needs the batch's global_steps (verl's PPO trainer sets it)")
    token = _ROLLOUT_STEP.set(RolloutStep(int(global_steps), bool(validate)))
    try:
        yield
    finally:
        _ROLLOUT_STEP.reset(token)


def current_rollout_step() -> RolloutStep | None:
    """The `RolloutStep` of the batch this loop runs in; None outside a guided worker's batch."""
    return _ROLLOUT_STEP.get()
