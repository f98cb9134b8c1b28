"""Checks of a `GuidedRollout` against the HF reference, shared by the vLLM engine and server tests."""

import torch

from prodsample.hf import score

TOL = 2e-4  # fp32 logits of two engines (vLLM's CPU kernels vs transformers')


def records_match_score(rollout, hf, prompts, answers, *, temperature=1.0, top_k=None, top_p=None,
                        guide_prefix_tokens=0, half_prefilled_guides=False):
    """Recorded log-probs equal teacher-forced ones of a separately loaded model (`hf`): λ's q up to the
    position where the rollout lost its guide context, π at λ = 1 from there; λ = 0 on the first
    `guide_prefix_tokens` tokens of a guided rollout. Returns the largest error.

    The loss position is found from the oracle, not read from the record: it is the first position whose
    recorded log q is not λ's teacher-forced q. A rollout with one is asserted flagged desynced and not guided,
    and its recorded guide log-probs must be known (not NaN) before it.

    `half_prefilled_guides`: the rollouts include `guide_mid_prefill` losses, whose token at the loss was drawn
    jointly with a guide row's half-prefill logits (see prodsample.vllm.pairing): log q there is neither λ's q
    nor π, and is only checked finite."""
    model, tokenizer = hf
    completions = rollout.completion_lists()
    lams = rollout.lam.tolist()
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    with_lam = score(model, tokenizer, prompts, answers, completions, lam=lams, guide_prefix_tokens=guide_prefix_tokens,
                     **filters)
    on_policy = score(model, tokenizer, prompts, answers, completions, lam=1.0, **filters)
    worst = 0.0
    for r, completion in enumerate(completions):
        n = len(completion)
        got, q, pi = rollout.logprobs[r, :n], with_lam.logprobs[r, :n], on_policy.logprobs[r, :n]
        departs = _errors(got, q) > TOL
        lost = int(departs.nonzero()[0]) if departs.any() else n
        guide = rollout.guide_logprobs[r, :n]
        assert not torch.isnan(guide[:lost]).any(), "the guide log-probs are known while log q is λ's q"
        if lost < n:
            assert rollout.desynced[r] and not rollout.guided[r], "a rollout whose log q leaves λ's q is flagged"
        expected = torch.cat([q[:lost], pi[lost:]])
        if half_prefilled_guides and lost < n and float(_errors(got[lost:lost + 1], pi[lost:lost + 1])) > TOL:
            assert bool(torch.isfinite(got[lost])), "the draw at the loss has a log q"
            expected[lost] = got[lost]
        known = ~torch.isnan(guide)
        pairs = [
            (got, expected),
            (rollout.plain_logprobs[r, :n], with_lam.plain_logprobs[r, :n]),
            (guide[known], with_lam.guide_logprobs[r, :n][known]),
        ]
        for got_values, want in pairs:
            worst = max([worst, *_errors(got_values, want).tolist()])
    return worst


def _errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got − want|, 0 where both are the same infinity."""
    both_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
    return torch.where(both_inf, 0.0, (got - want).abs())


def per_rollout(values, generations):
    return [v for v in values for _ in range(generations)]
