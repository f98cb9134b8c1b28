"""Server-mode benchmark: guided vs plain time per token through a vLLM server at 1, 4 and 16 concurrent
clients, and the desync rate of guided pairs with and without prodsample's scheduler.

    bash scripts/with-env.sh prodsample server --model smollm2 --out benchmarks/results/server-smollm2

Two servers on 127.0.0.1 (started here, or given with --paired-url/--stock-url), both started as
docs/server.md recommends, with prodsample's logits processor, worker extension and middleware (records from
its endpoint, no dev mode): "paired" runs `prodsample.vllm.scheduler.PairedScheduler`, "stock" vLLM's own
scheduler. The workload is the one of `prodsample vllm`: chat prompts of mixed lengths
from reasoning-gym tasks, their answers as hints, G rollouts each.

- throughput, on the paired server: for C in --clients, C threads at once, each with its own prompts;
  "guided" threads call `prodsample.vllm.client.GuidedClient.generate` at λ = 0.5 (two requests per rollout),
  "plain" threads send the plain prompts as ordinary completion requests (vLLM's own sampler), G per prompt,
  and "plain_2b" threads send the plain and the hinted prompts so (the floor: two ordinary rows per rollout).
  Time per token = wall time of the C calls over the completion tokens per rollout (a guided rollout's guide
  request is not counted; plain_2b's tokens are halved). A warm-up pass of every kind at the smallest C runs
  first, apart; the rounds rotate the kinds' order; the summary holds the ratios per C, medians over rounds.
- desync: --desync-prompts × G pairs from 16 threads, on each server; the desync rate and causes from the
  records.

Writes results.json (every run, the load average before and after each, the command, git revision,
versions, machine) and runs.csv into --out, and the servers' logs into --out/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

from prodsample.vllm.routes import MIDDLEWARE

DESYNC_CLIENTS = 16


def server_flags(dtype: str, seed: int) -> list[str]:
    """Both servers' flags: the recommended setup (docs/server.md, "Recipe"), so that what is measured is the
    path a trainer takes, records through prodsample's endpoint."""
    return ["--dtype", dtype, "--max-model-len", "1024", "--enforce-eager", "--seed", str(seed),
            "--max-num-batched-tokens", "16384", "--distributed-executor-backend", "uni",
            "--worker-extension-cls", "prodsample.vllm.processor.RecordsExtension",
            *(flag for name in MIDDLEWARE for flag in ("--middleware", name))]


def in_threads(count: int, work) -> tuple[float, list]:
    """`work(i)` in `count` threads started together; (wall seconds, results in order). Re-raises a failure."""
    results, errors = [None] * count, []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


KINDS = ("plain", "plain_2b", "guided")


def plain_call(url: str, prompt_ids: list[list[int]], generations: int, max_new_tokens: int, temperature: float,
               seed: int) -> int:
    """Completion tokens of generations × len(prompt_ids) ordinary requests, sent together."""
    import httpx

    async def run() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=3600.0, limits=httpx.Limits(max_connections=256)) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]

            async def one(ids: list[int], index: int) -> int:
                body = {"model": model, "prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature,
                        "seed": seed + index, "return_token_ids": True}
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
                return len(response.json()["choices"][0]["token_ids"])

            requests = [one(ids, i * generations + g) for i, ids in enumerate(prompt_ids) for g in range(generations)]
            return sum(await asyncio.gather(*requests))

    return asyncio.run(run())


def guided_call(url: str, tokenizer, prompts, answers, generations: int, max_new_tokens: int, temperature: float,
                seed: int) -> dict:
    from prodsample.vllm.client import GuidedClient

    client = GuidedClient(url, tokenizer)
    rollout = client.generate(prompts, answers, lam=0.5, num_generations=generations, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)
    stats = client.last_stats
    return {"tokens": int(rollout.completion_mask.sum()), "pairs": stats.paired, "desynced": stats.desynced,
            "causes": dict(stats.causes)}


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per run")
    parser.add_argument("--prompts-per-client", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--desync-prompts", type=int, default=64, help="pairs = this × generations, per server")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paired-url", help="a running server with prodsample's scheduler (else one is started)")
    parser.add_argument("--stock-url", help="a running server with vLLM's scheduler (else one is started)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)

    from transformers import AutoTokenizer

    from prodsample.prompts import render_prompt
    from prodsample.testing import LocalVllmServer
    from prodsample.vllm.scheduler import SCHEDULER_CLS

    from .vllm_generate import model_directory, provenance, ratios, token_range, workload, write_records

    origin = provenance(argv) | {"command": shlex.join(["prodsample", "server", *argv])}
    model_dir = model_directory(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    most = max(args.clients) * args.prompts_per_client
    prompts, answers = workload(max(most, args.desync_prompts), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    servers = {}
    flags = server_flags(args.dtype, args.seed)
    wanted = {"paired": (args.paired_url, [*flags, "--scheduler-cls", SCHEDULER_CLS]), "stock": (args.stock_url, flags)}
    (args.out / "logs").mkdir(exist_ok=True)  # not committed (.gitignore)
    for name, (url, server_args) in wanted.items():
        if url is None:
            servers[name] = LocalVllmServer(model_dir, server_args, log=args.out / "logs" / f"server-{name}.log").start()
    started = time.perf_counter()
    try:
        urls = {name: url or servers[name].wait_ready() for name, (url, _) in wanted.items()}
        startup = time.perf_counter() - started if servers else None
        runs = throughput_runs(args, urls["paired"], tokenizer, prompts, answers)
        for name, url in urls.items():
            runs.append(desync_run(args, name, url, tokenizer, prompts, answers))
    finally:
        for server in servers.values():
            server.stop()

    def desync(server: str) -> dict:
        run = next(r for r in runs if r["kind"] == "desync" and r["server"] == server)
        return {"pairs": run["pairs"], "desynced": run["desynced"], "rate": run["desynced"] / run["pairs"],
                "causes": run["causes"]}

    summary = {
        "model": args.model,
        "workload": {"clients": args.clients, "prompts_per_client": args.prompts_per_client,
                     "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "rounds": args.rounds, "desync_prompts": args.desync_prompts,
                     "desync_clients": DESYNC_CLIENTS,
                     "prompt_tokens": token_range([render_prompt(tokenizer, p) for p in prompts])},
        "servers": {"flags": flags, "paired_scheduler": SCHEDULER_CLS, "started_here": sorted(servers),
                    "startup_s": startup},
        "time_per_token_ratios": {str(c): ratios(runs, "clients", c) for c in args.clients},
        "desync": {"with_scheduler": desync("paired"), "without_scheduler": desync("stock")},
        "runs": runs,
        **origin,
    }
    write_records(args.out, summary, ["round", "kind", "server", "clients", "seconds", "tokens", "seconds_per_token",
                                      "pairs", "desynced", "load_before", "load_after"])
    print(json.dumps({k: summary[k] for k in ("time_per_token_ratios", "desync")}, indent=2))
    return summary


def throughput_runs(args, url: str, tokenizer, prompts, answers) -> list[dict]:
    """The warm-up pass (round None) at the smallest client count, then the timed rounds."""
    runs = [measured(kind, "paired", min(args.clients), None, throughput_work(args, url, tokenizer, prompts, answers,
                                                                             kind, min(args.clients), args.seed))
            for kind in KINDS]
    for round_index in range(args.rounds):
        for clients in args.clients:
            shift = round_index % len(KINDS)  # rotate who goes first
            for kind in KINDS[shift:] + KINDS[:shift]:
                work = throughput_work(args, url, tokenizer, prompts, answers, kind, clients,
                                       args.seed + 1000 * (round_index + 1))
                runs.append(measured(kind, "paired", clients, round_index, work))
    return runs


def throughput_work(args, url: str, tokenizer, prompts, answers, kind: str, clients: int, seed: int):
    """`work(i)` of client thread i for one run of `kind`: its own prompts, its own seeds."""
    from prodsample.prompts import add_hint, render_prompt

    shares = split(list(range(clients * args.prompts_per_client)), clients)
    sampling = (args.generations, args.max_new_tokens, args.temperature)

    def work(i: int) -> dict:
        share = shares[i]
        if kind == "guided":
            return guided_call(url, tokenizer, [prompts[j] for j in share], [answers[j] for j in share], *sampling,
                               seed + 100 * i)
        ids = [render_prompt(tokenizer, prompts[j]) for j in share]
        if kind == "plain_2b":
            ids += [render_prompt(tokenizer, add_hint(prompts[j], answers[j])) for j in share]
        rows_per_rollout = 2 if kind == "plain_2b" else 1
        return {"tokens": plain_call(url, ids, *sampling, seed + 100 * i) / rows_per_rollout}

    return work


def desync_run(args, server: str, url: str, tokenizer, prompts, answers) -> dict:
    shares = split(list(range(args.desync_prompts)), DESYNC_CLIENTS)

    def work(i):
        if not shares[i]:
            return {"tokens": 0, "pairs": 0, "desynced": 0, "causes": {}}
        return guided_call(url, tokenizer, [prompts[j] for j in shares[i]], [answers[j] for j in shares[i]],
                           args.generations, args.max_new_tokens, args.temperature, args.seed + 7 * i)

    return measured("desync", server, DESYNC_CLIENTS, None, work)


def measured(kind: str, server: str, clients: int, round_index, work) -> dict:
    """One run of `clients` threads, with the machine's load average (1 min) before and after."""
    load_before = os.getloadavg()[0]
    seconds, results = in_threads(clients, work)
    tokens = sum(r["tokens"] for r in results)
    run = {"round": round_index, "kind": kind, "server": server, "clients": clients, "seconds": seconds,
           "tokens": tokens, "seconds_per_token": seconds / tokens if tokens else None,
           "load_before": load_before, "load_after": os.getloadavg()[0]}
    if kind in ("guided", "desync"):
        causes: dict[str, int] = {}
        for result in results:
            for cause, count in result["causes"].items():
                causes[cause] = causes.get(cause, 0) + count
        run |= {"pairs": sum(r["pairs"] for r in results), "desynced": sum(r["desynced"] for r in results),
                "causes": causes}
    print(json.dumps(run), flush=True)
    return run


if __name__ == "__main__":
    main()
