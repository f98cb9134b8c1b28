"""`GuidedRollout`: what every generation backend returns, and what a trainer consumes.

Backends build it with `GuidedRollout.from_lists` (ragged per-rollout lists, as each backend records
them) and join batches with `GuidedRollout.concat`, which set the padding, the mask and the defaults of
`guided` and `desynced` in one way.

A rollout can be masked: its tokens are kept (to be rewarded and inspected) but none enters a loss. Its
mask is all False and its log-probs are 0, as at padding, so no consumer needs to know why (a vLLM rollout
whose records were lost, `prodsample.vllm.pacing.settle`, is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .settings import is_guided

__all__ = ["GuidedRollout", "PER_TOKEN_RECORDS"]

PER_TOKEN_RECORDS = ("logprobs", "plain_logprobs", "guide_logprobs")


def _per_rollout(values, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(values).to("cpu", dtype)
    if tensor.shape != (rows,):
        raise ValueError(f"{name} must have one value per rollout ({rows}), got shape {tuple(tensor.shape)}")
    return tensor


def _right_padded(rows: Sequence[Sequence], lengths: list[int], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Ragged rows as one zero-padded `[R, max(lengths)]` CPU tensor; row r must hold `lengths[r]` entries."""
    if len(rows) != len(lengths):
        raise ValueError(f"{name} must have one entry per completion ({len(lengths)}), got {len(rows)}")
    out = torch.zeros((len(rows), max(lengths, default=0)), dtype=dtype)
    for r, (row, length) in enumerate(zip(rows, lengths)):
        if len(row) != length:
            raise ValueError(f"{name}[{r}] has {len(row)} entries for a completion of {length} tokens")
        out[r, :length] = torch.as_tensor(row, dtype=dtype)
    return out


@dataclass
class GuidedRollout:
    """R rollouts drawn from q (prompt-major: the G rollouts of prompt i are rows i·G … i·G+G−1).

    Per-token tensors are `[R, L]`, right-padded; `completion_mask` marks the tokens a loss may use: every
    real token (the EOS that ended a rollout included) of every rollout that is not `masked`. Wherever the
    mask is False (padding, a masked rollout), log-probs are 0; at padding, token ids are `pad_token_id`.

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
        lengths: int64 `[R]`, each completion's real tokens, masked or not (default: the mask's count, no
            rollout masked).
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
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.lengths is None:
            self.lengths = self.completion_mask.sum(dim=1)

    @property
    def masked(self) -> torch.Tensor:
        """bool `[R]`: rollouts that have tokens of which none enters a loss."""
        return (self.lengths > 0) & ~self.completion_mask.any(dim=1)

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
        masked=None,
    ) -> GuidedRollout:
        """R rollouts from ragged per-rollout lists (or 1-D tensors, on any device): `completions[r]` and
        each per-token record of rollout r have one entry per token. The result is on the CPU, right-padded
        to the longest rollout with `pad_token_id` and log-prob 0. `lam`, `group_ids`, `guided`, `desynced`
        and `masked` are `[R]` tensors or sequences; `desynced` and `masked` default to all False and
        `guided` to λ < 1 and not desynced. A `masked` rollout keeps its tokens, with mask False and
        log-probs 0 (whatever its records held: they may be unknown, NaN), and is never guided."""
        if len(prompt_ids) != len(completions):
            raise ValueError(f"prompt_ids ({len(prompt_ids)}) and completions ({len(completions)}) must be as many")
        lengths = [len(completion) for completion in completions]
        rows = len(lengths)
        real = torch.arange(max(lengths, default=0)).unsqueeze(0) < torch.tensor(lengths, dtype=torch.int64).unsqueeze(1)
        lam = _per_rollout(lam, "lam", rows, torch.float32)
        desynced = torch.zeros(rows, dtype=torch.bool) if desynced is None else _per_rollout(desynced, "desynced", rows, torch.bool)
        masked = torch.zeros(rows, dtype=torch.bool) if masked is None else _per_rollout(masked, "masked", rows, torch.bool)
        mask = real & ~masked.unsqueeze(1)
        guided = is_guided(lam) & ~desynced if guided is None else _per_rollout(guided, "guided", rows, torch.bool)

        def per_token(records, name: str) -> torch.Tensor:
            return _right_padded(records, lengths, name, torch.float32).masked_fill(~mask, 0.0)

        return cls(
            prompt_ids=[list(map(int, ids)) for ids in prompt_ids],
            completion_ids=_right_padded(completions, lengths, "completions", torch.int64).masked_fill(~real, pad_token_id),
            completion_mask=mask,
            logprobs=per_token(logprobs, "logprobs"),
            plain_logprobs=per_token(plain_logprobs, "plain_logprobs"),
            guide_logprobs=per_token(guide_logprobs, "guide_logprobs"),
            lam=lam,
            guided=guided & ~masked,
            desynced=desynced,
            group_ids=_per_rollout(group_ids, "group_ids", rows, torch.int64),
            lengths=torch.tensor(lengths, dtype=torch.int64),
        )

    @classmethod
    def concat(cls, rollouts: Sequence[GuidedRollout], *, pad_token_id: int) -> GuidedRollout:
        """One batch of `rollouts` in order, right-padded to the longest; each batch's group ids are shifted
        past the previous batches' so that groups stay apart."""
        if not rollouts:
            raise ValueError("concat needs at least one GuidedRollout")
        group_ids, next_group = [], 0
        for rollout in rollouts:
            group_ids.append(rollout.group_ids + next_group)
            next_group += int(rollout.group_ids.max()) + 1 if len(rollout) else 0
        return cls.from_lists(
            prompt_ids=[ids for rollout in rollouts for ids in rollout.prompt_ids],
            completions=[ids for rollout in rollouts for ids in rollout.completion_lists()],
            **{name: [row for rollout in rollouts for row in rollout.token_lists(name)] for name in PER_TOKEN_RECORDS},
            lam=torch.cat([rollout.lam for rollout in rollouts]),
            group_ids=torch.cat(group_ids),
            pad_token_id=pad_token_id,
            guided=torch.cat([rollout.guided for rollout in rollouts]),
            desynced=torch.cat([rollout.desynced for rollout in rollouts]),
            masked=torch.cat([rollout.masked for rollout in rollouts]),
        )

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def completion_lists(self) -> list[list[int]]:
        """Completion ids per rollout without padding (a masked rollout's too)."""
        return self._ragged(self.completion_ids)

    def token_lists(self, name: str) -> list[list[float]]:
        """A per-token record (one of PER_TOKEN_RECORDS) per rollout, unpadded (0 on a masked rollout)."""
        return self._ragged(getattr(self, name))

    def _ragged(self, tensor: torch.Tensor) -> list[list]:
        return [row[:length] for row, length in zip(tensor.tolist(), self.lengths.tolist())]

    def to(self, device) -> GuidedRollout:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in fields(self)
        }
        return GuidedRollout(**moved)
