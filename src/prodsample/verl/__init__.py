"""verl integration: guided rollouts as a verl agent loop, switched on by configuration (docs/verl.md).

prodsample registers this package under verl's `verl.plugins` entry point, which `import verl` loads in every
process. Loading it registers:

- `GuidedAgentLoop` (agent name "prodsample_guided"): per trajectory, the plain prompt and the prompt with
  the answer as a hint (`prodsample.prompts.add_hint`) become the two tagged requests of a guided rollout
  (`prodsample.vllm.guided_call.rollout_requests`), sent at once with one request id, which verl's load balancer
  routes to one replica (sticky sessions). λ comes from a `GuidanceController` over the configured schedule,
  per training step and group; validation runs plain (λ = 1). The trajectory returned is the plain one with
  log q as `response_logprobs` (verl's `rollout_log_probs`, the behaviour log-prob its rollout correction
  weighs with), and λ, guided and desync flags in `extra_fields`;
- `GuidedVllmReplica` (`prodsample.verl.server`) for the rollout name "vllm": its server hands each
  rollout's records out with the rollout's last request.

`GuidedAgentLoopManager` (`actor_rollout_ref.rollout.agent.agent_loop_manager_class`) runs verl's agent-loop
workers with the batch's training step and validation flag visible to the loops, which verl's
`AgentLoopBase.run` does not receive. A trajectory whose pair lost step is flagged (`prodsample_desynced`)
and never counted as guided; one whose records did not come back (its requests reached different servers,
or failed) is flagged (`prodsample_records` False) and masked out of the loss (its `response_mask` is 0).
`guidance_metrics_of` turns a batch's flags into the `guidance/*` metrics.
"""

from __future__ import annotations

from verl.workers.rollout.replica import RolloutReplicaRegistry

from .agent_loop import (
    AGENT_NAME,
    GuidedAgentLoop,
    GuidedAgentLoopManager,
    GuidedAgentLoopWorker,
    guidance_metrics_of,
)
from .rollout_step import RolloutStep

__all__ = [
    "AGENT_NAME",
    "GuidedAgentLoop",
    "GuidedAgentLoopManager",
    "GuidedAgentLoopWorker",
    "RolloutStep",
    "guidance_metrics_of",
]


def _guided_vllm_replica():
    from .server import GuidedVllmReplica

    return GuidedVllmReplica


# Loading the plugin: the "vllm" rollout runs prodsample's server (untagged requests pass through it untouched).
RolloutReplicaRegistry.register("vllm", _guided_vllm_replica)
