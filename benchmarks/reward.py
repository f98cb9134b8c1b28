"""`prodsample reward`: what answer guidance does to rewards, as a function of λ.

For each task, prompt and λ, G rollouts are sampled with `prodsample.hf.guided_generate` (the hint is the
task's answer) and scored by the task's verifier (rules in `prodsample.benchmarks.tasks`). Per (task, λ):

- reward rate: mean verifier reward over rollouts (± the standard error over prompts);
- pass rate: share of rollouts with reward 1;
- informative groups: share of prompts whose G rewards are not all equal (nonzero variance: the only groups
  that give GRPO a gradient); all-fail (every reward 0) and all-pass (every reward 1) groups;
- KL(q‖π) per token: the mean of log q − log π(o | prompt) over sampled tokens (`prodsample.importance.kl_q_pi`),
  an estimate of how far the guided sampler is from the policy a trainer updates;
- hint leakage: share of rollouts that restate the hint (`prodsample.prompts.hint_leakage`, the rule the TRL
  hook logs), computed from the recorded texts when the summary is built;
- format-valid rate, mean completion length in tokens, and the share cut off at --max-new-tokens.

Work is split into shards of --prompts-per-shard prompts at one λ (one `guided_generate` call each), appended to
`records.jsonl` as they finish; a rerun continues. The noise key of a shard depends on (seed, task, first
prompt) but not on λ, so every λ sees the same prompts with the same noise (common random numbers): the
differences between λ are less noisy than independent draws would make them.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

from prodsample.hf import guided_generate
from prodsample.importance import kl_q_pi
from prodsample.prompts import DEFAULT_HINT_TEMPLATE, hint_leakage

from . import harness
from .errors import UsageError
from .runs import RunDir, invocation, load_average
from .tasks import Task

KIND = "reward"
# Families where SmolLM2-135M-Instruct succeeds rarely but not never at λ = 1 (probes: docs/cli.md, "Probes: choosing the task families").
DEFAULT_TASKS = ["letter_counting:max_words=5", "basic_arithmetic:max_terms=2,max_digits=1"]
DEFAULT_PROMPTS = [100, 50]
DEFAULT_LAMS = "1,0.9,0.75,0.5,0.25,0"
IDENTITY = (
    "model", "dtype", "generations", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "hint_template",
    "prompts_per_shard",
)


@dataclass
class RewardConfig:
    model: str
    dtype: str
    tasks: list[str]
    prompts: list[int]
    lams: list[float]
    generations: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    hint_template: str
    prompts_per_shard: int


@dataclass(frozen=True)
class Shard:
    task: str
    lam: float
    prompt_indices: tuple[int, ...]

    def noise_seed(self, seed: int) -> int:
        """Keyed on (seed, task, first prompt), not λ: common random numbers across λ."""
        digest = hashlib.sha256(f"{seed}|{self.task}|{self.prompt_indices[0]}".encode()).hexdigest()
        return int(digest[:15], 16)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--task", action="append", dest="tasks", metavar="SPEC",
        help="reasoning-gym task, NAME or NAME:key=value,... (repeatable; default: "
        f"{' and '.join(DEFAULT_TASKS)})",
    )
    parser.add_argument(
        "--prompts", action="append", metavar="N",
        help="prompts per task: one value for every task, or one per --task in order "
        f"(default: {', '.join(map(str, DEFAULT_PROMPTS))} with the default tasks, else 100)",
    )
    parser.add_argument("--lams", default=DEFAULT_LAMS, help="λ values, comma-separated (default: %(default)s)")
    parser.add_argument("--generations", "-G", default="4", help="rollouts per prompt and λ (default: %(default)s)")
    parser.add_argument("--max-new-tokens", default="96", help="completion budget in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of q (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k over q (default: off)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p over q (default: off)")
    parser.add_argument("--seed", default="0", help="task generation and noise seed (default: %(default)s)")
    parser.add_argument(
        "--hint-template", default=DEFAULT_HINT_TEMPLATE,
        help="how the answer is added to the prompt, with {prompt} and {answer} fields (default: %(default)r)",
    )
    parser.add_argument("--prompts-per-shard", default="8", help="prompts per guided_generate call and per saved shard (default: %(default)s)")
    harness.add_model_arguments(parser)
    harness.add_output_argument(parser, KIND)


def config_from_args(args) -> RewardConfig:
    tasks = args.tasks or list(DEFAULT_TASKS)
    prompts_given = args.prompts or ([str(n) for n in DEFAULT_PROMPTS] if not args.tasks else ["100"])
    prompts = [harness.parse_int(n, "--prompts", minimum=1) for n in prompts_given]
    if len(prompts) == 1:
        prompts = prompts * len(tasks)
    if len(prompts) != len(tasks):
        raise UsageError(f"--prompts takes one value or one per --task ({len(tasks)}), got {len(prompts)}")
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"--task lists a task twice: {tasks}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if "{prompt}" not in args.hint_template or "{answer}" not in args.hint_template:
        raise UsageError(f"--hint-template must contain {{prompt}} and {{answer}}, got {args.hint_template!r}")
    return RewardConfig(
        model=args.model,
        dtype=args.dtype,
        tasks=tasks,
        prompts=prompts,
        lams=harness.parse_lams(args.lams),
        generations=harness.parse_int(args.generations, "--generations", minimum=1),
        max_new_tokens=harness.parse_int(args.max_new_tokens, "--max-new-tokens", minimum=1),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=harness.parse_int(args.seed, "--seed"),
        hint_template=args.hint_template,
        prompts_per_shard=harness.parse_int(args.prompts_per_shard, "--prompts-per-shard", minimum=1),
    )


def main(args) -> RunDir:
    config = config_from_args(args)
    run_dir = RunDir(harness.output_dir(args, KIND))
    threads = harness.set_threads(args.threads)
    tasks = {spec: Task(spec, seed=config.seed) for spec in config.tasks}  # bad task names fail before the model loads
    loaded = harness.load_model_from_args(args, seed=config.seed)
    run_dir.start(invocation(KIND, getattr(args, "command_line", None), asdict(config), IDENTITY, {"seed": config.seed}, str(loaded.model.device)))
    print(f"[prodsample reward] {loaded.name} ({loaded.source}), {threads} thread(s), results in {run_dir.path}")
    sweep(config, tasks, loaded, run_dir)
    report(run_dir)
    return run_dir


def plan(config: RewardConfig, done: set[tuple[str, float, int]]) -> list[Shard]:
    """The shards still to run: per task, prompt chunks in order, every λ of a chunk before the next chunk,
    so an interrupted run has the same prompts at every λ."""
    shards = []
    for spec, count in zip(config.tasks, config.prompts):
        for start in range(0, count, config.prompts_per_shard):
            chunk = tuple(range(start, min(start + config.prompts_per_shard, count)))
            for lam in config.lams:
                todo = tuple(i for i in chunk if (spec, lam, i) not in done)
                if todo:
                    shards.append(Shard(spec, lam, todo))
    return shards


def sweep(config: RewardConfig, tasks: dict[str, Task], loaded, run_dir: RunDir) -> None:
    done = {(record["task"], record["lam"], record["prompt_index"]) for record in run_dir.records()}
    shards = plan(config, done)
    total = sum(len(shard.prompt_indices) for shard in shards) * config.generations
    with harness.ProgressReport(total, "rollouts") as progress:
        for shard in shards:
            progress.describe(f"{shard.task} λ={shard.lam:g}")
            run_dir.append(run_shard(shard, tasks[shard.task], loaded, config))
            progress.advance(len(shard.prompt_indices) * config.generations)


def run_shard(shard: Shard, task: Task, loaded, config: RewardConfig) -> list[dict]:
    """One guided_generate call; one record per prompt (group) with its G rollouts."""
    problems = [task.problem(i) for i in shard.prompt_indices]
    started = time.perf_counter()
    rollout = guided_generate(
        loaded.model, loaded.tokenizer, [task.prompt(p) for p in problems], [p.answer for p in problems],
        lam=shard.lam, num_generations=config.generations, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        seed=shard.noise_seed(config.seed), hint_template=config.hint_template,
    )
    seconds = time.perf_counter() - started
    eos_ids = _eos_ids(loaded)
    texts = loaded.tokenizer.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
    groups = defaultdict(list)
    for row, (text, ids) in enumerate(zip(texts, rollout.completion_lists())):
        problem = problems[int(rollout.group_ids[row])]
        verdict = task.verify(problem, text)
        mask = rollout.completion_mask[row : row + 1]
        groups[problem.index].append({
            "text": text,
            "tokens": len(ids),
            "eos": bool(ids) and ids[-1] in eos_ids,
            "extracted": verdict.extracted,
            "format_valid": verdict.format_valid,
            "reward": verdict.reward,
            "kl_per_token": float(kl_q_pi(rollout.logprobs[row : row + 1], rollout.plain_logprobs[row : row + 1], mask)),
            "log_q": float(rollout.logprobs[row].sum()),
            "log_pi": float(rollout.plain_logprobs[row].sum()),
            "log_pi_guide": float(rollout.guide_logprobs[row].sum()),
        })
    load = load_average()
    return [
        {
            "task": shard.task, "lam": shard.lam, "prompt_index": problem.index, "question": problem.question,
            "answer": problem.answer, "noise_seed": shard.noise_seed(config.seed), "shard_seconds": round(seconds, 3),
            "load_average": load, "rollouts": groups[problem.index],
        }
        for problem in problems
    ]


def _eos_ids(loaded) -> set[int]:
    ids = loaded.model.generation_config.eos_token_id
    ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------------------------------------------------
# Summaries, tables and plots: from records.jsonl alone
# ---------------------------------------------------------------------------------------------------------

COLUMNS = [
    ("task", "task", ""),
    ("lam", "λ", "g"),
    ("groups", "prompts", "d"),
    ("reward_rate", "reward", ".3f"),
    ("reward_se", "± se", ".3f"),
    ("pass_rate", "pass", ".3f"),
    ("informative", "informative", ".3f"),
    ("all_fail", "all-fail", ".3f"),
    ("all_pass", "all-pass", ".3f"),
    ("kl_per_token", "KL(q‖π)/tok", ".3f"),
    ("leakage", "leakage", ".3f"),
    ("format_valid", "format-valid", ".3f"),
    ("length", "length", ".1f"),
    ("truncated", "cut off", ".3f"),
]


def summarize(records: list[dict], hint_template: str = DEFAULT_HINT_TEMPLATE) -> list[dict]:
    """One row per (task, λ), in task order of first appearance and λ descending."""
    groups = defaultdict(list)
    for record in records:
        texts = [rollout["text"] for rollout in record["rollouts"]]
        leaked = hint_leakage(texts, [record["answer"]] * len(texts), hint_template)
        groups[(record["task"], record["lam"])].append(
            [rollout | {"leaked": flag} for rollout, flag in zip(record["rollouts"], leaked)]
        )
    task_order = list(dict.fromkeys(record["task"] for record in records))
    rows = []
    for task, lam in sorted(groups, key=lambda key: (task_order.index(key[0]), -key[1])):
        rows.append({"task": task, "lam": lam, **_metrics(groups[(task, lam)])})
    return rows


def _metrics(groups: list[list[dict]]) -> dict:
    rollouts = [rollout for group in groups for rollout in group]
    rewards = [[rollout["reward"] for rollout in group] for group in groups]
    group_means = [statistics.fmean(r) for r in rewards]
    tokens = sum(rollout["tokens"] for rollout in rollouts)
    return {
        "groups": len(groups),
        "rollouts": len(rollouts),
        "reward_rate": statistics.fmean(group_means),
        "reward_se": statistics.stdev(group_means) / len(groups) ** 0.5 if len(groups) > 1 else None,
        "pass_rate": _share(rollout["reward"] == 1.0 for rollout in rollouts),
        "informative": _share(len(set(r)) > 1 for r in rewards),
        "all_fail": _share(all(value == 0.0 for value in r) for r in rewards),
        "all_pass": _share(all(value == 1.0 for value in r) for r in rewards),
        # Token-weighted: the per-rollout means of kl_q_pi pooled into the mean over all sampled tokens.
        "kl_per_token": sum(r["kl_per_token"] * r["tokens"] for r in rollouts) / tokens if tokens else None,
        "leakage": _share(rollout["leaked"] for rollout in rollouts),
        "format_valid": _share(rollout["format_valid"] for rollout in rollouts),
        "length": statistics.fmean(rollout["tokens"] for rollout in rollouts),
        "truncated": _share(not rollout["eos"] for rollout in rollouts),
    }


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags)


def report(run_dir: RunDir) -> list[dict]:
    """Rebuild summary.json, summary.csv and reward.png from the records, and print the table."""
    config = run_dir.invocations()[-1]["config"]
    rows = summarize(run_dir.records(), config["hint_template"])
    if not rows:
        raise UsageError(f"{run_dir.path} has no reward records yet")
    run_dir.write_json("summary.json", {"definitions": __doc__, "rows": rows})
    run_dir.write_csv("summary.csv", rows, [key for key, _, _ in COLUMNS] + ["rollouts"])
    plot(run_dir, rows)
    harness.print_table(
        f"reward vs λ: {config['model']}, G={config['generations']}, max_new_tokens={config['max_new_tokens']}, "
        f"T={config['temperature']:g}",
        rows, COLUMNS,
    )
    return rows


PANELS = [
    ("reward_rate", "reward rate"),
    ("informative", "informative groups"),
    ("all_fail", "all-fail groups"),
    ("kl_per_token", "KL(q‖π) per token"),
    ("leakage", "hint leakage"),
    ("format_valid", "format-valid"),
]


def plot(run_dir: RunDir, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for axis, (key, title) in zip(axes.flat, PANELS):
        for task in dict.fromkeys(row["task"] for row in rows):
            series = [row for row in rows if row["task"] == task and row[key] is not None]
            lams = [row["lam"] for row in series]
            values = [row[key] for row in series]
            if key == "reward_rate" and all(row["reward_se"] is not None for row in series):
                axis.errorbar(lams, values, yerr=[row["reward_se"] for row in series], marker="o", capsize=3, label=task)
            else:
                axis.plot(lams, values, marker="o", label=task)
        axis.set_title(title)
        axis.set_xlabel("λ (1 = plain policy, 0 = answer-conditioned)")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    run_dir.save_figure(figure, "reward.png")
    plt.close(figure)
