"""Held-out evaluation of the plain policy (λ = 1, no hint) during training."""

from __future__ import annotations

from collections.abc import Callable

from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from ..hf import guided_generate
from ..rollout import GuidedRollout
from ..settings import SamplingSettings, check_integer
from .rollout_func import rollout_seed

__all__ = ["HeldOutEvalCallback"]


def _verify(verifier, trainer, rows: list[dict], rollout: GuidedRollout, repeats: int) -> list[float | None]:
    """`verifier`'s reward for each rollout, called as TRL calls a reward function (`repeats` rollouts per row)."""
    rows = [row for row in rows for _ in range(repeats)]
    texts = trainer.processing_class.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
    prompts = [row["prompt"] for row in rows]
    completions = (
        [[{"role": "assistant", "content": text}] for text in texts]
        if is_conversational({"prompt": prompts[0]})
        else texts
    )
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    return verifier(
        prompts=prompts,
        completions=completions,
        completion_ids=rollout.completion_lists(),
        trainer_state=trainer.state,
        **columns,
    )


class HeldOutEvalCallback(TrainerCallback):
    """Evaluates the plain policy (λ = 1, no hint) on a fixed held-out set every `eval_steps` steps.

    Logs, through the trainer's logging (`report_to`), `heldout/pass@1` (greedy), and `heldout/mean@k` and
    `heldout/pass@k` over `num_samples` = k rollouts per problem at the training temperature, top-k, top-p and
    min-p, with a fixed noise seed, so every evaluation point sees the same draws for the same policy. A
    problem counts as solved when `verifier` scores it above `success_threshold`. Generation uses the trained
    model (`prodsample.hf`); under `accelerate launch` each process evaluates a shard.

    Args:
        trainer: the `GRPOTrainer` (or `GuidedGRPOTrainer`) being trained.
        dataset: held-out rows with a "prompt" and `answer_column` (and whatever the verifier reads).
        verifier: a TRL reward function, `verifier(prompts=..., completions=..., completion_ids=..., **columns)`.
        eval_steps: evaluate at every multiple of this global step (and at step 0 when `eval_on_start`).

    Attributes:
        history: one dict per evaluation, {"step": …, "heldout/…": …}.
    """

    def __init__(
        self,
        trainer,
        dataset,
        verifier: Callable[..., list[float]],
        *,
        eval_steps: int,
        num_samples: int = 8,
        answer_column: str = "answer",
        success_threshold: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        eval_on_start: bool = True,
    ):
        check_integer(eval_steps, "eval_steps", low=1)
        check_integer(num_samples, "num_samples", low=1)
        if len(dataset) == 0:
            raise ValueError("dataset must hold at least one held-out row")
        if "prompt" not in dataset.column_names or answer_column not in dataset.column_names:
            raise ValueError(f"dataset needs 'prompt' and {answer_column!r} columns, has {dataset.column_names}")
        self.trainer = trainer
        self.dataset = dataset
        self.verifier = verifier
        self.eval_steps = eval_steps
        self.num_samples = num_samples
        self.answer_column = answer_column
        self.success_threshold = success_threshold
        self.batch_size = batch_size
        self.seed = seed
        self.eval_on_start = eval_on_start
        self.history: list[dict] = []

    def _solved(self, rewards: list[float | None]) -> list[bool]:
        return [reward is not None and float(reward) > self.success_threshold for reward in rewards]

    def evaluate(self) -> dict[str, float]:
        """Run the evaluation now (every process) and return the metrics."""
        trainer, args = self.trainer, self.trainer.args
        accelerator = trainer.accelerator
        shard = range(accelerator.process_index, len(self.dataset), accelerator.num_processes)
        greedy, sampled = [], []
        plain_settings = SamplingSettings(lam=1.0, temperature=0, max_new_tokens=args.max_completion_length)
        drawn_settings = SamplingSettings(
            lam=1.0, num_generations=self.num_samples, max_new_tokens=args.max_completion_length,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        )
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
            for start in range(0, len(shard), self.batch_size):
                rows = [self.dataset[i] for i in shard[start : start + self.batch_size]]
                prompts = [row["prompt"] for row in rows]
                answers = [str(row[self.answer_column]) for row in rows]
                plain = guided_generate(model, trainer.processing_class, prompts, answers, plain_settings)
                seed = rollout_seed(self.seed, "heldout", accelerator.process_index, start)
                drawn = guided_generate(model, trainer.processing_class, prompts, answers, drawn_settings, seed=seed)
                greedy += self._solved(_verify(self.verifier, trainer, rows, plain, 1))
                solved = self._solved(_verify(self.verifier, trainer, rows, drawn, self.num_samples))
                sampled += [sum(solved[i : i + self.num_samples]) for i in range(0, len(solved), self.num_samples)]
        greedy, sampled = gather_object(greedy), gather_object(sampled)
        k = self.num_samples
        return {
            "heldout/pass@1": sum(greedy) / len(greedy),
            f"heldout/mean@{k}": sum(sampled) / (k * len(sampled)),
            f"heldout/pass@{k}": sum(count > 0 for count in sampled) / len(sampled),
        }

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_on_start and state.global_step == 0:
            metrics = self.evaluate()
            self.history.append({"step": 0, **metrics})
            # Trainer.log, not GRPOTrainer.log: nothing of TRL's is pending yet, and GRPOTrainer.log would file
            # these under "eval_" while the model is not yet in training mode.
            Trainer.log(self.trainer, dict(metrics))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps:
            return
        metrics = self.evaluate()
        self.history.append({"step": state.global_step, **metrics})
        # Into TRL's metric buffer, and a log now: the values reach report_to at this very step.
        for name, value in metrics.items():
            self.trainer._metrics["train"][name].append(value)
        control.should_log = True
