"""Checks of a `GuidedRollout` against the HF reference, shared by the vLLM engine and server tests."""

import torch

from prodsample.hf import score

TOL = 2e-4  # fp32 logits of two engines (vLLM's CPU kernels vs transformers')


def records_match_score(rollout, hf, prompts, answers, *, temperature=1.0, top_k=None, top_p=None,
                        guide_prefix_tokens=0, half_prefilled_guides=False):
    """Recorded log-probs equal teacher-forced ones: λ's q up to the first position whose guide log-prob is
    NaN (where the rollout lost its guide context), π at λ = 1 from there; λ = 0 on the first
    `guide_prefix_tokens` tokens of a guided rollout. Returns the largest error.

    `half_prefilled_guides`: the rollouts include `guide_mid_prefill` losses, whose token at the loss was drawn
    jointly with a guide row's half-prefill logits (see prodsample.vllm.pairing): log q there is only checked finite."""
    model, tokenizer = hf
    completions = rollout.completion_lists()
    lams = rollout.lam.tolist()
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    with_lam = score(model, tokenizer, prompts, answers, completions, lam=lams, guide_prefix_tokens=guide_prefix_tokens,
                     **filters)
    on_policy = score(model, tokenizer, prompts, answers, completions, lam=1.0, **filters)
    worst = 0.0
    for r, completion in enumerate(completions):
        guide = rollout.guide_logprobs[r, : len(completion)]
        lost = int(torch.isnan(guide).nonzero()[0]) if torch.isnan(guide).any() else len(completion)
        assert bool(torch.isnan(guide[lost:]).all()), "guide log-probs are NaN from the loss on"
        assert lost == len(completion) or rollout.desynced[r], "a rollout that lost its guide context is flagged"
        expected = torch.cat([with_lam.logprobs[r, :lost], on_policy.logprobs[r, lost : len(completion)]])
        if half_prefilled_guides and lost < len(completion):
            assert bool(torch.isfinite(rollout.logprobs[r, lost])), "the draw at the loss has a log q"
            expected[lost] = rollout.logprobs[r, lost]
        pairs = [
            (rollout.logprobs[r, : len(completion)], expected),
            (rollout.plain_logprobs[r, : len(completion)], with_lam.plain_logprobs[r, : len(completion)]),
            (guide[:lost], with_lam.guide_logprobs[r, :lost]),
        ]
        for got, want in pairs:
            both_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
            errors = torch.where(both_inf, 0.0, (got - want).abs())
            worst = max([worst, *errors.tolist()])
    return worst


def per_rollout(values, generations):
    return [v for v in values for _ in range(generations)]
