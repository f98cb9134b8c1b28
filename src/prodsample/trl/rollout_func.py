"""TRL's `rollout_func` for answer-guided rollouts: λ per group from the controller, sampled by a backend at
the trainer's settings."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..controller import GuidanceController
from .backends import RolloutBackend
from .batch import prompt_key

__all__ = ["GuidedRolloutFunc", "rollout_seed"]


def rollout_seed(*parts) -> int:
    """A keyed-noise seed that differs per (run seed, mode, step, process, call) and repeats on resume."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62, prodsample.settings.SEED_BOUND


def _copies_per_prompt(prompts: Sequence) -> int:
    """How many consecutive copies each prompt has, when every prompt has the same number; else 1.

    Equal copies are sampled as `num_generations` of one prompt, so they share their contexts' prefill.
    """
    runs = [1]
    for previous, current in zip(prompts, prompts[1:]):
        if current == previous:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs[0] if len(set(runs)) == 1 else 1


class GuidedRolloutFunc:
    """TRL's `rollout_func` for answer-guided rollouts; `GuidedGRPOTrainer` builds it from its config.

    TRL calls it with this process's prompt entries (its slice of the generation batch) and the trainer. It
    takes those entries' `GuidedBatch` from the trainer, sets λ per group with the controller, samples with
    the backend at the settings of `trainer.args` (a `GuidedGRPOConfig`), records the rollout on the batch and
    returns TRL's fields. It holds no settings of its own.

    Attributes:
        controller: the `GuidanceController` (schedule + per-prompt records) that sets λ per group.
        backend: the `RolloutBackend` that samples.
    """

    def __init__(self, controller: GuidanceController, backend: RolloutBackend):
        self.controller = controller
        self.backend = backend
        self._calls_key: tuple[str, int] | None = None  # (mode, step) of the latest call
        self._calls = 0  # calls before the latest one at that (mode, step): eval runs several per step

    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        # GuidedGRPOTrainer, named by what it offers: the trainer module builds on this one.
        if not callable(getattr(trainer, "guided_batch", None)):
            raise TypeError(
                "guided rollouts need prodsample.trl.GuidedGRPOTrainer (it reads the answers, applies the off-policy "
                f"weights and checkpoints the schedule), got {type(trainer).__name__}"
            )
        batch = trainer.guided_batch(prompts)
        training = trainer.model.training
        copies = _copies_per_prompt(prompts)
        firsts = range(0, len(prompts), copies)
        settings = trainer.args.sampling_settings(
            lam=self.rollout_lambdas(trainer, prompts, training), num_generations=copies, seed=self._seed(trainer, training)
        )
        rollout = self.backend(trainer, [prompts[i] for i in firsts], [batch.answers[i] for i in firsts], settings)
        batch.record_rollout(rollout)
        return {
            "prompt_ids": rollout.prompt_ids,
            "completion_ids": rollout.completion_lists(),
            "logprobs": rollout.token_lists("logprobs"),
            # Extra fields reach the reward functions (as keyword arguments) next to the dataset's columns.
            "lam": rollout.lam.tolist(),
            "guided": rollout.guided.tolist(),
            "plain_logprobs": rollout.token_lists("plain_logprobs"),
        }

    def rollout_lambdas(self, trainer, prompts: Sequence, training: bool) -> list[float]:
        """λ for each prompt entry: the controller's per-group λ in training, 1 in evaluation (the plain policy).

        TRL hands each process its slice of the generation batch, whose groups are `num_generations`
        consecutive entries of the global batch; with `guided_per_group=k` (the config's), only the first k
        rollouts of each group are guided.
        """
        if not training:
            return [1.0] * len(prompts)
        lams = self.controller.lambdas(trainer.state.global_step, [prompt_key(p) for p in prompts])
        guided_per_group = trainer.args.guided_per_group
        if guided_per_group is not None:
            first = trainer.accelerator.process_index * len(prompts)
            lams = [
                lam if (first + i) % trainer.num_generations < guided_per_group else 1.0
                for i, lam in enumerate(lams)
            ]
        return lams

    def _seed(self, trainer, training: bool) -> int:
        mode, step = ("train" if training else "eval"), trainer.state.global_step
        self._calls = self._calls + 1 if self._calls_key == (mode, step) else 0
        self._calls_key = (mode, step)
        return rollout_seed(trainer.args.seed, mode, step, trainer.accelerator.process_index, self._calls)
