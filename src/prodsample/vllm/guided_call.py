"""One guided-generation call as engine requests, and its rollouts back, with no engine in sight.

`GuidedCall.plan` checks a call's arguments, renders the plain and hinted prompts and tags the two requests
of each rollout (`prodsample.vllm.pacing.RolloutRequests`); `GuidedCall.rollout` turns what became of each
rollout (`prodsample.vllm.pacing.RolloutOutcome`) into the `GuidedRollout` every backend returns. Shared by the
in-process engine wrapper (`prodsample.vllm.GuidedLLM`) and the server client (`prodsample.vllm.client`), which
differ only in how the requests reach an engine.

Example (the test tokenizer needs the `hf` extra):
    >>> from prodsample.testing import tiny_tokenizer
    >>> call = GuidedCall.plan(tiny_tokenizer(), ["2+3?"], ["5"], lam=0.5, num_generations=2, max_new_tokens=8,
    ...                        seed=0)
    >>> [[request.tag.role.value for request in rollout.requests] for rollout in call.rollouts]
    [['guide', 'plain'], ['guide', 'plain']]
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .pacing import EngineRequest, RolloutOutcome, RolloutRequests
from .pairing import GuidanceTag, Role
from ..prompts import DEFAULT_HINT_TEMPLATE, add_hint, check_prompts_and_answers, render_prompt
from ..rollout import PER_TOKEN_RECORDS, GuidedRollout
from ..settings import SamplingSettings

__all__ = ["GuidedCall", "NEUTRAL_SAMPLING", "pad_token_id", "request_sampling_params", "rollout_requests"]

# What vLLM's own sampler does with a tagged request: it only keeps the token the processor forces, so greedy
# and nothing else that acts on logits or tokens (the processor refuses other values); explicit, so that a
# server's default sampling parameters (its model's generation config) cannot change them.
NEUTRAL_SAMPLING = {
    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}


@dataclass(frozen=True)
class GuidedCall:
    """The requests of one call, prompt-major (rollout r = i·G + g), and what `rollout` needs to read them back."""

    rollouts: list[RolloutRequests]
    prompts: list  # as given (strings or chat message lists), with their answers
    answers: list[str]
    plain_ids: list[list[int]]  # per prompt
    lams: list[float]  # per rollout
    num_generations: int
    settings: SamplingSettings  # λ as given, temperature and filters
    hint_template: str

    @classmethod
    def plan(
        cls,
        tokenizer,
        prompts: Sequence,
        answers: Sequence[str],
        *,
        lam,
        num_generations: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        hint_template: str = DEFAULT_HINT_TEMPLATE,
    ) -> GuidedCall:
        """The requests of `prodsample.vllm.GuidedLLM.generate`'s arguments; bad ones raise ValueError naming
        them. Rollout names are unique per call (a random prefix), so calls can share an engine."""
        check_prompts_and_answers(prompts, answers)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: guided generation needs one to end rollouts")
        rollouts = len(prompts) * _positive_int(num_generations, "num_generations")
        settings = SamplingSettings(lam, temperature, top_k, top_p, min_p)
        lams = settings.lam_per_rollout(len(prompts), num_generations).tolist()
        _positive_int(max_new_tokens, "max_new_tokens")
        seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed

        plain_ids = [render_prompt(tokenizer, p) for p in prompts]
        guide_ids = [
            render_prompt(tokenizer, add_hint(p, a, hint_template)) if any(l < 1 for l in lams) else None
            for p, a in zip(prompts, answers)
        ]
        call = uuid.uuid4().hex[:12]
        requests = [
            rollout_requests(f"{call}-{r}", r, plain_ids[r // num_generations], guide_ids[r // num_generations],
                              lams[r], seed, settings, max_new_tokens, tokenizer.eos_token_id)
            for r in range(rollouts)
        ]
        return cls(requests, list(prompts), list(answers), plain_ids, lams, num_generations, settings, hint_template)

    @property
    def names(self) -> list[str]:
        return [rollout.name for rollout in self.rollouts]

    def rollout(self, outcomes: Sequence[RolloutOutcome], pad_token_id: int) -> GuidedRollout:
        """The `GuidedRollout` of the outcomes, one per rollout in `rollouts`' order."""
        completions = [outcome.completion for outcome in outcomes]

        def per_token(name: str) -> list[list[float]]:
            return [getattr(o.record, name)[: len(o.completion)] for o in outcomes]

        return GuidedRollout.from_lists(
            prompt_ids=[self.plain_ids[r // self.num_generations] for r in range(len(outcomes))],
            completions=completions,
            **{name: per_token(name) for name in PER_TOKEN_RECORDS},
            lam=self.lams,
            group_ids=torch.arange(len(outcomes)) // self.num_generations,
            pad_token_id=pad_token_id,
            desynced=[outcome.desynced for outcome in outcomes],
        )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS where it has none."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def rollout_requests(
    name: str, r: int, plain_ids: list[int], guide_ids: list[int] | None, lam: float, seed: int,
    settings: SamplingSettings, max_new_tokens: int, eos: int,
) -> RolloutRequests:
    """The tagged requests of rollout `name` (index `r` in its call's keyed noise): the guide and plain
    requests when λ < 1 (`guide_ids` then needed), the plain one alone when λ = 1."""
    contexts = [(Role.GUIDE, guide_ids)] if lam < 1 else []
    contexts.append((Role.PLAIN, plain_ids))  # guide first: see RolloutRequests
    requests = []
    for role, ids in contexts:
        tag = GuidanceTag(
            rollout=name, role=role, rollout_index=r, seed=seed, release_token=eos,
            settings=dataclasses.replace(settings, lam=lam),
        )
        requests.append(EngineRequest(ids, max_new_tokens, tag))
    return RolloutRequests(tuple(requests))


def request_sampling_params(request: EngineRequest) -> dict:
    """`vllm.SamplingParams` keyword arguments of a tagged request sent to an engine as it is (the flat tag in
    `extra_args`; over HTTP the same tag goes in `vllm_xargs`)."""
    return {"max_tokens": request.max_new_tokens, **NEUTRAL_SAMPLING, "extra_args": request.tag.to_extra_args()}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
