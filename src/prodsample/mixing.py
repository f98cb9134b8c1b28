"""The product of experts: log-probs of ∏_i π_i^{w_i}, normalised.

For N experts over one vocabulary with log-probs ℓ_i = log_softmax(logits_i) and weights w_i ≥ 0 summing
to 1 per row,

    log p(v) = Σ_i w_i·ℓ_i(v) − log Σ_u exp(Σ_i w_i·ℓ_i(u)).

Masking follows the product: a token at −inf in an expert with w_i > 0 has p = 0; an expert with w_i = 0
contributes nothing, even where it is −inf (its term is 0, never 0·(−inf) = NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mix_logprobs", "weighted_logprob_sum"]

WEIGHT_SUM_ATOL = 1e-5


def weighted_logprob_sum(logprobs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i·ℓ_i with weight-0 terms dropped: `logprobs` N × `[B, V]`, `weights` `[B, N]` → `[B, V]` float32."""
    total = None
    for i, expert in enumerate(logprobs):
        weight = weights[:, i : i + 1]
        term = torch.where(weight > 0, weight * expert, 0.0)
        total = term if total is None else total + term
    return total


def as_row_tensor(
    value, name: str, rows: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A scalar or `[B]` argument as a `[B]` tensor, with an error naming `name` if the shape is wrong."""
    tensor = torch.as_tensor(value, device=device, dtype=dtype)
    if tensor.dim() == 0:
        return tensor.expand(rows)
    if tensor.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or a tensor of shape [{rows}], got shape {tuple(tensor.shape)}")
    return tensor


def _check_logits(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, vocab], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, fp16 or bf16), got {tensor.dtype}")


def check_no_nan(tensor: torch.Tensor, name: str) -> None:
    """Logits may hold −inf (a masked token) but never NaN or +inf."""
    bad = torch.isnan(tensor) | torch.isposinf(tensor)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or +inf (row {row}); logits must be finite or -inf")


def fully_masked_message(row: int) -> str:
    return (
        f"row {row} of the product is fully masked: no token has nonzero probability under every expert "
        "with nonzero weight (after the filters)"
    )


def check_logits_pair(first: torch.Tensor, second: torch.Tensor, first_name: str, second_name: str) -> None:
    """Both are `[B, V]` float tensors on one device with the same batch and vocabulary."""
    _check_logits(first, first_name)
    _check_logits(second, second_name)
    if first.shape[1] != second.shape[1]:
        raise ValueError(
            f"vocabulary mismatch: {first_name} has {first.shape[1]} tokens, {second_name} has "
            f"{second.shape[1]}; the experts must share one vocabulary"
        )
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"batch mismatch: {first_name} has {first.shape[0]} rows, {second_name} has {second.shape[0]}")
    if first.device != second.device:
        raise ValueError(f"{first_name} is on {first.device} but {second_name} is on {second.device}")


def _weights_tensor(weights, rows: int, experts: int, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(weights, dtype=torch.float32, device=device)
    if tensor.dim() == 1:
        if tensor.shape[0] != experts:
            raise ValueError(f"weights must have {experts} entries (one per expert), got {tensor.shape[0]}")
        tensor = tensor.unsqueeze(0).expand(rows, experts)
    elif tensor.shape != (rows, experts):
        raise ValueError(f"weights must have shape [{rows}, {experts}] or [{experts}], got {tuple(tensor.shape)}")
    if torch.isnan(tensor).any() or (tensor < 0).any() or (tensor > 1).any():
        raise ValueError("weights must lie in [0, 1]")
    sums = tensor.sum(dim=1)
    if ((sums - 1).abs() > WEIGHT_SUM_ATOL).any():
        bad = int(((sums - 1).abs() > WEIGHT_SUM_ATOL).nonzero()[0])
        raise ValueError(f"weights must sum to 1 in every row; row {bad} sums to {float(sums[bad]):.6g}")
    return tensor


def mix_logprobs(logits: Sequence[torch.Tensor], weights) -> torch.Tensor:
    """Normalised log-probs of the weighted product of N experts.

    Args:
        logits: N tensors `[B, V]` (fp32, fp16 or bf16; the math runs in fp32), one per expert.
        weights: `[B, N]` tensor or N floats; each row non-negative and summing to 1.

    Returns:
        float32 `[B, V]` log-probs of ∏_i π_i^{w_i}, each row normalised.

    Example:
        >>> import torch, prodsample
        >>> plain, guide = torch.randn(2, 5), torch.randn(2, 5)
        >>> mixed = prodsample.mix_logprobs([plain, guide], [0.5, 0.5])
        >>> mixed.shape, bool(torch.allclose(mixed.exp().sum(-1), torch.ones(2)))
        (torch.Size([2, 5]), True)
    """
    if isinstance(logits, torch.Tensor) or len(logits) == 0:
        raise TypeError("logits must be a non-empty sequence of [batch, vocab] tensors, one per expert")
    for i, expert in enumerate(logits):
        check_logits_pair(logits[0], expert, "logits[0]", f"logits[{i}]")
        check_no_nan(expert, f"logits[{i}]")
    rows = logits[0].shape[0]
    weight_rows = _weights_tensor(weights, rows, len(logits), logits[0].device)
    expert_logprobs = [torch.log_softmax(expert.float(), dim=-1) for expert in logits]
    combined = weighted_logprob_sum(expert_logprobs, weight_rows)
    normaliser = torch.logsumexp(combined, dim=-1, keepdim=True)
    # NaN here means a weighted expert row was all −inf (log_softmax of it is NaN): masked all the same.
    masked_rows = ~torch.isfinite(normaliser.squeeze(1))
    if masked_rows.any():
        raise ValueError(fully_masked_message(int(masked_rows.nonzero()[0])))
    # A row with one expert at weight 1 is that expert's log-softmax already: keep it bit-exact.
    single_expert = (weight_rows == 1).any(dim=1, keepdim=True)
    return combined - torch.where(single_expert, 0.0, normaliser)
