"""Building a `GuidedRollout`: from ragged per-rollout lists, and joining batches."""

import pytest
import torch

from prodsample.rollout import PER_TOKEN_RECORDS, GuidedRollout

PAD = 99


def ragged(completions, lam, group_ids, **flags) -> GuidedRollout:
    """A rollout whose log-probs encode (row, position), so a shifted or dropped value is seen."""
    records = {
        name: [[-(offset + 10 * row + position) / 100 for position in range(len(c))] for row, c in enumerate(completions)]
        for offset, name in enumerate(PER_TOKEN_RECORDS)
    }
    return GuidedRollout.from_lists(
        prompt_ids=[[1, 2]] * len(completions), completions=completions, **records, lam=lam, group_ids=group_ids,
        pad_token_id=PAD, **flags,
    )


def test_from_lists_pads_masks_and_sets_the_defaults():
    rollout = ragged([[5, 6, 7], [8]], lam=[0.5, 1.0], group_ids=[0, 0])
    assert rollout.completion_ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert rollout.completion_mask.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(rollout.logprobs, torch.tensor([[0.0, -0.01, -0.02], [-0.1, 0.0, 0.0]]))
    assert rollout.guide_logprobs[1].tolist() == pytest.approx([-0.12, 0.0, 0.0])
    assert rollout.guided.tolist() == [True, False] and rollout.desynced.tolist() == [False, False]
    assert rollout.lam.dtype == torch.float32 and rollout.group_ids.dtype == torch.int64
    assert rollout.completion_lists() == [[5, 6, 7], [8]]


def test_a_desynced_rollout_is_not_guided():
    rollout = ragged([[5], [6]], lam=[0.5, 0.5], group_ids=[0, 0], desynced=[False, True])
    assert rollout.guided.tolist() == [True, False]


def test_rows_may_be_tensors():
    """The HF paths cut each rollout's row from their padded batches."""
    ids = torch.tensor([[3, 4, 0, 7], [5, 1, 1, 7]])
    values = torch.full((2, 4), -1.0)
    rollout = GuidedRollout.from_lists(
        prompt_ids=[[1], [2]], completions=[ids[0, :1], ids[1, :3]], logprobs=[values[0, :1], values[1, :3]],
        plain_logprobs=[values[0, :1], values[1, :3]], guide_logprobs=[values[0, :1], values[1, :3]],
        lam=torch.tensor([0.2, 0.2]), group_ids=[0, 1], pad_token_id=PAD,
    )
    assert rollout.completion_ids.tolist() == [[3, PAD, PAD], [5, 1, 1]]
    assert rollout.plain_logprobs.tolist() == [[-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(logprobs=[[-0.1], [-0.2, -0.3]]), r"logprobs\[0\] has 1 entries for a completion of 2 tokens"),
        (dict(plain_logprobs=[[-0.1, -0.2]]), "plain_logprobs must have one entry per completion"),
        (dict(lam=1.0), r"lam must have one value per rollout \(2\), got shape \(\)"),
        (dict(group_ids=[0]), r"group_ids must have one value per rollout \(2\)"),
    ],
)
def test_from_lists_refuses_values_that_do_not_fit_the_rollouts(change, message):
    arguments = dict(
        prompt_ids=[[1], [1]], completions=[[4, 5], [6]], logprobs=[[-0.1, -0.2], [-0.3]],
        plain_logprobs=[[-0.1, -0.2], [-0.3]], guide_logprobs=[[0.0, 0.0], [0.0]], lam=[1.0, 1.0], group_ids=[0, 1],
    )
    with pytest.raises(ValueError, match=message):
        GuidedRollout.from_lists(**(arguments | change), pad_token_id=PAD)


def test_concat_pads_to_the_longest_and_keeps_groups_apart():
    first = ragged([[5], [6]], lam=[0.5, 0.5], group_ids=[0, 0])
    second = ragged([[7, 8, 9], [1], [2, 3], [4]], lam=[1.0] * 4, group_ids=[0, 0, 1, 1], desynced=[True] + [False] * 3)
    joined = GuidedRollout.concat([first, second], pad_token_id=PAD)
    assert joined.completion_ids.shape == (6, 3)
    assert joined.completion_ids[:2].tolist() == [[5, PAD, PAD], [6, PAD, PAD]]
    assert joined.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert joined.guided.tolist() == [True, True, False, False, False, False]
    assert joined.desynced.tolist() == [False, False, True, False, False, False]
    assert joined.completion_lists() == first.completion_lists() + second.completion_lists()
    for name in PER_TOKEN_RECORDS:
        assert joined.token_lists(name) == first.token_lists(name) + second.token_lists(name)
    assert joined.prompt_ids == first.prompt_ids + second.prompt_ids
