"""The difficulty-ladder experiment: its sets, warm-up rows, gate, schedule, readings and a toy run."""

import json

import pytest

from prodsample.benchmarks.claim import analyze_ladder, make_policy, run, task
from prodsample.benchmarks.claim.evaluate import derangement
from prodsample.benchmarks.claim.train import ARMS, RunConfig, make_schedule

TOY_SIZES = {"held_out": 6, "validation": 5, "train": 8}


def test_ladder_splits_are_disjoint_and_the_warmup_excludes_them():
    sets = task.ladder_sets(TOY_SIZES)
    for level, difficulty in task.LADDER.items():
        splits = [{p.expression for p in sets[split][level]} for split in task.LADDER_SPLITS]
        assert [len(s) for s in splits] == [TOY_SIZES[split] for split in task.LADDER_SPLITS]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        terms = {len(p.expression.split()) // 2 + 1 for p in sets["train"][level]}
        assert terms == {difficulty.min_terms}
    exclude = {p.expression for split in sets.values() for problems in split.values() for p in problems}
    rows = make_policy.ladder_warmup_rows(4, 10, {"A": 3, "B": 1}, exclude, seed=0)
    assert not {prompt.split("=")[0] for prompt, _ in rows} & exclude
    plain = [prompt for prompt, _ in rows if "[" not in prompt]
    assert len(rows) == 2 * 4 + 3 * 10 + 3 + 1 and len(plain) == 4 + 3 + 1
    assert not any(len(p.split()) == 5 and max(len(t) for t in p[:-1].split()[::2]) == 2 for p in plain)  # no plain C


@pytest.mark.parametrize("answer, written", [("-127", "-721"), ("120", "021"), ("0", "0"), ("7", "7"), ("-30", "-03")])
def test_lsd_first_answers_are_read_back_by_the_verifier(answer, written):
    assert task.lsd_first(answer) == written and task.from_lsd_first(written) == answer


def test_the_v2_verifier_scores_lsd_first_completions_and_nothing_else():
    problem = task.make_problems(task.LADDERS["v2"].levels["C"], 1, seed=3, answer_format="lsd")[0]
    usual = problem.entry["answer"]
    assert problem.answer == task.lsd_first(usual) and usual.lstrip("-")[::-1] != usual.lstrip("-")  # not a palindrome
    assert task.reward(problem.answer, problem) == 1.0 and task.reward(f" {problem.answer} ", problem) == 1.0
    assert task.reward(usual, problem) == 0.0  # the usual order is a wrong answer in this format
    for wrong in ("", "-", "12a", problem.answer + "1", "--" + problem.answer.lstrip("-")):
        assert task.reward(wrong, problem) == 0.0
    other = task.make_problems(task.LADDERS["v2"].levels["C"], 2, seed=4, answer_format="lsd")[1]
    assert task.reward(problem.answer, other) == 0.0 and task.reward(problem.answer, other, problem.entry) == 1.0


def test_v2_levels_differ_from_a_in_digits_only():
    ladder = task.LADDERS["v2"]
    sets = task.ladder_sets(TOY_SIZES, ladder)
    for level, problems in sets["held_out"].items():
        for p in problems:
            terms = p.expression.split(" ")[::2]
            assert len(terms) == 2 and {len(t) for t in terms} == {ladder.levels[level].min_digits}
            assert p.answer_format == "lsd" and task.reward(p.answer, p) == 1.0


def test_v3_has_no_b_and_its_gate_and_mixed_set_follow():
    sets = task.ladder_sets(TOY_SIZES, task.LADDERS["v3"])
    assert set(sets["train"]) == {"A", "C"} and len(task.training_problems(sets, "mixed")) == 2 * TOY_SIZES["train"]
    figures = {"A": {"pass_at_k": 0.6, "hinted_greedy": 1.0},
               "C": {"pass_at_k": 0.0, "pass_at_k_chance": 0.0, "greedy_pass1": 0.0, "hinted_greedy": 1.0,
                     "guided_mean_at_k": 0.5}}
    assert make_policy.gate_v2(figures)["passed"]
    figures["A"]["pass_at_k"] = 0.05
    assert not make_policy.gate_v2(figures)["passed"]


def test_derangement_pairs_every_problem_with_a_different_answer():
    problems = task.make_problems(task.LADDERS["v2"].levels["A"], 50, seed=8, answer_format="lsd")
    problems = problems + problems[:3]  # repeated answers: a partner never shares its problem's answer
    partners = derangement(problems)
    assert all(problems[j].answer != p.answer for p, j in zip(problems, partners))
    assert derangement(problems) == partners  # fixed
    with pytest.raises(ValueError, match="two distinct answers"):
        derangement(problems[:1] * 3)


def test_gate_v2_checks_each_criterion():
    good = {"A": {"pass_at_k": 0.6, "hinted_greedy": 0.99, "greedy_pass1": 0.5},
            "B": {"pass_at_k": 0.05, "hinted_greedy": 0.97, "greedy_pass1": 0.05},
            "C": {"pass_at_k": 0.012, "pass_at_k_chance": 0.004, "greedy_pass1": 0.01, "hinted_greedy": 0.95,
                  "guided_mean_at_k": 0.3}}
    assert make_policy.gate_v2(good)["passed"]
    for level, key, value in [("C", "greedy_pass1", 0.012), ("C", "pass_at_k", 0.015), ("A", "pass_at_k", 0.09),
                              ("B", "pass_at_k", 0.7), ("B", "pass_at_k", 0.011), ("C", "guided_mean_at_k", 0.29),
                              ("A", "hinted_greedy", 0.94), ("C", "hinted_greedy", 0.94)]:
        bad = {lv: dict(figures) for lv, figures in good.items()}
        bad[level][key] = value
        result = make_policy.gate_v2(bad)
        assert not result["passed"] and sum(not ok for ok in result["checks"].values()) == 1, (level, key, value)


def test_warmup_can_keep_three_term_problems_hinted_only():
    rows = make_policy.ladder_warmup_rows(40, 2, {}, set(), seed=0, easy_plain_max_terms=2)
    plain, hinted = [p for p, _ in rows if "[" not in p], [p for p, _ in rows if "[" in p]
    assert plain and all(p.count(" ") == 2 for p in plain)  # "a + b=": two terms
    assert any(p.count(" ") == 4 for p in hinted if "]" in p and len(p) < 16)  # easy 3-term, hinted


def test_warmup_rows_refuse_unknown_levels_and_counts():
    with pytest.raises(ValueError, match="unknown levels"):
        make_policy.ladder_warmup_rows(1, 2, {"D": 1}, set(), seed=0)
    with pytest.raises(ValueError, match=r"plain_rows must lie in \[0, num_hinted=2\]"):
        make_policy.ladder_warmup_rows(1, 2, {"A": 3}, set(), seed=0)


def test_training_sets():
    sets = task.ladder_sets(TOY_SIZES)
    assert {p.expression for p in task.training_problems(sets, "C")} == {p.expression for p in sets["train"]["C"]}
    assert len(task.training_problems(sets, "mixed")) == 3 * TOY_SIZES["train"]
    with pytest.raises(ValueError, match="training_set must be one of"):
        task.training_problems(sets, "AB")


def test_gate_checks_every_level():
    good = {"A": {"pass_at_k": 0.2, "hinted_greedy": 0.99}, "B": {"pass_at_k": 0.05, "hinted_greedy": 0.96},
            "C": {"pass_at_k": 0.0, "hinted_greedy": 0.95}}
    assert make_policy.gate(good)["passed"]
    for level, key, value in [("A", "pass_at_k", 0.36), ("B", "pass_at_k", 0.01), ("C", "pass_at_k", 0.012),
                              ("C", "hinted_greedy", 0.94)]:
        bad = {lv: dict(figures) for lv, figures in good.items()}
        bad[level][key] = value
        result = make_policy.gate(bad)
        assert not result["passed"] and sum(not ok for ok in result["checks"].values()) == 1


def test_held_then_annealed_schedule():
    config = RunConfig(steps=100, anneal_hold_fraction=0.5, anneal_fraction=0.75)
    schedule = make_schedule(ARMS["annealed_none"], config)
    assert [schedule.value(step) for step in (0, 50, 62, 75, 99)] == pytest.approx([0.5, 0.5, 0.74, 1.0, 1.0])
    assert make_schedule(ARMS["annealed_none"], RunConfig(steps=100)).value(25) == pytest.approx(0.75)  # the claim's
    with pytest.raises(ValueError, match="anneal_hold_fraction"):
        make_schedule(ARMS["annealed_none"], RunConfig(steps=100, anneal_hold_fraction=0.5, anneal_fraction=0.5))


def records(arm, seed, c_curve, rollouts_per_point=10, a_curve=None):
    """Hand-made evaluation records with level C's greedy pass@1 following `c_curve`."""
    a_curve = a_curve or [0.2] * len(c_curve)
    return [{"arm": arm, "seed": seed, "step": i, "rollouts": rollouts_per_point * i, "row_tokens": i, "seconds": i,
             "levels": {"A": dict.fromkeys(analyze_ladder.FIGURES, a), "C": dict.fromkeys(analyze_ladder.FIGURES, c)}}
            for i, (a, c) in enumerate(zip(a_curve, c_curve))]


def seeds_of(arm, curves, rollouts_per_point=10):
    return {seed: records(arm, seed, curve, rollouts_per_point) for seed, curve in enumerate(curves)}


def test_readings():
    flat = [[0.0, 0.0, 0.01]] * 3
    lifting = [[0.0, 0.1, 0.2], [0.0, 0.15, 0.25], [0.0, 0.12, 0.3]]
    base = {"plain": seeds_of("plain", flat), "plain_2g": seeds_of("plain_2g", flat, 20),
            "star": seeds_of("star", lifting)}
    confirmed = analyze_ladder.summarise(base | {"self_distill": seeds_of("self_distill", lifting)})["readings"]
    assert confirmed["verdict"] == "confirmed" and confirmed["confirming_arms"] == ["self_distill"]
    assert confirmed["best_rl_arm"] == "self_distill"
    # Equal rollouts: an arm using twice the rollouts per point is read at plain's final count (its middle point).
    doubled = analyze_ladder.summarise(base | {"guide": seeds_of("guide", lifting, 20)})["readings"]
    assert doubled["best_rl_arm_C_at_equal_rollouts"] == pytest.approx((0.1 + 0.15 + 0.12) / 3)
    refuted = analyze_ladder.summarise(base | {"annealed": seeds_of("annealed", [[0.0, 0.0, 0.03]] * 3)})["readings"]
    assert refuted["verdict"] == "refuted"
    capacity = analyze_ladder.summarise(base | {"star": seeds_of("star", flat)})["readings"]
    assert capacity["verdict"] == "capacity"
    overlapping = [[0.0, 0.1, 0.2], [0.0, 0.15, 0.25], [0.0, 0.0, 0.005]]  # one seed not above every plain seed
    assert analyze_ladder.summarise(base | {"x": seeds_of("x", overlapping)})["readings"]["verdict"] == "inconclusive"


def test_v2_bounds_the_controls_rise_on_c_not_their_end():
    lifting = [[0.0, 0.1, 0.2], [0.0, 0.15, 0.25], [0.0, 0.12, 0.3]]
    steady = [[0.03, 0.03, 0.04]] * 3  # ends above 2%, rises by 1 point
    rising = [[0.0, 0.02, 0.03]] * 3  # ends at 3%, rises by 3 points
    for controls, v1, v2 in [(steady, "inconclusive", "confirmed"), (rising, "inconclusive", "inconclusive")]:
        runs = {"plain": seeds_of("plain", controls), "plain_2g": seeds_of("plain_2g", controls, 20),
                "star": seeds_of("star", lifting), "guided": seeds_of("guided", [[0.0, 0.2, 0.4]] * 3)}
        assert analyze_ladder.summarise(runs)["readings"]["verdict"] == v1
        assert analyze_ladder.summarise(runs, "v2")["readings"]["verdict"] == v2


def test_rollouts_to_target_is_always_defined():
    runs = {
        "plain": {0: records("plain", 0, [0.0, 0.0, 0.0], a_curve=[0.1, 0.2, 0.4])},
        "fast": {0: records("fast", 0, [0.0, 0.0, 0.0], a_curve=[0.1, 0.5, 0.6])},
        "slow": {0: records("slow", 0, [0.0, 0.0, 0.0], a_curve=[0.1, 0.1, 0.1])},
    }
    table = analyze_ladder.rollouts_to_target(runs)
    assert table["target_overall_greedy_pass1"] == pytest.approx(0.2)  # mean of A 0.4 and C 0.0
    assert table["arms"]["plain"] == {"rollouts": 20, "censored": False, "ratio_to_plain": 1.0}
    assert table["arms"]["fast"]["rollouts"] == pytest.approx(10 * (0.2 - 0.05) / (0.25 - 0.05))
    assert table["arms"]["slow"]["censored"] and table["arms"]["slow"]["rollouts"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ladder_run_end_to_end(tmp_path, monkeypatch, version):
    """A toy warm-up, two arms for two steps on the mixed set, per-level records, summary and plots."""
    monkeypatch.setattr(task, "LADDER_SIZES", TOY_SIZES)
    toy_sets = lambda ladder=task.LADDERS["v1"]: task.ladder_sets(TOY_SIZES, ladder)  # noqa: E731
    monkeypatch.setattr(run, "ladder_sets", toy_sets)
    monkeypatch.setattr(make_policy, "ladder_sets", toy_sets)
    policy = tmp_path / "policy"
    record = make_policy.train(make_policy.parse_args([
        "--ladder", "--ladder-version", version, "--out", str(policy), "--steps", "2", "--batch-size", "8",
        "--hidden", "16", "--layers", "1", "--num-easy", "4", "--num-hinted", "4", "--plain-rows", "A=2", "--k", "2",
    ]))
    assert set(record["held_out"]) == {"A", "B", "C"} and "passed" in record["gate"]
    if version == "v2":  # its gate reads the validation split, with level C's chance floor and guided reward
        assert set(record["validation"]["C"]) >= {"pass_at_k_chance", "guided_mean_at_k"}
        assert set(record["gate"]["checks"]) == set(make_policy.gate_v2(record["validation"])["checks"])
    out = tmp_path / "mixed"
    run.run_all(run.parse_args([
        "--ladder", "mixed", "--ladder-version", version, "--out", str(out), "--policy", str(policy),
        "--arms", "plain", "star", "--seeds", "0",
        "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "1", "--eval-k", "2",
    ]))
    lines = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(set(r["levels"]) == {"A", "B", "C"} for r in lines)
    assert all(set(r["levels"]["C"]) >= set(analyze_ladder.FIGURES) for r in lines)
    assert [set(r.get("validation_levels", ())) for r in lines] == [set()] * 2 + [{"A", "B", "C"}] + [set()] * 2 + [
        {"A", "B", "C"}]  # the validation split is measured at each run's final point only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["readings"]["verdict"] in {"capacity", "inconclusive", "refuted"}  # star lifted nothing in 2 steps
    assert all((out / f"curves-{x}.png").exists() for x in ("rollouts", "row_tokens", "seconds"))
    with pytest.raises(SystemExit, match="other"):
        run.run_all(run.parse_args(["--ladder", "C", "--ladder-version", version, "--out", str(out),
                                    "--policy", str(policy), "--steps", "2"]))
