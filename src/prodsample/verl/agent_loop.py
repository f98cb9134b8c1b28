"""`GuidedAgentLoop`: a guided rollout per trajectory in verl's agent loop, and the manager that tells the
loops the training step.

Per trajectory, the plain prompt and the prompt with the answer as a hint (`prodsample.prompts.add_hint`)
become the two tagged requests of a guided rollout (`prodsample.vllm.guided_call.rollout_requests`), sent at
once with one request id, which verl's load balancer routes to one replica (sticky sessions). λ comes from a
`GuidanceController` over the configured schedule, per training step and group; validation runs plain
(λ = 1). The trajectory returned is the plain one with log q as `response_logprobs`, and λ, guided and
desync flags in `extra_fields`.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopManager,
    AgentLoopOutput,
    AgentLoopWorker,
    register,
)
from transformers import AutoConfig
from verl.utils.profiler import simple_timer
from verl.workers.rollout.replica import TokenOutput
from verl.workers.rollout.utils import get_max_position_embeddings

from ..controller import GuidanceController
from ..vllm.guided_call import request_sampling_params, rollout_requests
from ..vllm.pacing import RolloutRequests, check_pairs_fit, settle
from ..vllm.pairing import RECORDS_KEY, RolloutRecord
from ..prompts import DEFAULT_HINT_TEMPLATE, add_hint
from ..schedules import Adaptive, Schedule, schedule_from_dict
from ..settings import SEED_BOUND, SamplingSettings, check_integer, is_guided
from .rollout_step import current_rollout_step, rollout_step_of_batch

__all__ = [
    "AGENT_NAME",
    "GuidedAgentLoop",
    "GuidedAgentLoopManager",
    "GuidedAgentLoopWorker",
    "guidance_metrics_of",
]

AGENT_NAME = "prodsample_guided"
# A trajectory's columns in verl's batch (non_tensor_batch, from AgentLoopOutput.extra_fields).
LAMBDA_FIELD = "prodsample_lam"
GUIDED_FIELD = "prodsample_guided"  # λ < 1, its records back, in step throughout
DESYNCED_FIELD = "prodsample_desynced"
CAUSE_FIELD = "prodsample_desync_cause"  # a prodsample.vllm.pairing.DesyncCause value, or None
RECORDS_FIELD = "prodsample_records"  # False: no records came back; the trajectory is masked out of the loss


class GuidedAgentLoopWorker(AgentLoopWorker):
    """verl's agent-loop worker, with the batch's `RolloutStep` visible to the loops it starts."""

    async def generate_sequences(self, batch):
        with rollout_step_of_batch(batch.meta_info.get("global_steps"), batch.meta_info.get("validate", False)):
            return await super().generate_sequences(batch)


class GuidedAgentLoopManager(AgentLoopManager):
    """verl's agent-loop manager running `GuidedAgentLoopWorker`s: set
    `actor_rollout_ref.rollout.agent.agent_loop_manager_class=prodsample.verl.GuidedAgentLoopManager`. Under
    verl's V1 trainer (`trainer.use_v1`), `create` builds its TransferQueue twin
    (`prodsample.verl.transfer_queue.GuidedAgentLoopManagerTQ`) instead."""

    def __init__(self, *args, **kwargs) -> None:
        self.agent_loop_workers_class = ray.remote(GuidedAgentLoopWorker)
        super().__init__(*args, **kwargs)

    @classmethod
    def create(cls, *args, config, **kwargs):
        if config.trainer.get("use_v1", False):
            from .transfer_queue import GuidedAgentLoopManagerTQ

            return GuidedAgentLoopManagerTQ.create(*args, config=config, **kwargs)
        return super().create(*args, config=config, **kwargs)


@register(AGENT_NAME)
class GuidedAgentLoop(AgentLoopBase):
    """A single-turn agent loop whose rollouts are guided (module docstring). Text prompts only.

    Settings (keys of its entry in `rollout.agent.agent_loop_config_path`, beside `name` and `_target_`):
        schedule: λ over training steps, as `prodsample.schedules.Schedule.to_dict()` writes it, e.g.
            {"kind": "linear", "start": 0.5, "end_step": 200}. Schedules that need each prompt's rewards
            (`adaptive`) are refused: verl's agent loop does not see rewards.
        answer_field: where the hint's answer is in the dataset row, a dotted path (default
            "reward_model.ground_truth", where verl's example datasets keep it).
        hint_template: `prodsample.prompts.add_hint`'s template.
    """

    def __init__(
        self, *args, schedule: Mapping | Schedule | None = None, answer_field: str = "reward_model.ground_truth",
        hint_template: str = DEFAULT_HINT_TEMPLATE, guide_prefix_tokens: int = 0, **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if (self.config.get("async_training") or {}).get("partial_rollout"):
            raise ValueError(
                "prodsample's guided rollouts cannot resume a partial rollout (it re-sends one request of a pair): set "
                "async_training.partial_rollout = false"
            )
        self.controller = GuidanceController(_schedule(schedule))
        self.answer_field = answer_field
        self.hint_template = hint_template
        self.guide_prefix_tokens = check_integer(guide_prefix_tokens, "guide_prefix_tokens", low=0)

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        rollout_step = current_rollout_step()
        if rollout_step is None:
            raise RuntimeError(
                f"prodsample's agent loop runs under {GuidedAgentLoopManager.__module__}.GuidedAgentLoopManager: set "
                "actor_rollout_ref.rollout.agent.agent_loop_manager_class to it (verl does not tell a loop its step)"
            )
        lam = 1.0 if rollout_step.validate else self.controller.lambdas(rollout_step.step, [_group_key(kwargs)])[0]
        rollout = await self._plan(sampling_params, kwargs, lam)
        metrics: dict[str, float] = {}
        with simple_timer("generate_sequences", metrics):
            # one request id for both: verl's load balancer sends both to the replica the first one reached
            outputs: list[TokenOutput] = await asyncio.gather(*(
                self.server_manager.generate(
                    request_id=rollout.name, prompt_ids=request.prompt_token_ids,
                    sampling_params=request_sampling_params(request),
                )
                for request in rollout.requests
            ))
        plain = outputs[-1]
        metrics["num_preempted"] = plain.num_preempted if plain.num_preempted is not None else -1
        return await self._trajectory(rollout, outputs, lam, metrics)

    async def _plan(self, sampling_params: Mapping[str, Any], row: Mapping[str, Any], lam: float) -> RolloutRequests:
        """The rollout's tagged requests: the plain prompt as verl's own loops render it, and the hinted one."""
        messages = list(row["raw_prompt"])
        plain_ids = await self.ct_build_initial_tokens(messages)
        guide_ids = None
        if is_guided(lam):
            hinted = add_hint(messages, _field(row, self.answer_field), self.hint_template)
            # not ct_build_initial_tokens: it cuts a prompt to rollout.prompt_length, which binds the plain prompt only
            guide_ids = await self.loop.run_in_executor(None, self.continuous_token_builder.build_initial_tokens, hinted)
        settings = _sampling_settings(
            sampling_params, lam=lam, max_new_tokens=self._max_new_tokens(plain_ids, guide_ids),
            # from the OS, not torch's RNG: verl may seed every agent-loop worker's torch alike
            seed=secrets.randbelow(SEED_BOUND), hint_template=self.hint_template,
            guide_prefix_tokens=self.guide_prefix_tokens,
        )
        rollout = rollout_requests(uuid.uuid4().hex, 0, plain_ids, guide_ids, settings, self._eos_token_id())
        if self.rollout_config.get("max_num_batched_tokens"):
            check_pairs_fit([rollout], self.rollout_config.max_num_batched_tokens)
        return rollout

    async def _trajectory(
        self, rollout: RolloutRequests, outputs: Sequence[TokenOutput], lam: float, metrics: dict[str, float]
    ) -> AgentLoopOutput:
        """The plain request's tokens with log q from the rollout's records, and its flags."""
        plain = outputs[-1]
        completion = list(plain.token_ids)
        record = _record_in(outputs)
        completions = {request.request_id: list(output.token_ids) for request, output in zip(rollout.requests, outputs)}
        outcome = settle([rollout], completions, {} if record is None else {rollout.name: record})[0]
        cause = outcome.cause
        has_records = not outcome.records_lost  # lost: flagged, masked out of the loss, the batch goes on
        logprobs = outcome.record.logprobs[: len(completion)]  # 0 where the records are lost, as at padding

        prompt_ids = rollout.plain.prompt_token_ids
        merged, response_mask, response_logprobs = await self.ct_merge_assistant_token(
            prompt_ids, completion, [], [], assistant_logprobs=logprobs
        )
        prompt_length = len(merged.token_ids) - len(response_mask)
        if not has_records:
            response_mask = [0] * len(response_mask)  # no log q: nothing of it may enter the loss
        length = self.rollout_config.response_length
        extra_fields = {key: value for key, value in plain.extra_fields.items() if key != RECORDS_KEY}
        extra_fields.update({
            "turn_scores": [], "tool_rewards": [],  # the schema of verl's own loops
            LAMBDA_FIELD: float(lam),
            GUIDED_FIELD: bool(rollout.paired and cause is None),
            DESYNCED_FIELD: cause is not None,
            CAUSE_FIELD: cause,
            RECORDS_FIELD: has_records,
        })
        return AgentLoopOutput(
            prompt_ids=merged.token_ids[:prompt_length],
            response_ids=merged.token_ids[prompt_length:][:length],
            response_mask=response_mask[:length],
            response_logprobs=(response_logprobs or [])[:length],
            num_turns=2,
            metrics=metrics,
            extra_fields=extra_fields,
        )

    def _max_new_tokens(self, plain_ids: list[int], guide_ids: list[int] | None) -> int:
        """verl's response length, within the context left by the longer prompt: both requests of a pair get
        the same limit (verl's server caps each request by the context its own prompt leaves, and would
        otherwise cut the hinted one shorter)."""
        max_model_len = self._max_model_len
        limit = min(self.rollout_config.response_length, max_model_len - max(len(plain_ids), len(guide_ids or ())))
        if limit < 1:
            raise ValueError(
                f"the prompts ({len(plain_ids)} tokens, {len(guide_ids or ())} with the hint) leave no room to "
                f"generate within rollout.max_model_len = {max_model_len}"
            )
        return limit

    @functools.cached_property
    def _max_model_len(self) -> int:
        """The context verl's vLLM server gives a request: rollout.max_model_len, or when that is unset (verl's
        default) the model's max_position_embeddings, as `vLLMHttpServer._validate_configs` sets it."""
        configured = self.rollout_config.get("max_model_len")
        if configured:
            return int(configured)
        model = self.config.actor_rollout_ref.model
        hf_config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.get("trust_remote_code", False))
        return get_max_position_embeddings(hf_config)

    def _eos_token_id(self) -> int:
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: guided rollouts need one to end a released request")
        return self.tokenizer.eos_token_id


def _schedule(schedule: Mapping | Schedule | None) -> Schedule:
    if schedule is None:
        raise ValueError(
            f"the {AGENT_NAME!r} agent loop needs a schedule: give its entry in rollout.agent.agent_loop_config_path "
            "a `schedule` mapping, e.g. {kind: linear, start: 0.5, end_step: 200} (docs/verl.md)"
        )
    if isinstance(schedule, DictConfig):
        schedule = OmegaConf.to_container(schedule, resolve=True)
    if isinstance(schedule, Mapping):
        schedule = schedule_from_dict(dict(schedule))
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a mapping or a prodsample.schedules.Schedule, got {type(schedule).__name__}")
    if isinstance(schedule, Adaptive):
        raise ValueError(
            "an adaptive schedule needs each prompt's rewards fed back to its controller, which verl's agent loop does "
            "not see: use a schedule over steps (constant, linear, cosine, exponential, piecewise)"
        )
    return schedule


def _group_key(kwargs: Mapping[str, Any]) -> str:
    """The trajectory's group (its prompt), as verl names it: the batch's uid, else the dataset index."""
    return str(kwargs.get("uid", kwargs.get("index", "")))


def _field(row: Mapping[str, Any], path: str) -> str:
    """The value at dotted `path` in a dataset row, as a string."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"answer_field {path!r}: the dataset row has no {part!r} there (keys: {sorted(row)})")
        value = value[part]
    if value is None or not str(value).strip():
        raise ValueError(f"answer_field {path!r} is empty in a dataset row: every guided prompt needs its answer")
    return str(value)


def _sampling_settings(sampling_params: Mapping[str, Any], **fields) -> SamplingSettings:
    """verl's sampling parameters as prodsample's, with the rollout's own `fields` (verl's top_k −1 is off, as
    prodsample's 0)."""
    top_k = sampling_params.get("top_k")
    return SamplingSettings(
        temperature=sampling_params.get("temperature", 1.0), top_k=None if top_k is None or top_k < 0 else top_k,
        top_p=sampling_params.get("top_p"), min_p=sampling_params.get("min_p"), **fields,
    )


def _record_in(outputs: Sequence[TokenOutput]) -> RolloutRecord | None:
    """The rollout's record, which the server attaches to the output of its last request to finish."""
    for output in outputs:
        if RECORDS_KEY in output.extra_fields:
            return RolloutRecord(*output.extra_fields[RECORDS_KEY])
    return None


def guidance_metrics_of(batch) -> dict[str, float]:
    """The `guidance/*` metrics of a verl batch of `GuidedAgentLoop` trajectories (its non_tensor_batch
    columns): λ's mean and spread, and the fractions of trajectories guided, desynced and without records.
    verl 0.9.1's trainer logs no metrics of an agent loop's own: call this on the rollout batch in a trainer
    step, or read the columns from verl's rollout dump. Rows of other agent loops (a mixed batch: their λ
    column is empty) are left out; a batch without any of this loop's rows gives no metrics."""
    columns = batch.non_tensor_batch
    if LAMBDA_FIELD not in columns:
        return {}
    ours = np.array([value is not None and not _is_nan(value) for value in columns[LAMBDA_FIELD]], dtype=bool)
    if not ours.any():
        return {}

    def column(name: str, dtype) -> np.ndarray:
        return np.asarray(list(columns[name][ours]), dtype=dtype)

    lam = column(LAMBDA_FIELD, np.float64)
    return {
        "guidance/lambda_mean": float(lam.mean()),
        "guidance/lambda_std": float(lam.std()),
        "guidance/guided_fraction": float(column(GUIDED_FIELD, bool).mean()),
        "guidance/desynced_fraction": float(column(DESYNCED_FIELD, bool).mean()),
        "guidance/records_missing_fraction": float(1.0 - column(RECORDS_FIELD, bool).mean()),
    }


def _is_nan(value) -> bool:
    return isinstance(value, float) and value != value
