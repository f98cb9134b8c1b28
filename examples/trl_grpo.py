"""GRPO with answer-guided rollouts in TRL, on a tiny offline model (CPU, about a minute).

    bash scripts/with-env.sh python examples/trl_grpo.py
    bash scripts/with-env.sh python examples/trl_grpo.py --max-steps 40 --resume   # continue from the last checkpoint
    bash scripts/with-env.sh python examples/trl_grpo.py --off-policy baseline_keeping --self-distill 0.5

and with 2 processes (on a CPU-only machine accelerate's --multi_gpu starts them with the gloo backend):

    bash scripts/with-env.sh python -m accelerate.commands.launch --multi_gpu --num_processes 2 examples/trl_grpo.py

The task is single-digit addition ("3+4=" → "7"), rewarded when the completion contains the answer. λ rises
linearly from 0.5 to 1 over the first 60% of the steps, one λ per group; the plain policy (λ = 1, no hint)
is evaluated on held-out sums every `--eval-steps`. The model is a randomly initialised tiny Llama, so the
run shows the machinery (rollouts, weights, metrics, checkpoints), not learning: the claim experiment
(benchmarks/claim) measures that. Writes `summary.json` (the log history and the controller's state) to
--output-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is an experimental TRL feature

import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint

from prodsample.grpo import DistillCoefficient
from prodsample.testing import tiny_model, tiny_tokenizer
from prodsample.schedules import Linear
from prodsample.trl import TRL_OFF_POLICY_MODES, GuidedGRPOConfig, GuidedGRPOTrainer, HeldOutEvalCallback


def addition_problems(count: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randrange(0, 5), rng.randrange(0, 5)) for _ in range(count)]
    return Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs])


def contains_answer(completions, answer, **kwargs) -> list[float]:
    """The reward (and the held-out verifier): 1 when the completion contains the answer. It sees the plain
    prompt and the completion only; `answer` is the dataset column."""
    return [float(expected in completion) for completion, expected in zip(completions, answer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--off-policy", choices=TRL_OFF_POLICY_MODES, default=None, help="default: the library's")
    parser.add_argument(
        "--self-distill", type=float, default=None, metavar="BETA",
        help="add the self-distillation term, β from BETA linearly to 0 at the last step",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rollouts per process and step (a multiple of 4 over all processes)"
    )
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="runs/trl_grpo")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: threads cost more than they bring, and processes share the cores

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, arch="llama", seed=args.seed)
    config = GuidedGRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=4,
        max_completion_length=6,
        temperature=1.0,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=args.save_steps,
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        # The baseline-keeping weights need each rollout's token sum over max_completion_length (TRL's Dr. GRPO).
        **({"loss_type": "dr_grpo"} if args.off_policy == "baseline_keeping" else {}),
        guidance_schedule=Linear(start=0.5, end_step=max(1, int(0.6 * args.max_steps))),
        answer_column="answer",
        **({"off_policy": args.off_policy} if args.off_policy else {}),
        **(
            {"self_distill": DistillCoefficient(args.self_distill, Linear(start=0.0, end_step=args.max_steps))}
            if args.self_distill is not None
            else {}
        ),
    )
    trainer = GuidedGRPOTrainer(
        model=model,
        reward_funcs=contains_answer,
        args=config,
        train_dataset=addition_problems(256, seed=1),
        processing_class=tokenizer,
    )
    heldout = HeldOutEvalCallback(
        trainer, addition_problems(16, seed=2), contains_answer, eval_steps=args.eval_steps, num_samples=4
    )
    trainer.add_callback(heldout)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir) if args.resume else None)

    if trainer.accelerator.is_main_process:
        summary = {
            "processes": trainer.accelerator.num_processes,
            "off_policy": trainer.args.off_policy,
            "log_history": trainer.state.log_history,
            "heldout": heldout.history,
            "controller": trainer.rollout_func.controller.state_dict(),
        }
        Path(args.output_dir, "summary.json").write_text(json.dumps(summary, indent=1))
        last = next(entry for entry in reversed(trainer.state.log_history) if "guidance/lambda_mean" in entry)
        shown = {key: value for key, value in last.items() if key.startswith(("guidance/", "reward", "step"))}
        print(json.dumps(shown, indent=1))
    # Every process writes its controller, so a multi-process run can be checked for agreement.
    controller_path = Path(args.output_dir, f"controller-{trainer.accelerator.process_index}.json")
    controller_path.write_text(json.dumps(trainer.rollout_func.controller.state_dict()))


if __name__ == "__main__":
    main()
