"""Summary, readings and plots of the difficulty-ladder experiment (PROTOCOL-ladder.md), from `runs.jsonl` alone.

    python -m prodsample.benchmarks.claim.analyze_ladder benchmarks/results/ladder/mixed

Every evaluation record holds `levels: {A|B|C: {greedy_pass1, mean_at_k, pass_at_k, hinted_greedy}}`. Per arm
and level: final figures (mean over seeds, 95% percentile bootstrap CI over seeds, per seed) and each figure
at equal rollouts: a run's curve, linear in rollouts between evaluation points, read at the plain arm's
final rollout count (every arm consumes at least as many rollouts as plain, so the reading is inside every
run). The readings follow PROTOCOL-ladder.md; the rollouts-to-target of the mixed set is read on
seed-averaged curves so that it is always defined (see `rollouts_to_target`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .analyze import BOOTSTRAP_RESAMPLES, CI, load_runs, mean

FIGURES = ("greedy_pass1", "mean_at_k", "pass_at_k", "hinted_greedy")
PRIMARY = "greedy_pass1"
CONTROLS = ("plain", "plain_2g")  # the arms the readings compare against
SUPERVISED = "star"  # the hint is the label: the supervised reference, never counted as the RL arm
LIFT = 0.10  # "confirmed": ≥ 10 points over plain on C; "capacity": STaR lifts C by less than this
PLAIN_FLOOR = 0.02  # "confirmed" also needs plain and plain 2G to end at or below this on C (v1), or to rise by
# at most this from their start (v2: a level judged zero-pass against chance may start above 0)
REFUTE_MARGIN = 0.03  # "refuted": plain within 3 points of the best RL arm on C


def at_rollouts(records: list[dict], rollouts: float, level: str, figure: str) -> float:
    """A run's figure at `rollouts`, linear between evaluation points (the last one beyond its end)."""
    previous = records[0]
    for record in records[1:]:
        if record["rollouts"] >= rollouts:
            span = record["rollouts"] - previous["rollouts"]
            fraction = (rollouts - previous["rollouts"]) / span if span else 1.0
            low, high = previous["levels"][level][figure], record["levels"][level][figure]
            return low + fraction * (high - low)
        previous = record
    return previous["levels"][level][figure]


def overall(record: dict, figure: str = PRIMARY) -> float:
    """The mean of a figure over the levels (each level weighs the same)."""
    return sum(values[figure] for values in record["levels"].values()) / len(record["levels"])


def bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of the mean over seeds resampled with replacement (every ladder figure is finite)."""
    resamples = np.random.default_rng(seed).choice(np.asarray(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    low, high = np.quantile(resamples.mean(axis=1), [(1 - CI) / 2, (1 + CI) / 2])
    return float(low), float(high)


def seed_stats(values: dict[int, float]) -> dict:
    ordered = [values[seed] for seed in sorted(values)]
    return {"mean": mean(ordered), "ci": bootstrap_ci(ordered), "per_seed": dict(sorted(values.items()))}


def arm_summary(seeds: dict[int, list[dict]], equal_rollouts: float) -> dict:
    levels = list(next(iter(seeds.values()))[0]["levels"])
    return {
        "seeds": sorted(seeds),
        "total_rollouts": mean([records[-1]["rollouts"] for records in seeds.values()]),
        "total_row_tokens": mean([records[-1]["row_tokens"] for records in seeds.values()]),
        "seconds": mean([records[-1]["seconds"] for records in seeds.values()]),
        "levels": {
            level: {
                "start": {f: mean([records[0]["levels"][level][f] for records in seeds.values()]) for f in FIGURES},
                "final": {f: seed_stats({s: records[-1]["levels"][level][f] for s, records in seeds.items()})
                          for f in FIGURES},
                "at_equal_rollouts": {f: seed_stats({s: at_rollouts(records, equal_rollouts, level, f)
                                                     for s, records in seeds.items()}) for f in FIGURES},
            }
            for level in levels
        },
    }


def averaged_curve(seeds: dict[int, list[dict]]) -> list[tuple[float, float]]:
    """(rollouts, overall greedy pass@1) at each evaluation point, averaged over seeds (runs share the points)."""
    runs = list(seeds.values())
    return [(mean([run[i]["rollouts"] for run in runs]), mean([overall(run[i]) for run in runs]))
            for i in range(min(map(len, runs)))]


def rollouts_to_target(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Rollouts at which each arm's seed-averaged overall greedy pass@1 first reaches plain's seed-averaged final.

    Plain's averaged curve ends at the target, so plain always has a value; an arm whose averaged curve never
    reaches it gets its total rollouts, marked `censored` (a lower bound). The crossing is interpolated
    linearly between evaluation points. `ratio` is the arm's value over plain's.
    """
    if "plain" not in runs:
        return {}
    target = averaged_curve(runs["plain"])[-1][1]
    table = {}
    for arm, seeds in runs.items():
        curve = averaged_curve(seeds)
        table[arm] = {"rollouts": curve[-1][0], "censored": True}
        previous = None  # the last point below the target
        for x, y in curve:
            if y >= target:
                crossing = x if previous is None else previous[0] + (target - previous[1]) / (y - previous[1]) * (x - previous[0])
                table[arm] = {"rollouts": crossing, "censored": False}
                break
            previous = (x, y)
    plain_value = table["plain"]["rollouts"]
    for entry in table.values():
        entry["ratio_to_plain"] = entry["rollouts"] / plain_value if plain_value else None
    return {"target_overall_greedy_pass1": target, "arms": table}


def readings(arms: dict, version: str = "v1") -> dict:
    """The readings on level C, at equal rollouts (plain's final rollout count): PROTOCOL-ladder.md's (v1), or
    PROTOCOL-ladder-v2.md's, which bound the controls' rise on C rather than their end."""
    if not all(name in arms for name in ("plain", SUPERVISED)) or "C" not in arms["plain"]["levels"]:
        return {"verdict": None, "why": "needs plain, star and level C"}

    def c_equal(arm):
        return arms[arm]["levels"]["C"]["at_equal_rollouts"][PRIMARY]

    plain = c_equal("plain")
    rl_arms = [name for name in arms if name not in CONTROLS and name != SUPERVISED]
    best = max(rl_arms, key=lambda name: c_equal(name)["mean"], default=None)
    controls_final = {name: arms[name]["levels"]["C"]["final"][PRIMARY]["mean"] for name in CONTROLS if name in arms}
    controls_rise = {name: final - arms[name]["levels"]["C"]["start"][PRIMARY] for name, final in controls_final.items()}
    controls_bounded = controls_rise if version == "v2" else controls_final
    star = arms[SUPERVISED]["levels"]["C"]
    star_lift = star["final"][PRIMARY]["mean"] - star["start"][PRIMARY]
    confirming = [
        name for name in rl_arms
        if c_equal(name)["mean"] - plain["mean"] >= LIFT
        and min(c_equal(name)["per_seed"].values()) > max(plain["per_seed"].values())
    ]
    facts = {
        "plain_C_at_equal_rollouts": plain["mean"],
        "controls_final_C": controls_final,
        "controls_rise_C": controls_rise,
        "best_rl_arm": best,
        "best_rl_arm_C_at_equal_rollouts": None if best is None else c_equal(best)["mean"],
        "star_C_lift": star_lift,
        "confirming_arms": confirming,
    }
    if star_lift < LIFT:
        verdict = "capacity"
    elif confirming and all(value <= PLAIN_FLOOR for value in controls_bounded.values()):
        verdict = "confirmed"
    elif best is not None and plain["mean"] >= c_equal(best)["mean"] - REFUTE_MARGIN:
        verdict = "refuted"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, **facts}


def summarise(runs: dict[str, dict[int, list[dict]]], version: str = "v1") -> dict:
    equal_rollouts = mean([records[-1]["rollouts"] for records in runs["plain"].values()]) if "plain" in runs else None
    arms = {arm: arm_summary(seeds, equal_rollouts or 0) for arm, seeds in runs.items()}
    return {
        "equal_rollouts": equal_rollouts,
        "arms": arms,
        "readings": readings(arms, version),
        "rollouts_to_target": rollouts_to_target(runs),
    }


def plot(runs: dict[str, dict[int, list[dict]]], out: Path) -> None:
    """One figure per x-axis: rows are the figures, columns the levels; mean line, min–max band, seeds thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(next(iter(next(iter(runs.values())).values()))[0]["levels"])
    for x_key in ("rollouts", "row_tokens", "seconds"):
        fig, axes = plt.subplots(len(FIGURES), len(levels), figsize=(5 * len(levels), 3.2 * len(FIGURES)),
                                 squeeze=False, sharex="col")
        for index, (arm, seeds) in enumerate(sorted(runs.items())):
            colour, seed_runs = f"C{index}", list(seeds.values())
            points = min(map(len, seed_runs))
            x = [mean([run[i][x_key] for run in seed_runs]) for i in range(points)]
            for row, figure in enumerate(FIGURES):
                for column, level in enumerate(levels):
                    ax = axes[row][column]
                    values = [[run[i]["levels"][level][figure] for run in seed_runs] for i in range(points)]
                    for run in seed_runs:
                        ax.plot([r[x_key] for r in run], [r["levels"][level][figure] for r in run], color=colour,
                                alpha=0.25, linewidth=0.7)
                    ax.plot(x, [mean(v) for v in values], color=colour, label=arm if row == column == 0 else None)
                    ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.12)
                    ax.set_title(f"level {level}: held-out {figure}", fontsize=9)
                    ax.grid(alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel(x_key.replace("_", " ") + (" (s)" if x_key == "seconds" else " consumed"))
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves-{x_key}.png", dpi=70)
        plt.close(fig)


def write_summary(out: Path) -> dict:
    runs = load_runs(out)
    meta = json.loads((out / "meta.json").read_text())
    summary = {"meta": meta, **summarise(runs, meta.get("ladder_version") or "v1")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(runs, out)
    return summary


if __name__ == "__main__":
    print(json.dumps(write_summary(Path(sys.argv[1])), indent=1))
