"""The claim experiment (benchmarks/claim): task sets, verifier, generation, and a whole-pipeline smoke run."""

import json

import pytest

from prodsample.benchmarks.claim import analyze, make_policy, run
from prodsample.benchmarks.claim.task import (
    EASY_DIFFICULTY,
    HINT_TEMPLATE,
    build_tokenizer,
    make_problems,
    reward,
    rl_and_held_out,
)
from prodsample.benchmarks.claim.train import ARMS


def test_sets_are_disjoint_by_string_and_warmup_excludes_both():
    sets = rl_and_held_out(300, 200)
    held_out, rl = {p.expression for p in sets.held_out}, {p.expression for p in sets.rl}
    assert len(held_out) == 200 and len(rl) == 300 and not held_out & rl
    rows = make_policy.warmup_rows(50, 100, 0.5, held_out | rl, seed=0)
    warmup_expressions = {prompt.split("=")[0] for prompt, _ in rows}
    assert not warmup_expressions & (held_out | rl)
    assert sum("[" in prompt for prompt, _ in rows) == 150  # every warm-up problem also appears hinted
    assert len(rows) == 50 + 150 + 50


def test_verifier_accepts_only_the_answer():
    problem = make_problems(EASY_DIFFICULTY, 1, seed=5)[0]
    assert reward(problem.answer, problem) == 1.0
    assert reward(str(int(problem.answer) + 1), problem) == 0.0
    assert reward("", problem) == 0.0


def test_tokenizer_round_trips_prompts_and_hints():
    tokenizer = build_tokenizer()
    text = HINT_TEMPLATE.format(prompt="58 - 91=", answer="-33")
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pipeline_smoke_every_arm(tmp_path):
    """Warm-up → every arm for two steps → summary and plot, at toy sizes (seconds)."""
    policy = tmp_path / "policy"
    record = make_policy.train(make_policy.parse_args([
        "--out", str(policy), "--steps", "3", "--batch-size", "8", "--hidden", "16", "--layers", "1",
        "--num-easy", "8", "--num-hard", "8", "--num-rl", "16", "--num-held-out", "8", "--k", "2",
    ]))
    assert 0.0 <= record["held_out"]["greedy_pass1"] <= 1.0 and (policy / "warmup.json").exists()
    out = tmp_path / "results"
    toy = ["--out", str(out), "--policy", str(policy), "--seeds", "0", "--num-rl", "16", "--num-held-out", "8",
           "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "1", "--eval-k", "2"]
    run.run_all(run.parse_args(toy))
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} == set(ARMS)
    assert all([r["step"] for r in records if r["arm"] == arm] == [0, 1, 2] for arm in ARMS)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == set(ARMS) and (out / "curves.png").exists()
    assert summary["arms"]["plain_2g"]["total_rollouts"] == 2 * summary["arms"]["plain"]["total_rollouts"]
    run.run_all(run.parse_args(toy))  # resuming a finished comparison runs nothing again
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(records)
    assert analyze.summarise(analyze.load_runs(out))["target_greedy_pass1"] == summary["target_greedy_pass1"]


def test_exploratory_figures_follow_the_records():
    """Per-seed figures, the seed-averaged curve and the mean pass@1 after step 0, from hand-made records."""

    def records(arm, seed, curve):
        return [{"arm": arm, "seed": seed, "step": 100 * i, "rollouts": 10 * i, "row_tokens": 20 * i,
                 "greedy_pass1": value, "mean_at_k": value, "seconds": 1.0, "train": {}} for i, value in enumerate(curve)]

    runs = {"plain": {0: records("plain", 0, [0.1, 0.2, 0.3]), 1: records("plain", 1, [0.1, 0.1, 0.2])}}
    plain = analyze.summarise(runs)["arms"]["plain"]
    assert plain["rollouts_to_target"] is None  # target 0.25 = mean final; seed 1 never reaches it
    extra = plain["exploratory"]
    assert extra["final_greedy_pass1_per_seed"] == {0: 0.3, 1: 0.2}
    assert extra["rollouts_to_target_per_seed"] == {0: 20, 1: None}
    assert extra["mean_greedy_pass1_after_step_0"] == pytest.approx((0.25 + 0.15) / 2)
    assert [point["greedy_pass1"] for point in extra["curve"]] == pytest.approx([0.1, 0.15, 0.25])
