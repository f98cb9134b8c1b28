"""Held-out evaluation of the plain policy (λ = 1, no hint), and of the hinted context for reference.

Figures, over a fixed problem list:
    greedy_pass1      share solved by greedy decoding (the protocol's primary figure)
    mean_at_k         mean reward of k samples at the training temperature (mean@k)
    pass_at_k         share with at least one of those k samples right
    hinted_greedy     greedy accuracy of the answer-conditioned context (λ = 0), for the set-up record only
    pass_at_k_chance  (chance=True) pass@k of the very same samples scored against another problem's answer
                      (`derangement`): what guessing alone scores, the floor a zero-pass level is judged against
    guided_mean_at_k  (guided_lam=λ) mean reward of k samples drawn at λ, T as above: does guidance reach it?
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


def derangement(problems: list[Problem]) -> list[int]:
    """For each problem the index of the next one (cyclically) whose answer differs: a fixed partner whose answer
    a completion can only hit by chance. Needs two distinct answers."""
    if len({p.answer for p in problems}) < 2:
        raise ValueError("derangement needs problems with at least two distinct answers")
    partners = []
    for i, problem in enumerate(problems):
        j = (i + 1) % len(problems)
        while problems[j].answer == problem.answer:
            j = (j + 1) % len(problems)
        partners.append(j)
    return partners


def _completions(model, tokenizer, problems, *, lam, k, temperature, seed, batch_size) -> list[list[str]]:
    """k completions per problem, decoded, `[N][k]`."""
    texts = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        rollout = guided_generate(
            model, tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk], lam=lam, num_generations=k,
            max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=None if seed is None else seed + start,
            hint_template=HINT_TEMPLATE,
        )
        decoded = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        texts += [decoded[i * k : (i + 1) * k] for i in range(len(chunk))]
    return texts


def _scores(problems, texts, entries=None) -> torch.Tensor:
    """`[N, k]` rewards of `texts`, each row against its problem's answer or, with `entries`, against those."""
    return torch.tensor([[reward(text, problem, None if entries is None else entries[i]) for text in row]
                         for i, (problem, row) in enumerate(zip(problems, texts))])


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, k: int, temperature: float, seed: int, hinted: bool = False,
             chance: bool = False, guided_lam: float | None = None, batch_size: int = 256) -> dict[str, float]:
    was_training = model.training
    model.eval()
    run = lambda lam, samples, temp, sample_seed: _completions(  # noqa: E731
        model, tokenizer, problems, lam=lam, k=samples, temperature=temp, seed=sample_seed,
        batch_size=max(1, batch_size // samples))
    greedy = _scores(problems, run(1.0, 1, 0.0, None))
    sampled_texts = run(1.0, k, temperature, seed)
    sampled = _scores(problems, sampled_texts)
    figures = {
        "greedy_pass1": greedy.mean().item(),
        "mean_at_k": sampled.mean().item(),
        "pass_at_k": (sampled.max(dim=1).values > 0).float().mean().item(),
        "k": k,
    }
    if hinted:
        figures["hinted_greedy"] = _scores(problems, run(0.0, 1, 0.0, None)).mean().item()
    if chance:
        entries = [problems[j].entry for j in derangement(problems)]
        figures["pass_at_k_chance"] = (_scores(problems, sampled_texts, entries).max(dim=1).values > 0).float().mean().item()
    if guided_lam is not None:
        figures["guided_lam"] = guided_lam
        figures["guided_mean_at_k"] = _scores(problems, run(guided_lam, k, temperature, seed + 1)).mean().item()
    model.train(was_training)
    return figures
