"""Brute-force float64 references, written without prodsample's code, for the tests to compare against."""

from __future__ import annotations

import torch


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def product_distribution(plain, guide, lam, temperature=1.0, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """q for one row `[V]` in float64: product of the two log-softmaxes, tempered, then top-k → top-p → min-p,
    each renormalised, ties with a boundary kept."""
    plain_lp, guide_lp = log_softmax64(plain), log_softmax64(guide)
    mixed = torch.zeros_like(plain_lp)
    if lam > 0:
        mixed = mixed + lam * plain_lp
    if lam < 1:
        mixed = mixed + (1 - lam) * guide_lp
    probs = torch.softmax(mixed / temperature, dim=-1)
    if top_k:
        kth = torch.sort(probs, descending=True).values[min(top_k, len(probs)) - 1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
    if top_p is not None and top_p < 1:
        order = torch.argsort(probs, descending=True)
        kept = torch.zeros_like(probs, dtype=torch.bool)
        mass = 0.0
        for index in order.tolist():
            if mass >= top_p or probs[index] == 0:
                break
            kept[index] = True
            mass += float(probs[index])
        boundary = probs[kept].min()
        probs = torch.where(probs >= boundary, probs, 0.0)
        probs = probs / probs.sum()
    if min_p:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
        probs = probs / probs.sum()
    return probs


def tempered_logprob(logits: torch.Tensor, token: int, temperature: float) -> float:
    return float(torch.log_softmax(logits.double() / (temperature or 1.0), dim=-1)[token])


def chi_square_pvalue(counts, probs) -> float:
    """Pearson chi-square goodness of fit over the tokens with nonzero probability; a drawn token with zero
    probability is an automatic rejection (p = 0)."""
    from scipy.stats import chisquare

    counts = torch.as_tensor(counts, dtype=torch.float64)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if (counts[probs == 0] > 0).any():
        return 0.0
    support = probs > 0
    expected = probs[support] * counts.sum()
    if support.sum() < 2:
        return 1.0
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)

