"""`GuidedRollout`: what every generation backend returns, and what a trainer consumes.

Backends build it with `GuidedRollout.from_padded` (right-padded per-token tensors and each rollout's
length) or `GuidedRollout.from_lists` (ragged per-rollout lists), and join batches with
`GuidedRollout.concat`; all three set the padding, the mask and the defaults of `guided` and `desynced`
in one way.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    @classmethod
    def from_padded(
        cls,
        *,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: torch.Tensor,
        lengths,
        logprobs: torch.Tensor,
        plain_logprobs: torch.Tensor,
        guide_logprobs: torch.Tensor,
        lam,
        group_ids,
        pad_token_id: int,
        guided=None,
        desynced=None,
    ) -> GuidedRollout:
        """R rollouts from right-padded `[R, W]` tensors whose first `lengths[r]` entries are real (W at least
        the longest). The result is on the CPU, trimmed to the longest rollout, with `pad_token_id` and
        log-prob 0 at padding. `desynced` defaults to all False and `guided` to λ < 1 and not desynced.
        `lam`, `group_ids`, `lengths`, `guided` and `desynced` are `[R]` tensors or sequences."""
        rows = len(prompt_ids)
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        if lengths.shape != (rows,):
            raise ValueError(f"lengths must have one entry per rollout ({rows}), got shape {tuple(lengths.shape)}")
        width = int(lengths.max()) if rows else 0
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)

        def trimmed(tensor: torch.Tensor, name: str, pad) -> torch.Tensor:
            if tensor.dim() != 2 or tensor.shape[0] != rows or tensor.shape[1] < width:
                raise ValueError(
                    f"{name} must have shape [{rows}, ≥ {width}] (a row per rollout, as wide as the longest), got "
                    f"{tuple(tensor.shape)}"
                )
            return tensor[:, :width].cpu().masked_fill(~mask, pad)

        lam = torch.as_tensor(lam, dtype=torch.float32).cpu()
        desynced = torch.zeros(rows, dtype=torch.bool) if desynced is None else torch.as_tensor(desynced).bool().cpu()
        guided = (lam < 1) & ~desynced if guided is None else torch.as_tensor(guided).bool().cpu()
        return cls(
            prompt_ids=[list(map(int, ids)) for ids in prompt_ids],
            completion_ids=trimmed(completion_ids, "completion_ids", pad_token_id),
            completion_mask=mask,
            logprobs=trimmed(logprobs, "logprobs", 0.0),
            plain_logprobs=trimmed(plain_logprobs, "plain_logprobs", 0.0),
            guide_logprobs=trimmed(guide_logprobs, "guide_logprobs", 0.0),
            lam=lam,
            guided=guided,
            desynced=desynced,
            group_ids=torch.as_tensor(group_ids, dtype=torch.int64).cpu(),
        )

    @classmethod
    def from_lists(
        cls,
        *,
        prompt_ids: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
        plain_logprobs: Sequence[Sequence[float]],
        guide_logprobs: Sequence[Sequence[float]],
        lam,
        group_ids,
        pad_token_id: int,
        guided=None,
        desynced=None,
    ) -> GuidedRollout:
        """R rollouts from ragged per-rollout lists (or 1-D tensors): `completions[r]` and each per-token
        record of rollout r have one entry per token. Otherwise as `from_padded`."""
        lengths = [len(completion) for completion in completions]
        width = max(lengths, default=0)

        def padded(rows: Sequence[Sequence], name: str, dtype: torch.dtype) -> torch.Tensor:
            if len(rows) != len(lengths):
                raise ValueError(f"{name} must have one entry per completion ({len(lengths)}), got {len(rows)}")
            out = torch.zeros((len(rows), width), dtype=dtype)
            for r, (row, length) in enumerate(zip(rows, lengths)):
                if len(row) != length:
                    raise ValueError(f"{name}[{r}] has {len(row)} entries for a completion of {length} tokens")
                out[r, :length] = torch.as_tensor(row, dtype=dtype)
            return out

        return cls.from_padded(
            prompt_ids=prompt_ids,
            completion_ids=padded(completions, "completions", torch.int64),
            lengths=lengths,
            logprobs=padded(logprobs, "logprobs", torch.float32),
            plain_logprobs=padded(plain_logprobs, "plain_logprobs", torch.float32),
            guide_logprobs=padded(guide_logprobs, "guide_logprobs", torch.float32),
            lam=lam,
            group_ids=group_ids,
            pad_token_id=pad_token_id,
            guided=guided,
            desynced=desynced,
        )

    @classmethod
    def concat(cls, rollouts: Sequence[GuidedRollout], *, pad_token_id: int) -> GuidedRollout:
        """One batch of `rollouts` in order, right-padded to the longest; each batch's group ids are shifted
        past the previous batches' so that groups stay apart."""
        if not rollouts:
            raise ValueError("concat needs at least one GuidedRollout")
        width = max(rollout.completion_ids.shape[1] for rollout in rollouts)

        def joined(name: str, value=0) -> torch.Tensor:
            tensors = [getattr(rollout, name) for rollout in rollouts]
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

        offsets, next_group = [], 0
        for rollout in rollouts:
            offsets.append(next_group)
            next_group += int(rollout.group_ids.max()) + 1 if len(rollout) else 0
        return cls.from_padded(
            prompt_ids=[ids for rollout in rollouts for ids in rollout.prompt_ids],
            completion_ids=joined("completion_ids", pad_token_id),
            lengths=torch.cat([rollout.completion_mask.sum(dim=1) for rollout in rollouts]),
            logprobs=joined("logprobs"),
            plain_logprobs=joined("plain_logprobs"),
            guide_logprobs=joined("guide_logprobs"),
            lam=torch.cat([rollout.lam for rollout in rollouts]),
            group_ids=torch.cat([rollout.group_ids + offset for rollout, offset in zip(rollouts, offsets)]),
            pad_token_id=pad_token_id,
            guided=torch.cat([rollout.guided for rollout in rollouts]),
            desynced=torch.cat([rollout.desynced for rollout in rollouts]),
        )

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
