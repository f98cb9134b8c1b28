"""`GuidedRollout`: what every generation backend returns, and what a trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["GuidedRollout"]


@dataclass
class GuidedRollout:
    """R rollouts drawn from q (prompt-major: the G rollouts of prompt i are rows i·G … i·G+G−1).

    Per-token tensors are `[R, L]`, right-padded; `completion_mask` marks real tokens (the EOS that ended a
    rollout included). At padding, token ids are `pad_token_id` and log-probs 0.

    Attributes:
        prompt_ids: R lists of plain-prompt token ids (no hint), unpadded.
        completion_ids: int64 `[R, L]`.
        completion_mask: bool `[R, L]`.
        logprobs: float32 `[R, L]`, log q_t(o_t) of the distribution actually sampled from.
        plain_logprobs: float32 `[R, L]`, log π(o_t | prompt, o<t) at the sampling temperature.
        guide_logprobs: float32 `[R, L]`, log π(o_t | prompt ⊕ hint, o<t) at the sampling temperature.
        lam: float32 `[R]`, the λ each rollout was sampled with.
        guided: bool `[R]`: λ < 1 and both contexts stayed in step for the whole rollout. A rollout that lost
            guidance (see `desynced`) is sampled on-policy from the point of loss and is never `guided`.
        desynced: bool `[R]`: the plain and guide contexts fell out of step (vLLM only; always False on HF).
        group_ids: int64 `[R]`, the prompt each rollout belongs to.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    plain_logprobs: torch.Tensor
    guide_logprobs: torch.Tensor
    lam: torch.Tensor
    guided: torch.Tensor
    desynced: torch.Tensor
    group_ids: torch.Tensor

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def completion_lists(self) -> list[list[int]]:
        """Completion ids per rollout without padding."""
        return self._ragged(self.completion_ids)

    def token_lists(self, name: str) -> list[list[float]]:
        """A per-token tensor field ("logprobs", "plain_logprobs", "guide_logprobs") per rollout, unpadded."""
        return self._ragged(getattr(self, name))

    def _ragged(self, tensor: torch.Tensor) -> list[list]:
        lengths = self.completion_mask.sum(dim=1).tolist()
        return [row[:length] for row, length in zip(tensor.tolist(), lengths)]

    def to(self, device) -> GuidedRollout:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return GuidedRollout(**moved)
