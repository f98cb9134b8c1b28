"""The guided agent-loop manager for verl's V1 trainer (`trainer.use_v1=true`, verl 0.9.1's default).

The V1 trainer hands its manager a TensorDict and reads the trajectories back from TransferQueue, where verl's
`AgentLoopWorkerTQ` puts each one as its loop finishes (`generate_sequences` returns before they run). These
classes are verl's TransferQueue manager and worker, with the batch's `RolloutStep` visible to the loops, as
`GuidedAgentLoopWorker` does for the V0 trainer. `GuidedAgentLoopManager.create` builds this manager under
the V1 trainer, so the recipe names one manager for both. Imports verl's V1 trainer package, which needs the
`transferqueue` distribution: loaded only under the V1 trainer.
"""

from __future__ import annotations

import ray
import transfer_queue
from verl.experimental.agent_loop import AgentLoopWorker
from verl.trainer.ppo.v1 import AgentLoopManagerTQ, AgentLoopWorkerTQ

from .rollout_step import rollout_step_of_batch

__all__ = ["GuidedAgentLoopManagerTQ", "GuidedAgentLoopWorkerTQ"]


class GuidedAgentLoopWorkerTQ(AgentLoopWorkerTQ.__ray_actor_class__):
    """verl's TransferQueue agent-loop worker, with the batch's `RolloutStep` visible to the loops it starts
    (each loop's task copies the context variable when `generate_sequences` creates it)."""

    def __init__(self, *args, **kwargs) -> None:
        # verl's AgentLoopWorkerTQ.__init__, step by step (verl 0.9.1): its own `super()` fails in a subclass's
        # actor, where Ray has unpickled that class by value (its module's name holds the actor class, not it),
        # so the class `super()` names is a copy of the one in this class's bases.
        AgentLoopWorker.__init__(self, *args, **kwargs)
        transfer_queue.init()
        self.background_tasks = set()

    async def generate_sequences(self, batch) -> None:
        with rollout_step_of_batch(_value(batch, "global_steps", None), _value(batch, "validate", False)):
            await super().generate_sequences(batch)


class GuidedAgentLoopManagerTQ(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager running `GuidedAgentLoopWorkerTQ`s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # sets verl's worker class, replaced here before create() starts workers
        self.agent_loop_workers_class = ray.remote(GuidedAgentLoopWorkerTQ)


def _value(batch, name: str, default):
    """A TensorDict entry's value (indexing unwraps a NonTensorData; `.get` would not), or `default`."""
    return batch[name] if name in batch else default
