"""The hint study's decision rule (benchmarks/results/hints-smollm2/PROTOCOL.md), applied to `reward` summary rows.

Rows of several tasks are pooled per (template, λ): all-fail groups and their rescues are summed, KL(q‖π) per
token and leakage are weighted by the tokens and rollouts behind each row. The goal: at λ = ½, ≥ 50% of the
λ = 1 all-fail groups rescued, with KL per token at most half of the template's KL at λ = 0.
"""

from __future__ import annotations

from collections import defaultdict

GOAL_RESCUED = 0.5
GOAL_KL_RATIO = 0.5
TIE_GROUPS = 2  # rescued counts within this many groups are a tie
START_LAMS = (0.75, 0.5, 0.25)


def pool(rows: list[dict], plain: str = "plain") -> list[dict]:
    """One row per (template, λ) over the tasks that have it: rescued = Σ rescued groups / Σ all-fail groups."""
    cells = defaultdict(list)
    for row in rows:
        if row["template"] != plain:
            cells[(row["template"], row["lam"])].append(row)
    pooled = []
    for (template, lam), group in cells.items():
        tokens = sum(row["length"] * row["rollouts"] for row in group)
        failed = sum(row["rescue_n"] for row in group)
        saved = sum(round((row["rescued"] or 0.0) * row["rescue_n"]) for row in group)
        pooled.append({
            "template": template, "lam": lam, "tasks": len(group), "all_fail_groups": failed, "rescued_groups": saved,
            "rescued": saved / failed if failed else None,
            "kl_per_token": sum(row["kl_per_token"] * row["length"] * row["rollouts"] for row in group) / tokens if tokens else None,
            "leakage": sum(row["leakage"] * row["rollouts"] for row in group) / sum(row["rollouts"] for row in group),
            "reward_rate": sum(row["reward_rate"] * row["groups"] for row in group) / sum(row["groups"] for row in group),
        })
    return sorted(pooled, key=lambda row: (row["template"], -row["lam"]))


def choose(pooled: list[dict]) -> dict:
    """The protocol's choice: the template, whether it meets the goal, the best two, and the starting λ."""
    at = {(row["template"], row["lam"]): row for row in pooled}
    candidates = []
    for template in dict.fromkeys(row["template"] for row in pooled):
        half, zero = at.get((template, 0.5)), at.get((template, 0.0))
        if half is None or half["rescued"] is None:
            continue
        kl_ok = zero is not None and half["kl_per_token"] <= GOAL_KL_RATIO * zero["kl_per_token"]
        candidates.append({
            "template": template, "goal": kl_ok and half["rescued"] >= GOAL_RESCUED, "kl_ok": kl_ok,
            "rescued_groups": half["rescued_groups"], "rescued": half["rescued"], "leakage": half["leakage"],
            "kl_per_token": half["kl_per_token"],
        })
    if not candidates:
        return {"template": None, "goal_met": False, "ranking": [], "start_lam": None}
    best_count = max(c["rescued_groups"] for c in candidates)

    def order(c):  # goal first, then KL condition, then rescues (ties within TIE_GROUPS), then leakage, then KL
        tied = c["rescued_groups"] >= best_count - TIE_GROUPS
        return (not c["goal"], not c["kl_ok"], -c["rescued_groups"] if not tied else -best_count, c["leakage"], c["kl_per_token"])

    ranking = sorted(candidates, key=order)
    chosen = ranking[0]["template"]
    start = next((lam for lam in START_LAMS if (at.get((chosen, lam)) or {}).get("rescued") is not None
                  and at[(chosen, lam)]["rescued"] >= GOAL_RESCUED), 0.5)
    return {"template": chosen, "goal_met": ranking[0]["goal"], "best_two": [c["template"] for c in ranking[:2]],
            "ranking": ranking, "start_lam": start}
