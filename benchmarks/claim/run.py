"""Run arms × seeds of the claim experiment, resumably, then summarise and plot.

    python -m prodsample.benchmarks.claim.run --out benchmarks/results/claim --arms all --seeds 0 1 2

Every run starts from the committed checkpoint (`--policy`). Each evaluation point is appended to
`<out>/shards/<arm>-s<seed>.jsonl` as it happens; a finished run's records are then appended to
`<out>/runs.jsonl`, and a rerun of the same command skips finished runs (an unfinished one restarts). Two
runners may share one `--out` (say one per core, with different `--arms`); `meta.json` holds what they
share (git revision, package versions, configuration) and a runner with other settings is refused. After
the runs, `analyze` writes `<out>/summary.json` (with `meta.json` and the seeds of every arm) and the plots
from `runs.jsonl` alone.

`--ladder mixed|C` runs the difficulty-ladder experiment (issue 12, PROTOCOL-ladder.md) instead: RL problems
from the ladder's training split (every level, or level C only), and each evaluation point records, per
level of `--eval-split` (held_out, or validation for pilots), the plain figures and the hinted greedy
accuracy under `levels`; `analyze_ladder` summarises those.

    python -m prodsample.benchmarks.claim.run --ladder mixed --policy benchmarks/claim/ladder-policy --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from . import analyze, analyze_ladder
from .make_policy import POLICY as DEFAULT_POLICY
from .task import LADDERS, TRAINING_SETS, ladder_sets, rl_and_held_out, training_problems
from .evaluate import evaluate
from .train import ARMS, RunConfig, config_dict, run

PACKAGES = ("torch", "transformers", "reasoning-gym", "tokenizers", "numpy")


def git_revision() -> str:
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return revision + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def finished_runs(runs_path: Path) -> set[tuple[str, int]]:
    if not runs_path.exists():
        return set()
    records = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
    return {(r["arm"], r["seed"]) for r in records if r.get("final")}


def shared_meta(args, config: RunConfig) -> dict:
    """What every run of one comparison shares; a resumed or parallel invocation must match it."""
    return {
        "git_revision": git_revision(),
        "packages": {name: metadata.version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "policy": str(args.policy),
        "num_rl": args.num_rl,
        "num_held_out": args.num_held_out,
        "ladder": args.ladder,
        "ladder_version": args.ladder_version if args.ladder else None,
        "eval_split": args.eval_split if args.ladder else None,
        "config": config_dict(config),
        "cpu_count": os.cpu_count(),
    }


def check_or_write_meta(out: Path, meta: dict) -> None:
    """Write meta.json for a new comparison; refuse to add runs to one made with other settings."""
    path = out / "meta.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        keys = ("num_rl", "num_held_out", "config", "policy", "ladder", "ladder_version", "eval_split")
        differing = [key for key in keys if recorded.get(key) != meta[key]]
        if differing:
            raise SystemExit(f"{out} holds a comparison with other {differing}; use another --out")
        return
    path.write_text(json.dumps(meta, indent=1) + "\n")


def append_lines(path: Path, records: list[dict]) -> None:
    """Append in one write call, so runners sharing `--out` (one per core) never interleave lines."""
    payload = "".join(json.dumps(r) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def problems_and_evaluation(args, config: RunConfig, tokenizer):
    """The RL problems, the function that gives an evaluation point's figures for a model, and the one that gives
    what only the final point records (the ladder's validation figures, which choices during the study read)."""
    sampled = dict(k=config.eval_k, temperature=config.temperature, seed=10_000)
    if args.ladder is None:
        sets = rl_and_held_out(args.num_rl, args.num_held_out)
        return sets.rl, lambda model: evaluate(model, tokenizer, sets.held_out, **sampled), lambda model: {}
    sets = ladder_sets(ladder=LADDERS[args.ladder_version])

    def levels(model, split):
        return {level: evaluate(model, tokenizer, problems, hinted=True, **sampled)
                for level, problems in sets[split].items()}

    final_extra = (lambda model: {}) if args.eval_split == "validation" else (
        lambda model: {"validation_levels": levels(model, "validation")})
    return training_problems(sets, args.ladder), lambda model: {"levels": levels(model, args.eval_split)}, final_extra


def run_all(args) -> None:
    torch.set_num_threads(args.threads)
    config = RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)})
    args.out.mkdir(parents=True, exist_ok=True)
    check_or_write_meta(args.out, shared_meta(args, config))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.policy)
    rl_set, evaluate_policy, evaluate_final = problems_and_evaluation(args, config, tokenizer)
    runs_path, done = args.out / "runs.jsonl", finished_runs(args.out / "runs.jsonl")
    for seed in args.seeds:  # seed-major, so an interrupted comparison has every arm at the early seeds
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            shard = args.out / "shards" / f"{arm}-s{seed}.jsonl"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.unlink(missing_ok=True)
            records = []

            def on_eval(record, shard=shard, records=records):
                records.append(record | {"load_average": os.getloadavg()[0]})
                append_lines(shard, records[-1:])
                print(f"{arm} s{seed} step {record['step']} rollouts {record['rollouts']} {progress(record)} "
                      f"{record['seconds']}s", flush=True)

            model = LlamaForCausalLM.from_pretrained(args.policy)
            run(arm, seed, config, model, tokenizer, rl_set, evaluate_policy, on_eval)
            records[-1] |= evaluate_final(model) | {"final": True}
            append_lines(runs_path, records)
    (analyze if args.ladder is None else analyze_ladder).write_summary(args.out)


def progress(record: dict) -> str:
    """The primary figures of an evaluation point, for the log."""
    levels = record.get("levels", {"": record})
    return " ".join(f"{level}:pass1 {f['greedy_pass1']:.3f} mean@k {f['mean_at_k']:.3f}" for level, f in levels.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY)
    parser.add_argument("--arms", nargs="+", default=["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-rl", type=int, default=2000)
    parser.add_argument("--num-held-out", type=int, default=500)
    parser.add_argument("--ladder", choices=sorted(TRAINING_SETS), default=None,
                        help="the difficulty-ladder experiment on this training set")
    parser.add_argument("--ladder-version", choices=sorted(LADDERS), default="v1",
                        help="--ladder: which ladder (PROTOCOL-ladder.md: v1, PROTOCOL-ladder-v2.md: v2)")
    parser.add_argument("--eval-split", choices=["held_out", "validation"], default="held_out",
                        help="--ladder: the split evaluation points measure (validation for pilots)")
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    args = parser.parse_args(argv)
    args.arms = list(ARMS) if args.arms == ["all"] else args.arms
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    return args


def main(argv=None) -> None:
    """The entry `prodsample train` calls with the rest of its command line."""
    run_all(parse_args(argv))


if __name__ == "__main__":
    main()
