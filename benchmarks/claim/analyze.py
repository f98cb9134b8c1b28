"""Summary and plots of a claim comparison, computed from `runs.jsonl` alone (rerunnable at any time).

    python -m prodsample.benchmarks.claim.analyze benchmarks/results/claim

Target: the plain arm's final held-out greedy pass@1, averaged over its seeds. For each run, the rollouts
and row-tokens consumed at the first evaluation point at or above the target (None: never reached). Per
arm: means over seeds with a percentile bootstrap CI over seeds (a resample containing a run that never
reached the target has no finite mean, so its bound is reported as None). The claim's three conditions
are evaluated as PROTOCOL.md states them.

Also reported, per arm, and marked exploratory because the protocol did not name them: the per-seed finals
and rollouts-to-target, the learning curve averaged over seeds at each evaluation step, and the mean held-out
greedy pass@1 over the evaluation points after step 0 (the area under the curve per evaluation, a
measure of learning speed that every run has, reached target or not) with its bootstrap CI over seeds, and
the training rewards of every arm in matched phases (`phase_matched_rewards`).
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

BOOTSTRAP_RESAMPLES = 10_000
CI = 0.95
PRIMARY = "greedy_pass1"


def load_runs(out: Path) -> dict[str, dict[int, list[dict]]]:
    """arm → seed → evaluation records in step order, finished runs only."""
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for record in records:
        runs[record["arm"]].setdefault(record["seed"], []).append(record)
    return {arm: {seed: sorted(rs, key=lambda r: r["step"]) for seed, rs in seeds.items()} for arm, seeds in runs.items()}


def bootstrap_ci(values: list[float | None], seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile CI of the mean over resampled seeds; None (= unreached) makes a resample's mean infinite."""
    if not values:
        return None, None
    rng = random.Random(seed)
    finite = [float("inf") if v is None else v for v in values]
    means = sorted(sum(rng.choices(finite, k=len(finite))) / len(finite) for _ in range(BOOTSTRAP_RESAMPLES))
    low, high = means[int((1 - CI) / 2 * BOOTSTRAP_RESAMPLES)], means[int((1 + CI) / 2 * BOOTSTRAP_RESAMPLES) - 1]
    return (None if low == float("inf") else low), (None if high == float("inf") else high)


def mean(values):
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def first_reaching(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if r[PRIMARY] >= target), None)


def summarise(runs: dict[str, dict[int, list[dict]]]) -> dict:
    plain_finals = [records[-1][PRIMARY] for records in runs.get("plain", {}).values()]
    target = mean(plain_finals)
    arms = {}
    for arm, seeds in runs.items():
        finals = [records[-1][PRIMARY] for records in seeds.values()]
        reached = {seed: first_reaching(records, target) if target is not None else None for seed, records in seeds.items()}
        to_target = {
            key: [None if hit is None else hit[key] for hit in reached.values()] for key in ("rollouts", "row_tokens")
        }
        arms[arm] = {
            "seeds": sorted(seeds),
            "start_" + PRIMARY: mean([records[0][PRIMARY] for records in seeds.values()]),
            "final_" + PRIMARY: mean(finals),
            "final_" + PRIMARY + "_ci": bootstrap_ci(finals),
            "final_mean_at_k": mean([records[-1]["mean_at_k"] for records in seeds.values()]),
            "total_rollouts": mean([records[-1]["rollouts"] for records in seeds.values()]),
            "total_row_tokens": mean([records[-1]["row_tokens"] for records in seeds.values()]),
            "seconds": mean([records[-1]["seconds"] for records in seeds.values()]),
            "reached_target": sum(hit is not None for hit in reached.values()),
            **{f"{key}_to_target": mean(values) for key, values in to_target.items()},
            **{f"{key}_to_target_ci": bootstrap_ci(values) for key, values in to_target.items()},
            "guided_reward": mean([_train_mean(records, "guided_reward") for records in seeds.values()]),
            "plain_reward": mean([_train_mean(records, "plain_reward") for records in seeds.values()]),
            "informative_groups": mean([_train_mean(records, "informative_groups") for records in seeds.values()]),
            "final_pass_at_k": mean([records[-1]["pass_at_k"] for records in seeds.values()]),
            "exploratory": exploratory(seeds, to_target["rollouts"]),
        }
    return {"target_" + PRIMARY: target, "arms": arms, "claim": claim_verdict(arms)}


def exploratory(seeds: dict[int, list[dict]], rollouts_to_target: list[float | None]) -> dict:
    """Figures outside the protocol (see the module docstring); runs of one arm share evaluation steps."""
    areas = [sum(r[PRIMARY] for r in records[1:]) / len(records[1:]) for records in seeds.values()]
    steps = [r["step"] for r in next(iter(seeds.values()))]
    return {
        "final_" + PRIMARY + "_per_seed": {seed: records[-1][PRIMARY] for seed, records in seeds.items()},
        "rollouts_to_target_per_seed": dict(zip(seeds, rollouts_to_target)),
        "mean_" + PRIMARY + "_after_step_0": mean(areas),
        "mean_" + PRIMARY + "_after_step_0_ci": bootstrap_ci(areas),
        "curve": [
            {"step": step, "rollouts": mean([records[i]["rollouts"] for records in seeds.values()]),
             PRIMARY: mean([records[i][PRIMARY] for records in seeds.values()])}
            for i, step in enumerate(steps)
        ],
    }


def _train_mean(records: list[dict], key: str, first: int = 0, last: float = float("inf")) -> float | None:
    """Mean of a training figure over the evaluation windows that end in (first, last] (each covers the steps
    since the previous evaluation point; windows are equal in steps)."""
    values = [r["train"].get(key) for r in records
              if first < r["step"] <= last and r.get("train") and r["train"].get(key) is not None]
    return sum(values) / len(values) if values else None


def phase_matched_rewards(runs: dict[str, dict[int, list[dict]]], anneal_end: int) -> dict:
    """Training rewards of every arm in the same phases, so guided and plain rollouts compare like with like.

    Phases: the first evaluation window (the same starting policy everywhere), the annealed arms' guided phase
    (steps up to `anneal_end`, where λ reaches 1), and the rest. Means over windows, then over seeds.
    """
    first_window = min(r["step"] for seeds in runs.values() for records in seeds.values() for r in records[1:])
    phases = {"first_window": (0, first_window), "guided_phase": (0, anneal_end), "after": (anneal_end, float("inf"))}
    return {
        arm: {
            phase: {key: mean([_train_mean(records, key, low, high) for records in seeds.values()])
                    for key in ("guided_reward", "plain_reward", "informative_groups")}
            for phase, (low, high) in phases.items()
        }
        for arm, seeds in runs.items()
    }


def claim_verdict(arms: dict) -> dict:
    """PROTOCOL.md's target for the annealed arm(s) against plain (G) and plain (2G)."""
    plain, plain_2g = arms.get("plain"), arms.get("plain_2g")
    verdicts = {}
    for name in ("annealed_none", "annealed_is"):
        arm = arms.get(name)
        if not (arm and plain and plain_2g):
            continue
        rollouts, plain_rollouts = arm["rollouts_to_target"], plain["rollouts_to_target"]
        tokens, tokens_2g = arm["row_tokens_to_target"], plain_2g["row_tokens_to_target"]
        verdicts[name] = {
            "half_the_rollouts": None if rollouts is None or plain_rollouts is None else rollouts <= 0.5 * plain_rollouts,
            "fewer_row_tokens_than_plain_2g": None if tokens is None else (tokens_2g is None or tokens < tokens_2g),
            "final_not_worse": arm["final_" + PRIMARY] >= plain["final_" + PRIMARY] - FINAL_TOLERANCE,
        }
    return verdicts


FINAL_TOLERANCE = 0.02  # "not worse": within 2 points of plain's final greedy pass@1 (PROTOCOL.md)


def plot(runs: dict[str, dict[int, list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rollouts", PRIMARY), ("row_tokens", PRIMARY), ("rollouts", "mean_at_k")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (x_key, y_key) in zip(axes, panels):
        for index, (arm, seeds) in enumerate(sorted(runs.items())):
            colour = f"C{index}"
            for seed, records in seeds.items():
                ax.plot([r[x_key] for r in records], [r[y_key] for r in records], color=colour, alpha=0.8,
                        label=arm if seed == min(seeds) else None)
        ax.set_xlabel(x_key.replace("_", " ") + " consumed")
        ax.set_ylabel(f"held-out {y_key}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def write_summary(out: Path) -> dict:
    runs, meta = load_runs(out), json.loads((out / "meta.json").read_text())
    anneal_end = round(meta["config"]["anneal_fraction"] * meta["config"]["steps"])
    summary = {"meta": meta, **summarise(runs), "phase_matched_rewards": phase_matched_rewards(runs, anneal_end)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(runs, out)
    return summary


if __name__ == "__main__":
    print(json.dumps(write_summary(Path(sys.argv[1])), indent=1))
