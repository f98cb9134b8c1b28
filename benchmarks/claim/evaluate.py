"""Held-out evaluation of the plain policy (λ = 1, no hint), and of the hinted context for reference.

Figures, over a fixed problem list:
    greedy_pass1   share solved by greedy decoding (the protocol's primary figure)
    mean_at_k      mean reward of k samples at the training temperature (mean@k)
    pass_at_k      share with at least one of those k samples right
    hinted_greedy  greedy accuracy of the answer-conditioned context (λ = 0), for the set-up record only
"""

from __future__ import annotations

import torch

from prodsample.hf import guided_generate
from .task import HINT_TEMPLATE, MAX_NEW_TOKENS, Problem, reward


def completions_rewards(model, tokenizer, problems: list[Problem], rollout) -> torch.Tensor:
    """Reward per rollout `[R]` for a prompt-major `GuidedRollout` over `problems`."""
    group = len(rollout) // len(problems)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    return torch.tensor([reward(text, problems[r // group]) for r, text in enumerate(texts)])


def _rewards(model, tokenizer, problems, *, lam, k, temperature, seed, batch_size):
    rewards = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = guided_generate(
            model, tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk], lam=lam, num_generations=k,
            max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=None if seed is None else seed + start,
            hint_template=HINT_TEMPLATE,
        )
        rewards.append(completions_rewards(model, tokenizer, chunk, rollout).view(len(chunk), k))
    return torch.cat(rewards)


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, k: int, temperature: float, seed: int, hinted: bool = False,
             batch_size: int = 256) -> dict[str, float]:
    was_training = model.training
    model.eval()
    greedy = _rewards(model, tokenizer, problems, lam=1.0, k=1, temperature=0.0, seed=None, batch_size=batch_size)
    sampled = _rewards(model, tokenizer, problems, lam=1.0, k=k, temperature=temperature, seed=seed,
                       batch_size=max(1, batch_size // k))
    figures = {
        "greedy_pass1": greedy.mean().item(),
        "mean_at_k": sampled.mean().item(),
        "pass_at_k": (sampled.max(dim=1).values > 0).float().mean().item(),
        "k": k,
    }
    if hinted:
        figures["hinted_greedy"] = _rewards(model, tokenizer, problems, lam=0.0, k=1, temperature=0.0, seed=None,
                                            batch_size=batch_size).mean().item()
    model.train(was_training)
    return figures
