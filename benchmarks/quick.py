"""`prodsample quick`: the README's main job. A reward sweep and a small decoding-cost comparison on the
embedded default model, within 8 minutes on a 2-core CPU (the first run also converts the GGUF once).

It runs `prodsample reward` and `prodsample generate` with small sizes into `<out>/reward` and `<out>/generate`;
both are ordinary, resumable result directories, so a rerun continues and `prodsample report` rebuilds them.
The reward sweep uses the library's default hint (the hint study's choice, docs/cli.md "Which hint"), a
budget at which the rollouts finish (≤ 10% cut off in the study's plain runs), vLLM's engine for its large
batches, and enough prompts that the paired gain of λ = ½ over λ = 1 has an interval clear of 0 when guidance
helps as much as in the study; its table shows the rescued share of all-fail groups.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from . import generate, harness, reward

KIND = "quick"
# Sized for 8 minutes on a busy 2-core CPU: three λ, one generate call per λ, two decoding repeats.
QUICK_REWARD = {
    "--task": reward.DEFAULT_TASKS[0], "--prompts": "32", "--lams": "1,0.5,0", "--generations": "4",
    "--max-new-tokens": "320", "--prompts-per-shard": "32",
}
QUICK_BACKEND = {"vllm": "bfloat16", "hf": "float32"}  # backend -> dtype of the reward sweep
QUICK_GENERATE = {"--batch-sizes": "1,8", "--new-tokens": "16", "--repeats": "2", "--methods": "plain,plain_2B,hf_cfg,processor,guided_generate"}


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", default=QUICK_REWARD["--prompts"], help="prompts in the reward sweep (default: %(default)s)")
    parser.add_argument("--max-new-tokens", default=QUICK_REWARD["--max-new-tokens"], help="completion budget of the reward sweep (default: %(default)s)")
    parser.add_argument("--backend", default="vllm", choices=list(QUICK_BACKEND), help="where the reward sweep samples: vLLM's engine "
                        f"(in {QUICK_BACKEND['vllm']}) or transformers (in --dtype) (default: %(default)s)")
    parser.add_argument("--batch-sizes", default=QUICK_GENERATE["--batch-sizes"], help="batch sizes of the decoding comparison (default: %(default)s)")
    parser.add_argument("--skip-generate", action="store_true", help="run the reward sweep only")
    harness.add_model_arguments(parser)
    harness.add_output_argument(parser, KIND)


def main(args) -> None:
    out = harness.output_dir(args, KIND)
    shared = ["--model", args.model, "--threads", args.threads] + (["--device", args.device] if args.device else [])
    reward_args = {
        **QUICK_REWARD, "--prompts": args.prompts, "--prompts-per-shard": args.prompts, "--max-new-tokens": args.max_new_tokens,
        "--backend": args.backend, "--dtype": QUICK_BACKEND[args.backend] if args.backend == "vllm" else args.dtype,
    }
    generate_args = {**QUICK_GENERATE, "--batch-sizes": args.batch_sizes, "--dtype": args.dtype}
    reward.main(_parse(reward, _flags(reward_args) + shared + ["--out", str(out / "reward")], args))
    if not args.skip_generate:
        generate.main(_parse(generate, _flags(generate_args) + shared + ["--out", str(out / "generate")], args))
    print(f"[prodsample quick] done: results in {out}/reward and {out}/generate; rebuild tables and plots with "
          f"`prodsample report {out}`")


def _flags(options: dict[str, str]) -> list[str]:
    return [item for flag, value in options.items() for item in (flag, value)]


def _parse(module, argv: list[str], quick_args) -> argparse.Namespace:
    """`argv` through the same parser as `prodsample <module>`, so defaults and checks are shared. The part
    records the command a person typed (`prodsample quick ...`) followed by the equivalent direct command."""
    parser = argparse.ArgumentParser(prog=f"prodsample {module.KIND}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    typed = getattr(quick_args, "command_line", None) or shlex.join(sys.argv)
    args.command_line = f"{typed}  # part: {shlex.join(['prodsample', module.KIND, *argv])}"
    return args
