"""`prodsample reward`: what answer guidance does to rewards, as a function of the hint's form and λ.

For each task, hint template, prompt and λ, G rollouts are sampled (`--backend hf`: `prodsample.hf.guided_generate`;
`--backend vllm`: `prodsample.vllm.GuidedLLM`; the hint is the task's answer put into the template) and scored by
the task's verifier (rules in `prodsample.benchmarks.tasks`). λ = 1 never sees the hint, so it runs once per task
and every template shares it (template "plain"). Per (task, template, λ):

- reward rate: mean verifier reward over rollouts, ± the standard error over prompts and its 95% interval
  (± 1.96 se);
- pass rate: share of rollouts with reward 1;
- informative groups: share of prompts whose G rewards are not all equal (nonzero variance: the only groups
  that give GRPO a gradient); all-fail (every reward 0) and all-pass (every reward 1) groups;
- KL(q‖π) per token: the mean of log q − log π(o | prompt) over sampled tokens (`prodsample.importance.kl_q_pi`),
  an estimate of how far the guided sampler is from the policy a trainer updates;
- gain vs λ = 1: the mean over prompts of the reward difference to the plain run on the same prompt and noise,
  ± 1.96 × its standard error (paired, so tighter than the two rows' own intervals);
- rescued: of the groups that are all-fail at λ = 1 (same task, prompts and noise), the share with at least
  one rewarded rollout (reward > 0) in this cell; "rescue n" counts those all-fail groups;
- hint leakage: share of rollouts that state the answer without its derivation
  (`prodsample.prompts.answer_without_derivation`: the answer among the first 8 words); the plain rows give
  the rate at which the policy answers first on its own;
- hint echo: share of rollouts that restate the hint's wording (`prodsample.prompts.hint_leakage`, the rule
  the TRL hook logs); both leakage rules run on the recorded texts when the summary is built;
- format-valid rate, mean completion length in tokens, and the share cut off at --max-new-tokens.

Work is split into shards of --prompts-per-shard prompts at one (template, λ) (one generate call each),
appended to `records.jsonl` as they finish; a rerun continues, and may add tasks, prompts, templates or λ. The
noise key of a shard depends on (seed, task, first prompt) but neither on λ nor on the template, so every cell
sees the same prompts with the same noise (common random numbers): the differences between cells are less
noisy than independent draws would make them, and "rescued" compares like with like.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

from prodsample import SamplingSettings
from prodsample.importance import kl_q_pi
from prodsample.prompts import DEFAULT_HINT_TEMPLATE, HINT_TEMPLATES, answer_without_derivation, check_hint_template, hint_leakage

from . import harness, hint_choice
from .backends import BACKENDS, open_backend
from .errors import UsageError
from .runs import RunDir, invocation, load_average
from .tasks import Task

KIND = "reward"
# Families where SmolLM2-135M-Instruct succeeds rarely but not never at λ = 1 (probes: docs/cli.md, "Probes: choosing the task families").
DEFAULT_TASKS = ["letter_counting:max_words=5", "basic_arithmetic:max_terms=2,max_digits=1"]
DEFAULT_PROMPTS = [100, 50]
DEFAULT_LAMS = "1,0.9,0.75,0.5,0.25,0"
PLAIN = "plain"  # the template name of λ = 1 rows: no hint is seen, so one run serves every template
IDENTITY = (
    "model", "dtype", "backend", "generations", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
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
    hint_templates: dict[str, str]  # name -> template
    prompts_per_shard: int
    backend: str = "hf"


@dataclass(frozen=True)
class Shard:
    task: str
    template: str  # a name in config.hint_templates, or PLAIN at λ = 1
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
        "--hint-template", action="append", dest="hint_templates", metavar="TEMPLATE",
        help="how the answer is added to the prompt (repeatable, each compared at every λ < 1): a name from "
        f"prodsample.prompts.HINT_TEMPLATES ({', '.join(HINT_TEMPLATES)}), NAME=TEMPLATE, or a template with "
        "{prompt} and {answer} fields (default: the library's DEFAULT_HINT_TEMPLATE)",
    )
    parser.add_argument("--backend", default="hf", choices=BACKENDS, help="hf: transformers; vllm: vLLM's engine (default: %(default)s)")
    parser.add_argument("--prompts-per-shard", default="8", help="prompts per generate call and per saved shard (default: %(default)s)")
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
        hint_templates=parse_hint_templates(args.hint_templates or [DEFAULT_HINT_TEMPLATE]),
        prompts_per_shard=harness.parse_int(args.prompts_per_shard, "--prompts-per-shard", minimum=1),
        backend=args.backend,
    )


def parse_hint_templates(items: list[str]) -> dict[str, str]:
    """`--hint-template` values → {name: template}: a known name, NAME=TEMPLATE, or a bare template (named
    after the known template it equals, else "custom")."""
    templates = {}
    for item in items:
        name, equals, text = item.partition("=")
        if item in HINT_TEMPLATES:
            name, text = item, HINT_TEMPLATES[item]
        elif equals and name.isidentifier() and "{" not in name:
            pass
        else:
            text = item
            name = next((known for known, template in HINT_TEMPLATES.items() if template == item), "custom")
        try:
            check_hint_template(text)
        except ValueError as error:
            raise UsageError(f"--hint-template {item!r}: {error}") from None
        if name == PLAIN or name in templates:
            raise UsageError(f"--hint-template: the name {name!r} is {'reserved for λ = 1' if name == PLAIN else 'given twice'}")
        templates[name] = text
    return templates


def check_template_names(config: RewardConfig, run_dir: RunDir) -> None:
    """A template name means one text for the whole run: the records name templates, not texts."""
    for earlier in run_dir.invocations():
        known = earlier["config"].get("hint_templates", {})
        for name, text in config.hint_templates.items():
            if name in known and known[name] != text:
                raise UsageError(
                    f"--out {run_dir.path} already has a template {name!r} = {known[name]!r}; give this one "
                    f"({text!r}) another name (NAME=TEMPLATE)"
                )


def main(args) -> RunDir:
    config = config_from_args(args)
    run_dir = RunDir(harness.output_dir(args, KIND))
    threads = harness.set_threads(args.threads)
    tasks = {spec: Task(spec, seed=config.seed) for spec in config.tasks}  # bad task names fail before the model loads
    check_template_names(config, run_dir)
    source = open_backend(config.backend, args, seed=config.seed)
    run_dir.start(invocation(KIND, getattr(args, "command_line", None), asdict(config), IDENTITY, {"seed": config.seed}, source.device))
    print(f"[prodsample reward] {source.name} ({source.source}) on {config.backend}, {threads} thread(s), results in {run_dir.path}")
    sweep(config, tasks, source, run_dir)
    report(run_dir)
    return run_dir


def cells(config: RewardConfig) -> list[tuple[str, float]]:
    """(template, λ) pairs to run: λ = 1 once, as PLAIN, then every template at every other λ."""
    plain = [(PLAIN, 1.0)] if 1.0 in config.lams else []
    return plain + [(name, lam) for name in config.hint_templates for lam in config.lams if lam != 1.0]


def record_key(record: dict) -> tuple[str, str, float, int]:
    """(task, template, λ, prompt); records written before templates were named count as "default"."""
    template = PLAIN if record["lam"] == 1.0 else record.get("template", "default")
    return record["task"], template, record["lam"], record["prompt_index"]


def plan(config: RewardConfig, done: set[tuple[str, str, float, int]]) -> list[Shard]:
    """The shards still to run: per task, prompt chunks in order, every cell of a chunk before the next
    chunk, so an interrupted run has the same prompts in every cell."""
    shards = []
    for spec, count in zip(config.tasks, config.prompts):
        for start in range(0, count, config.prompts_per_shard):
            chunk = tuple(range(start, min(start + config.prompts_per_shard, count)))
            for template, lam in cells(config):
                todo = tuple(i for i in chunk if (spec, template, lam, i) not in done)
                if todo:
                    shards.append(Shard(spec, template, lam, todo))
    return shards


def sweep(config: RewardConfig, tasks: dict[str, Task], source, run_dir: RunDir) -> None:
    done = {record_key(record) for record in run_dir.records()}
    shards = plan(config, done)
    total = sum(len(shard.prompt_indices) for shard in shards) * config.generations
    with harness.ProgressReport(total, "rollouts") as progress:
        for shard in shards:
            progress.describe(f"{shard.task} {shard.template} λ={shard.lam:g}")
            run_dir.append(run_shard(shard, tasks[shard.task], source, config))
            progress.advance(len(shard.prompt_indices) * config.generations)


def run_shard(shard: Shard, task: Task, source, config: RewardConfig) -> list[dict]:
    """One generate call; one record per prompt (group) with its G rollouts."""
    problems = [task.problem(i) for i in shard.prompt_indices]
    template = config.hint_templates.get(shard.template, DEFAULT_HINT_TEMPLATE)  # PLAIN: never rendered into q
    settings = SamplingSettings(
        lam=shard.lam, num_generations=config.generations, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        seed=shard.noise_seed(config.seed), hint_template=template,
    )
    started = time.perf_counter()
    rollout = source.generate([task.prompt(p) for p in problems], [p.answer for p in problems], settings)
    seconds = time.perf_counter() - started
    eos_ids = source.eos_ids
    texts = source.tokenizer.batch_decode(rollout.completion_lists(), skip_special_tokens=True)
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
            "task": shard.task, "template": shard.template, "lam": shard.lam, "prompt_index": problem.index, "question": problem.question,
            "answer": problem.answer, "noise_seed": shard.noise_seed(config.seed), "shard_seconds": round(seconds, 3),
            "load_average": load, "rollouts": groups[problem.index],
        }
        for problem in problems
    ]


# ---------------------------------------------------------------------------------------------------------
# Summaries, tables and plots: from records.jsonl alone
# ---------------------------------------------------------------------------------------------------------

COLUMNS = [
    ("task", "task", ""),
    ("template", "template", ""),
    ("lam", "λ", "g"),
    ("groups", "prompts", "d"),
    ("reward_rate", "reward", ".3f"),
    ("reward_ci", "± 95%", ".3f"),
    ("gain", "gain vs λ=1", "+.3f"),
    ("gain_ci", "± 95%", ".3f"),
    ("pass_rate", "pass", ".3f"),
    ("informative", "informative", ".3f"),
    ("all_fail", "all-fail", ".3f"),
    ("rescued", "rescued", ".3f"),
    ("rescue_n", "of", "d"),
    ("kl_per_token", "KL(q‖π)/tok", ".4f"),
    ("leakage", "leakage", ".3f"),
    ("echo", "echo", ".3f"),
    ("format_valid", "format-valid", ".3f"),
    ("length", "length", ".1f"),
    ("truncated", "cut off", ".3f"),
]


def summarize(records: list[dict], hint_templates: dict[str, str] | None = None) -> list[dict]:
    """One row per (task, template, λ): tasks in order of first appearance, the plain row (λ = 1) first, then
    templates in order of first appearance and λ descending. `hint_templates` (name → template) serves the
    echo rule; a name it lacks (and the plain rows) uses DEFAULT_HINT_TEMPLATE."""
    hint_templates = hint_templates or {}
    groups = defaultdict(list)
    for record in records:
        task, template, lam, _ = record_key(record)
        texts = [rollout["text"] for rollout in record["rollouts"]]
        answers = [record["answer"]] * len(texts)
        echoed = hint_leakage(texts, answers, hint_templates.get(template, DEFAULT_HINT_TEMPLATE))
        leaked = answer_without_derivation(texts, answers)
        groups[(task, template, lam)].append({
            "prompt_index": record["prompt_index"],
            "rollouts": [rollout | {"echo": e, "leaked": k} for rollout, e, k in zip(record["rollouts"], echoed, leaked)],
        })
    plain_rewards = {
        (task, group["prompt_index"]): [rollout["reward"] for rollout in group["rollouts"]]
        for (task, template, _), cell in groups.items() if template == PLAIN
        for group in cell
    }
    plain_fails = {key for key, rewards in plain_rewards.items() if all(value == 0.0 for value in rewards)}
    task_order = list(dict.fromkeys(key[0] for key in groups))
    template_order = list(dict.fromkeys([PLAIN] + [key[1] for key in groups]))
    rows = []
    for task, template, lam in sorted(groups, key=lambda key: (task_order.index(key[0]), template_order.index(key[1]), -key[2])):
        cell = groups[(task, template, lam)]
        failed = [group for group in cell if (task, group["prompt_index"]) in plain_fails]
        paired = [
            (group["rollouts"], plain_rewards[task, group["prompt_index"]])
            for group in cell if (task, group["prompt_index"]) in plain_rewards
        ]
        rows.append({
            "task": task, "template": template, "lam": lam, **_metrics([g["rollouts"] for g in cell]), **rescue(failed),
            **gain(paired),
        })
    return rows


def gain(paired: list[tuple[list[dict], list[float]]]) -> dict:
    """Reward gain over λ = 1 on the same prompts and noise: the mean over prompts of (this cell's group mean
    − the plain group mean), ± 1.96 × its standard error. Pairing removes the prompts' own difficulty from
    the interval, so it separates λ = 1 from λ < 1 with fewer prompts than two independent intervals would."""
    diffs = [statistics.fmean(r["reward"] for r in rollouts) - statistics.fmean(plain) for rollouts, plain in paired]
    if not diffs:
        return {"gain": None, "gain_ci": None}
    ci = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"gain": statistics.fmean(diffs), "gain_ci": ci}


def rescue(failed_groups: list[dict]) -> dict:
    """Of groups all-fail at λ = 1, the share with a rewarded rollout here (None when there are none)."""
    rescued = [any(rollout["reward"] > 0 for rollout in group["rollouts"]) for group in failed_groups]
    return {"rescued": _share(rescued) if rescued else None, "rescue_n": len(rescued)}


def _metrics(groups: list[list[dict]]) -> dict:
    rollouts = [rollout for group in groups for rollout in group]
    rewards = [[rollout["reward"] for rollout in group] for group in groups]
    group_means = [statistics.fmean(r) for r in rewards]
    tokens = sum(rollout["tokens"] for rollout in rollouts)
    se = statistics.stdev(group_means) / len(groups) ** 0.5 if len(groups) > 1 else None
    return {
        "groups": len(groups),
        "rollouts": len(rollouts),
        "reward_rate": statistics.fmean(group_means),
        "reward_se": se,
        "reward_ci": None if se is None else 1.96 * se,
        "pass_rate": _share(rollout["reward"] == 1.0 for rollout in rollouts),
        "informative": _share(len(set(r)) > 1 for r in rewards),
        "all_fail": _share(all(value == 0.0 for value in r) for r in rewards),
        "all_pass": _share(all(value == 1.0 for value in r) for r in rewards),
        # Token-weighted: the per-rollout means of kl_q_pi pooled into the mean over all sampled tokens.
        "kl_per_token": sum(r["kl_per_token"] * r["tokens"] for r in rollouts) / tokens if tokens else None,
        "leakage": _share(rollout["leaked"] for rollout in rollouts),
        "echo": _share(rollout["echo"] for rollout in rollouts),
        "format_valid": _share(rollout["format_valid"] for rollout in rollouts),
        "length": statistics.fmean(rollout["tokens"] for rollout in rollouts),
        "truncated": _share(not rollout["eos"] for rollout in rollouts),
    }


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags)


def report(run_dir: RunDir) -> list[dict]:
    """Rebuild summary.json, summary.csv and reward.png from the records, and print the table."""
    invocations = run_dir.invocations()
    config = invocations[-1]["config"]
    templates = {}
    for line in invocations:  # runs from before named templates recorded one, as "hint_template"
        templates |= line["config"].get("hint_templates") or {"default": line["config"].get("hint_template", DEFAULT_HINT_TEMPLATE)}
    rows = summarize(run_dir.records(), templates)
    if not rows:
        raise UsageError(f"{run_dir.path} has no reward records yet")
    pooled = hint_choice.pool(rows, PLAIN)
    choice = hint_choice.choose(pooled) if len({row["template"] for row in pooled}) > 1 else None
    run_dir.write_json("summary.json", {"definitions": __doc__, "templates": templates, "rows": rows,
                                        "pooled_over_tasks": pooled, "choice": choice})
    run_dir.write_csv("summary.csv", rows, [key for key, _, _ in COLUMNS] + ["reward_se", "rollouts"])
    plot(run_dir, rows)
    harness.print_table(
        f"reward vs hint and λ: {config['model']}, G={config['generations']}, max_new_tokens={config['max_new_tokens']}, "
        f"T={config['temperature']:g}",
        rows, COLUMNS,
    )
    if choice is not None:
        harness.print_table("pooled over tasks (the hint study's rule: benchmarks/hint_choice.py)", pooled, POOLED_COLUMNS)
        print(f"choice: {choice['template']} (goal {'met' if choice['goal_met'] else 'not met'}), best two "
              f"{choice['best_two']}, starting λ {choice['start_lam']}")
    return rows


POOLED_COLUMNS = [
    ("template", "template", ""), ("lam", "λ", "g"), ("tasks", "tasks", "d"), ("reward_rate", "reward", ".3f"),
    ("rescued_groups", "rescued", "d"), ("all_fail_groups", "of", "d"), ("rescued", "share", ".3f"),
    ("kl_per_token", "KL(q‖π)/tok", ".4f"), ("leakage", "leakage", ".3f"),
]


PANELS = [
    ("reward_rate", "reward rate (± 95%)"),
    ("rescued", "all-fail groups rescued"),
    ("informative", "informative groups"),
    ("kl_per_token", "KL(q‖π) per token"),
    ("leakage", "answer without derivation"),
    ("truncated", "cut off"),
]


def plot(run_dir: RunDir, rows: list[dict]) -> None:
    """One column per task, one row per metric, one line per template vs λ; each line starts at the plain
    row (λ = 1), which every template shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(row["task"] for row in rows))
    figure, axes = plt.subplots(len(PANELS), len(tasks), figsize=(4.6 * len(tasks), 2.6 * len(PANELS)), squeeze=False)
    for column, task in enumerate(tasks):
        plain = [row for row in rows if row["task"] == task and row["template"] == PLAIN]
        templates = [t for t in dict.fromkeys(row["template"] for row in rows if row["task"] == task) if t != PLAIN] or [PLAIN]
        for line_index, template in enumerate(templates):
            series = sorted(plain + [row for row in rows if row["task"] == task and row["template"] == template and row["template"] != PLAIN],
                            key=lambda row: -row["lam"])
            for axis, (key, title) in zip(axes[:, column], PANELS):
                points = [row for row in series if row[key] is not None or (key == "rescued" and row["template"] == PLAIN)]
                lams = [row["lam"] for row in points]
                values = [0.0 if row[key] is None else row[key] for row in points]  # nothing is rescued at λ = 1
                if key == "reward_rate" and all(row["reward_ci"] is not None for row in points):
                    # offset a little in λ so that overlapping intervals stay readable
                    axis.errorbar([lam + 0.008 * line_index for lam in lams], values,
                                  yerr=[row["reward_ci"] for row in points], marker="o", capsize=2, label=template)
                else:
                    axis.plot(lams, values, marker="o", label=template)
                axis.set_title(f"{task}\n{title}" if key == PANELS[0][0] else title, fontsize=9)
                axis.grid(alpha=0.3)
    for axis in axes.flat:
        axis.set_xlim(1.05, -0.05)  # λ = 1 (plain) on the left
    for axis in axes[-1]:
        axis.set_xlabel("λ (1 = plain policy, 0 = answer-conditioned)")
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    run_dir.save_figure(figure, "reward.png")
    plt.close(figure)
