"""One guided-generation call as engine requests, and its rollouts back, with no engine in sight.

`GuidedCall.plan` checks a call's arguments, renders the plain and hinted prompts and tags the two requests
of each rollout (`prodsample.vllm.pacing.RolloutRequests`); `GuidedCall.rollout` turns what became of each
rollout (`prodsample.vllm.pacing.RolloutOutcome`) into the `GuidedRollout` every backend returns. Shared by the
in-process engine wrapper (`prodsample.vllm.GuidedLLM`) and the server client (`prodsample.vllm.client`), which
differ only in how the requests reach an engine.

Example (the test tokenizer needs the `hf` extra):
    >>> from prodsample.settings import SamplingSettings
    >>> from prodsample.testing import tiny_tokenizer
    >>> settings = SamplingSettings(lam=0.5, num_generations=2, max_new_tokens=8, seed=0)
    >>> call = GuidedCall.plan(tiny_tokenizer(), ["2+3?"], ["5"], settings)
    >>> [[request.tag.role.value for request in rollout.requests] for rollout in call.rollouts]
    [['guide', 'plain'], ['guide', 'plain']]
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .pacing import EngineRequest, RolloutOutcome, RolloutRequests
from .pairing import GuidanceTag, Role
from ..prompts import add_hint, check_prompts_and_answers, render_prompt
from ..rollout import PER_TOKEN_RECORDS, GuidedRollout
from ..settings import SamplingSettings, is_guided

__all__ = ["GuidedCall", "NEUTRAL_SAMPLING", "request_sampling_params", "rollout_requests"]

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
    settings: SamplingSettings  # as given, with the call's seed

    @classmethod
    def plan(cls, tokenizer, prompts: Sequence, answers: Sequence[str], settings: SamplingSettings) -> GuidedCall:
        """The requests of one call (`prodsample.vllm.GuidedLLM.generate`'s arguments); bad ones raise
        ValueError naming them. Rollout names are unique per call (a random prefix of 128 bits), so calls can
        share an engine, and no other client can guess them."""
        check_prompts_and_answers(prompts, answers)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: guided generation needs one to end rollouts")
        settings = settings.with_seed()
        group = settings.num_generations
        lams = settings.lam_per_rollout(len(prompts)).tolist()
        plain_ids = [render_prompt(tokenizer, p) for p in prompts]
        guide_ids = [
            render_prompt(tokenizer, add_hint(p, a, settings.hint_template)) if any(map(is_guided, lams)) else None
            for p, a in zip(prompts, answers)
        ]
        call = secrets.token_hex(16)  # whoever knows a rollout's name can read (and delete) its records
        requests = [
            rollout_requests(f"{call}-{r}", r, plain_ids[r // group], guide_ids[r // group],
                             dataclasses.replace(settings, lam=lams[r]), tokenizer.eos_token_id)
            for r in range(len(lams))
        ]
        return cls(requests, list(prompts), list(answers), plain_ids, lams, settings)

    @property
    def names(self) -> list[str]:
        return [rollout.name for rollout in self.rollouts]

    def rollout(self, outcomes: Sequence[RolloutOutcome], pad_token_id: int) -> GuidedRollout:
        """The `GuidedRollout` of the outcomes, one per rollout in `rollouts`' order; a rollout whose records
        are lost is masked (`GuidedRollout.masked`)."""
        completions = [outcome.completion for outcome in outcomes]

        def per_token(name: str) -> list[list[float]]:
            return [getattr(o.record, name)[: len(o.completion)] for o in outcomes]

        return GuidedRollout.from_lists(
            prompt_ids=[self.plain_ids[r // self.settings.num_generations] for r in range(len(outcomes))],
            completions=completions,
            **{name: per_token(name) for name in PER_TOKEN_RECORDS},
            lam=self.lams,
            group_ids=torch.arange(len(outcomes)) // self.settings.num_generations,
            pad_token_id=pad_token_id,
            desynced=[outcome.desynced for outcome in outcomes],
            masked=[outcome.records_lost for outcome in outcomes],
        )


def rollout_requests(
    name: str, r: int, plain_ids: list[int], guide_ids: list[int] | None, settings: SamplingSettings, eos: int
) -> RolloutRequests:
    """The tagged requests of rollout `name` (index `r` in its call's keyed noise), whose `settings` hold its
    one λ and its seed: the guide and plain requests when it is guided (`guide_ids` then needed), the plain
    one alone at λ = 1."""
    if settings.seed is None:
        raise ValueError("a rollout's requests need its settings' seed: the keyed noise of both rows uses it")
    contexts = [(Role.GUIDE, guide_ids)] if is_guided(settings.lam) else []
    contexts.append((Role.PLAIN, plain_ids))  # guide first: see RolloutRequests
    requests = []
    for role, ids in contexts:
        tag = GuidanceTag(rollout=name, role=role, rollout_index=r, seed=settings.seed, release_token=eos,
                          settings=settings.draw_settings())
        requests.append(EngineRequest(ids, settings.max_new_tokens, tag))
    return RolloutRequests(tuple(requests))


def request_sampling_params(request: EngineRequest) -> dict:
    """`vllm.SamplingParams` keyword arguments of a tagged request sent to an engine as it is (the flat tag in
    `extra_args`; over HTTP the same tag goes in `vllm_xargs`)."""
    return {"max_tokens": request.max_new_tokens, **NEUTRAL_SAMPLING, "extra_args": request.tag.to_extra_args()}
