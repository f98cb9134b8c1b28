"""A guided GRPO run in TRL's vLLM colocate mode on the tiny model, recording what tests/test_trl_colocate.py
checks. Run by that test, in one process (`python`) or several (`accelerate launch`), each process with its
own CPU engine:

    python tests/trl_colocate_run.py --model-dir DIR --out OUT

The model is loaded from --model-dir (TRL's engine loads the same directory). Writes, per process,
OUT/records-<rank>.pt (one entry per generation batch: step, plain prompt ids, completions, the engine's
recorded log π and TRL's recomputed log π_old) and OUT/log-<rank>.json (the trainer's log history).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from prodsample.schedules import Linear  # noqa: E402
from prodsample.trl import GuidedGRPOConfig, GuidedGRPOTrainer  # noqa: E402


def varied_reward(completions, **kwargs) -> list[float]:
    """A reward that differs between completions, so every group has nonzero advantages and a step moves π."""
    return [(sum(map(ord, completion)) % 10) / 10 for completion in completions]


class RecordingTrainer(GuidedGRPOTrainer):
    """Keeps, for each generation batch, the engine's recorded log π next to TRL's recomputed log π_old."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self._seen = []

    def guided_batch(self, prompts):
        batch = super().guided_batch(prompts)
        self._seen.append(batch)
        return batch

    def _generate_and_score_completions(self, inputs):
        self._seen = []
        output = super()._generate_and_score_completions(inputs)
        rollout = self._seen[0].rollout
        width = rollout.completion_ids.shape[1]
        self.records.append({
            "step": self.state.global_step,
            "prompt_ids": rollout.prompt_ids,
            "completion_ids": rollout.completion_ids,
            "mask": rollout.completion_mask,
            "guided": rollout.guided,
            "desynced": rollout.desynced,
            "engine_logprobs": rollout.plain_logprobs,
            "trainer_logprobs": output["old_per_token_logps"][:, :width].detach().cpu(),
        })  # fmt: skip
        return output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)])
    config = GuidedGRPOConfig(
        guidance_schedule=Linear(start=0.5, end_step=args.max_steps),
        guidance_backend="vllm",
        output_dir=str(args.out / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        temperature=1.0,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's π_old in float32, like the float32 engine
        seed=0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=256,
    )
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=varied_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        vllm_engine_kwargs={"dtype": "float32", "enforce_eager": True},
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.records, args.out / f"records-{rank}.pt")
    (args.out / f"log-{rank}.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
