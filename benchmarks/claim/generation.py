"""Rollouts for the claim experiment: `prodsample.hf.guided_generate` once it is on main, this stand-in until.

The stand-in follows `guided_generate`'s contract (prompt-major rollouts r = i·G + g; λ per prompt or per
rollout; the plain and guide contexts as rows of one batched forward with a KV cache; λ = 1 rows cost no
guide forward; tokens from the core sampler `prodsample.product_sample` with keyed noise) so the runner does
not change when the real one lands. It is written for the small left-padded models of this benchmark.
"""

from __future__ import annotations

import torch

from prodsample import product_sample
from prodsample.prompts import DEFAULT_HINT_TEMPLATE, add_hint, check_prompts_and_answers, render_prompt
from prodsample.rollout import GuidedRollout

try:
    from prodsample.hf import guided_generate

    GENERATOR = "prodsample.hf.guided_generate"
except ImportError:  # main does not have prodsample.hf yet
    GENERATOR = "prodsample.benchmarks.claim.generation (stand-in)"

    def guided_generate(
        model,
        tokenizer,
        prompts,
        answers,
        *,
        lam,
        num_generations: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k=None,
        top_p=None,
        min_p=None,
        seed=None,
        hint_template: str = DEFAULT_HINT_TEMPLATE,
    ) -> GuidedRollout:
        check_prompts_and_answers(prompts, answers)
        rollouts = len(prompts) * num_generations
        lam = _per_rollout(lam, len(prompts), num_generations)
        guided_rows = torch.nonzero(lam < 1.0).flatten()
        plain_ids = [render_prompt(tokenizer, p) for p in prompts for _ in range(num_generations)]
        hinted = [add_hint(p, a, hint_template) for p, a in zip(prompts, answers)]
        guide_ids = [render_prompt(tokenizer, hinted[r // num_generations]) for r in guided_rows.tolist()]
        return _decode(
            model, tokenizer, plain_ids, guide_ids, guided_rows, lam, max_new_tokens, num_generations,
            dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed),
        )


def _per_rollout(lam, num_prompts: int, num_generations: int) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float32).flatten()
    if lam.numel() == 1:
        return lam.expand(num_prompts * num_generations).clone()
    if lam.numel() == num_prompts:
        return lam.repeat_interleave(num_generations)
    if lam.numel() == num_prompts * num_generations:
        return lam
    raise ValueError(f"lam must be a float, one per prompt ({num_prompts}) or one per rollout, got {lam.numel()}")


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


@torch.no_grad()
def _decode(model, tokenizer, plain_ids, guide_ids, guided_rows, lam, max_new_tokens, num_generations, sampling):
    rollouts, eos, pad = len(plain_ids), tokenizer.eos_token_id, tokenizer.pad_token_id
    # One batch: the R plain rows, then one guide row per guided rollout.
    input_ids, attention_mask = _left_pad(plain_ids + guide_ids, pad)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    cache = None
    tokens, logq, logp, logg = [], [], [], []
    finished = torch.zeros(rollouts, dtype=torch.bool)
    # Keyed noise (rollout id, position) when seeded; otherwise the sampler's own fresh key per step.
    keyed = sampling["seed"] is not None
    for position in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        plain_logits = logits[:rollouts]
        guide_logits = plain_logits.clone()  # λ = 1 rows: the guide context has weight 0 and is never run
        guide_logits[guided_rows] = logits[rollouts:]
        keys = dict(rollout_ids=torch.arange(rollouts), positions=torch.full((rollouts,), position)) if keyed else {}
        step = product_sample(plain_logits, guide_logits, lam, **keys, **sampling)
        token = torch.where(finished, pad, step.token_ids)
        live = ~finished
        tokens.append(token)
        for store, values in ((logq, step.logprobs), (logp, step.plain_logprobs), (logg, step.guide_logprobs)):
            store.append(torch.where(live, values, 0.0))
        finished = finished | (token == eos)
        if bool(finished.all()):
            break
        step_ids = torch.cat([token, token[guided_rows]])
        input_ids = step_ids.unsqueeze(1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    completion_ids = torch.stack(tokens, dim=1)
    # A token is real up to and including the EOS that ended its rollout.
    ended_before = torch.cumsum(completion_ids == eos, dim=1) - (completion_ids == eos).long()
    completion_mask = (ended_before == 0) & (completion_ids != pad)
    guided = lam < 1.0
    return GuidedRollout(
        prompt_ids=plain_ids,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=torch.stack(logq, dim=1),
        plain_logprobs=torch.stack(logp, dim=1),
        guide_logprobs=torch.stack(logg, dim=1),
        lam=lam,
        guided=guided,
        desynced=torch.zeros(rollouts, dtype=torch.bool),
        group_ids=torch.arange(rollouts) // num_generations,
    )
