"""The harness's pieces: answer extraction, verification, hint leakage, summaries, shard plans, result files."""

import json

import pytest

from prodsample.benchmarks import generate, reward
from prodsample.benchmarks.errors import UsageError
from prodsample.benchmarks.models import load_model
from prodsample.benchmarks.runs import RunDir, invocation
from prodsample.benchmarks.tasks import Task, answer_line, extract_answer, parse_task_spec


@pytest.mark.parametrize(
    "completion, expected, strict",
    [
        ("2 + 3 = 5\nAnswer: 5", "5", True),
        ("answer: 7.", "7", True),  # case-insensitive, one trailing period dropped
        ("Answer: 1\nwait, no.\nANSWER:  **12** ", "12", True),  # the last answer line wins; emphasis stripped
        ("Answer: $3.5$", "3.5", True),
        ("Answer: ['a', 'b']", "['a', 'b']", True),
        ("5 - 3 = 2, so the answer is 2.", "2", False),  # no answer line: the last number
        ("In total 1,024 legs, not -3.5 or 12", "12", False),
        ("there are 1,024 legs", "1024", False),
        ("Answer:\n5", "5", False),  # an empty answer line is not one; the number below is the last number
        ("no idea", None, False),
        ("", None, False),
    ],
)
def test_extract_answer(completion, expected, strict):
    assert extract_answer(completion) == expected
    assert (answer_line(completion) is not None) == strict


def test_verify_uses_the_task_verifier_and_rejects_invalid_format():
    task = Task("basic_arithmetic:max_terms=2,max_digits=1", seed=3)
    problem = task.problem(0)
    assert task.verify(problem, f"steps...\nAnswer: {problem.answer}").reward == 1.0
    wrong = str(int(problem.answer) + 1)
    assert task.verify(problem, f"Answer: {wrong}").reward < 1.0
    prose = task.verify(problem, f"so the result is {problem.answer}.")
    assert not prose.format_valid and prose.reward == 1.0  # the flexible match still finds the answer
    nothing = task.verify(problem, "I do not know")
    assert nothing.extracted is None and not nothing.format_valid and nothing.reward == 0.0


def test_task_problems_are_deterministic_and_carry_the_instruction():
    first, again = Task("leg_counting", seed=1), Task("leg_counting", seed=1)
    assert [first.problem(i).question for i in range(3)] == [again.problem(i).question for i in range(3)]
    content = first.prompt(first.problem(0))[0]["content"]
    assert content.startswith(first.problem(0).question.strip()) and 'Answer: <answer>' in content


def test_task_spec_parsing_and_errors():
    assert parse_task_spec("chain_sum:max_terms=3,max_digits=1") == ("chain_sum", {"max_terms": 3, "max_digits": 1})
    assert parse_task_spec("gcd") == ("gcd", {})
    with pytest.raises(UsageError, match="--task 'no_such_task'"):
        Task("no_such_task")
    with pytest.raises(UsageError, match="key=value"):
        parse_task_spec("chain_sum:max_terms")
    with pytest.raises(UsageError, match="rejected the config"):
        Task("chain_sum:no_such_option=1")


def _rollout(reward, tokens=10, kl=0.0, format_valid=True, leaked=False, eos=True):
    text = "As the hint says, 12" if leaked else "12"
    return {"reward": reward, "tokens": tokens, "kl_per_token": kl, "format_valid": format_valid, "text": text, "eos": eos}


def test_reward_summary_group_statistics():
    records = [
        {"task": "t", "lam": 1.0, "prompt_index": 0, "answer": "12", "rollouts": [_rollout(0.0), _rollout(0.0)]},  # all fail
        {"task": "t", "lam": 1.0, "prompt_index": 1, "answer": "12", "rollouts": [_rollout(1.0), _rollout(0.0, format_valid=False)]},  # informative
        {"task": "t", "template": "x", "lam": 0.5, "prompt_index": 0, "answer": "12", "rollouts": [_rollout(1.0, tokens=30, kl=0.2), _rollout(1.0, tokens=10, kl=0.6, leaked=True)]},
        {"task": "t", "template": "x", "lam": 0.5, "prompt_index": 1, "answer": "12", "rollouts": [_rollout(0.5, eos=False), _rollout(0.5)]},  # partial credit, equal: not informative
    ]
    from prodsample.prompts import HINT_TEMPLATES

    plain, guided = reward.summarize(records, {"x": HINT_TEMPLATES["answer"]})
    assert (plain["template"], plain["lam"], guided["template"], guided["lam"]) == ("plain", 1.0, "x", 0.5)
    assert plain["reward_rate"] == 0.25 and plain["pass_rate"] == 0.25
    assert plain["informative"] == 0.5 and plain["all_fail"] == 0.5 and plain["all_pass"] == 0.0
    assert plain["format_valid"] == 0.75
    assert plain["reward_se"] == pytest.approx(0.25)  # group means 0 and 0.5: stdev 0.5/√2, over √2 groups
    assert plain["reward_ci"] == pytest.approx(1.96 * 0.25)
    assert guided["reward_rate"] == 0.75 and guided["pass_rate"] == 0.5
    assert guided["informative"] == 0.0 and guided["all_fail"] == 0.0 and guided["all_pass"] == 0.5
    # KL is pooled over tokens: (0.2·30 + 0.6·10 + 0·10 + 0·10) / 60
    assert guided["kl_per_token"] == pytest.approx(12 / 60)
    # "12" alone states the answer as its first word: every rollout leaks by the derivation rule; one echoes the hint
    assert guided["leakage"] == 1.0 and guided["echo"] == 0.25
    assert guided["truncated"] == 0.25 and guided["length"] == 15.0
    # prompt 0 was all-fail at λ = 1 and is rewarded at λ = 0.5: one of one rescued; the plain row rescues nothing
    assert (guided["rescued"], guided["rescue_n"]) == (1.0, 1)
    assert (plain["rescued"], plain["rescue_n"]) == (0.0, 1)
    # paired gain: prompt 0 goes 0 → 1, prompt 1 goes 0.5 → 0.5; differences 1 and 0
    assert guided["gain"] == pytest.approx(0.5) and guided["gain_ci"] == pytest.approx(1.96 * 0.5)
    assert plain["gain"] == 0.0 and plain["gain_ci"] == 0.0


def test_rescue_counts_only_groups_that_failed_at_lambda_1_on_the_same_prompt():
    def group(task, template, lam, index, rewards):
        return {"task": task, "template": template, "lam": lam, "prompt_index": index, "answer": "7",
                "rollouts": [_rollout(r) for r in rewards]}

    records = [
        group("t", "plain", 1.0, 0, [0, 0]), group("t", "plain", 1.0, 1, [0, 0]), group("t", "plain", 1.0, 2, [1, 0]),
        group("u", "plain", 1.0, 0, [1, 1]),  # another task's prompt 0 did not fail
        group("t", "a", 0.5, 0, [0, 0.5]),  # partial credit counts as rewarded
        group("t", "a", 0.5, 1, [0, 0]),
        group("t", "a", 0.5, 2, [0, 0]),  # not all-fail at λ = 1: outside the denominator
        group("t", "b", 0.0, 1, [1, 1]),  # b ran on prompt 1 only
        group("u", "a", 0.5, 0, [0, 0]),
    ]
    rows = {(row["task"], row["template"], row["lam"]): row for row in reward.summarize(records)}
    assert (rows["t", "a", 0.5]["rescued"], rows["t", "a", 0.5]["rescue_n"]) == (0.5, 2)
    assert (rows["t", "b", 0.0]["rescued"], rows["t", "b", 0.0]["rescue_n"]) == (1.0, 1)
    assert (rows["u", "a", 0.5]["rescued"], rows["u", "a", 0.5]["rescue_n"]) == (None, 0)
    assert [key for key in rows] == [("t", "plain", 1.0), ("t", "a", 0.5), ("t", "b", 0.0), ("u", "plain", 1.0), ("u", "a", 0.5)]


def _row(task, template, lam, rescued, n, kl, leakage=0.0, length=10.0, rollouts=8):
    return {"task": task, "template": template, "lam": lam, "rescued": rescued, "rescue_n": n, "kl_per_token": kl,
            "leakage": leakage, "length": length, "rollouts": rollouts, "groups": rollouts // 4, "reward_rate": 0.5}


def test_hint_choice_pools_tasks_and_applies_the_protocol():
    from prodsample.benchmarks import hint_choice

    rows = [
        _row("t", "plain", 1.0, 0.0, 4, 0.0), _row("u", "plain", 1.0, 0.0, 6, 0.0),
        # a: 2/4 + 4/6 = 6/10 rescued at ½; KL at ½ (0.01·10·8 + 0.03·30·8) / (80 + 240) = 0.025, at 0: 0.06
        _row("t", "a", 0.5, 0.5, 4, 0.01), _row("u", "a", 0.5, 4 / 6, 6, 0.03, length=30.0),
        _row("t", "a", 0.0, 1.0, 4, 0.06), _row("u", "a", 0.0, 1.0, 6, 0.06),
        # b rescues more (8/10) but its KL at ½ is more than half of its KL at 0: no goal
        _row("t", "b", 0.5, 1.0, 4, 0.05), _row("u", "b", 0.5, 4 / 6, 6, 0.05),
        _row("t", "b", 0.0, 1.0, 4, 0.06), _row("u", "b", 0.0, 1.0, 6, 0.06),
        # a at ¾ rescues 3/10: too few to start there
        _row("t", "a", 0.75, 0.25, 4, 0.001), _row("u", "a", 0.75, 2 / 6, 6, 0.001),
    ]
    pooled = {(row["template"], row["lam"]): row for row in hint_choice.pool(rows)}
    assert (pooled["a", 0.5]["rescued_groups"], pooled["a", 0.5]["all_fail_groups"]) == (6, 10)
    assert pooled["a", 0.5]["kl_per_token"] == pytest.approx(0.025)
    choice = hint_choice.choose(list(pooled.values()))
    assert choice["template"] == "a" and choice["goal_met"] and choice["best_two"] == ["a", "b"]
    assert choice["start_lam"] == 0.5
    # without a, b is the best but the goal is not met
    only_b = hint_choice.choose([row for row in pooled.values() if row["template"] == "b"])
    assert only_b["template"] == "b" and not only_b["goal_met"]


def _config(**overrides):
    base = dict(
        model="tiny", dtype="float32", tasks=["a", "b"], prompts=[5, 2], lams=[1.0, 0.5], generations=2,
        max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, seed=0, hint_templates={"x": "{prompt} {answer}"},
        prompts_per_shard=2,
    )
    return reward.RewardConfig(**{**base, **overrides})


def test_reward_plan_covers_every_cell_of_a_chunk_before_the_next_and_resumes():
    shards = reward.plan(_config(), done=set())
    assert [(s.task, s.template, s.lam, s.prompt_indices) for s in shards[:4]] == [
        ("a", "plain", 1.0, (0, 1)), ("a", "x", 0.5, (0, 1)), ("a", "plain", 1.0, (2, 3)), ("a", "x", 0.5, (2, 3)),
    ]
    assert sum(len(s.prompt_indices) for s in shards) == (5 + 2) * 2
    done = {("a", "plain", 1.0, 0), ("a", "plain", 1.0, 1), ("a", "x", 0.5, 0)}
    resumed = reward.plan(_config(), done)
    assert resumed[0] == reward.Shard("a", "x", 0.5, (1,))
    assert sum(len(s.prompt_indices) for s in resumed) == (5 + 2) * 2 - 3


def test_reward_plan_runs_lambda_1_once_for_all_templates():
    config = _config(tasks=["a"], prompts=[2], lams=[1.0, 0.5, 0.0], hint_templates={"x": "{prompt}{answer}", "y": "{answer}{prompt}"})
    assert [(s.template, s.lam) for s in reward.plan(config, done=set())] == [
        ("plain", 1.0), ("x", 0.5), ("x", 0.0), ("y", 0.5), ("y", 0.0),
    ]
    # a later invocation adding λ for one template only leaves the plain run alone
    later = _config(tasks=["a"], prompts=[2], lams=[0.75], hint_templates={"x": "{prompt}{answer}"})
    assert [(s.template, s.lam) for s in reward.plan(later, done=set())] == [("x", 0.75)]


def test_parse_hint_templates_names_and_errors():
    from prodsample.prompts import HINT_TEMPLATES

    parsed = reward.parse_hint_templates(["answer", "mine={prompt} so {answer}", "{prompt}!{answer}", HINT_TEMPLATES["lead"]])
    assert parsed == {"answer": HINT_TEMPLATES["answer"], "mine": "{prompt} so {answer}", "custom": "{prompt}!{answer}",
                      "lead": HINT_TEMPLATES["lead"]}
    with pytest.raises(UsageError, match="--hint-template 'no fields'"):
        reward.parse_hint_templates(["no fields"])
    with pytest.raises(UsageError, match="given twice"):
        reward.parse_hint_templates(["answer", "answer"])
    with pytest.raises(UsageError, match="reserved"):
        reward.parse_hint_templates(["plain={prompt}{answer}"])


def test_reward_noise_is_shared_across_lambda_and_template_but_not_across_chunks():
    same_chunk = [reward.Shard("a", t, lam, (0, 1)).noise_seed(0) for t in ("plain", "x") for lam in (1.0, 0.5, 0.0)]
    assert len(set(same_chunk)) == 1
    assert reward.Shard("a", "x", 1.0, (2, 3)).noise_seed(0) != same_chunk[0]
    assert reward.Shard("b", "x", 1.0, (0, 1)).noise_seed(0) != same_chunk[0]
    assert reward.Shard("a", "x", 1.0, (0, 1)).noise_seed(1) != same_chunk[0]


def test_generate_summary_pairs_ratios_by_repeat():
    def record(method, repeat, step, seconds, sampling=None):
        line = {"batch_size": 4, "method": method, "repeat": repeat, "new_tokens": 11, "seconds": seconds,
                "prefill_seconds": 0.5, "step_seconds": step, "load_average": [1.0, 1.0, 1.0]}
        if sampling is not None:
            line["sampling_seconds"] = sampling
        return line

    # Repeat 1 runs on a machine twice as slow: paired ratios still come out exact.
    records = [
        record("plain", 0, 0.1, 2.0), record("guided_generate", 0, 0.15, 3.5, sampling=0.11),
        record("plain", 1, 0.2, 4.0), record("guided_generate", 1, 0.3, 7.0, sampling=0.22),
    ]
    plain, guided = generate.summarize(records)
    assert plain["step_ratio"] == 1.0 and plain["sampling_share"] is None
    assert plain["step_ms"] == pytest.approx(1000 * (0.1 + 0.2) / 2) and plain["prefill_ms"] == 500
    assert guided["step_ratio"] == pytest.approx(1.5) and guided["total_ratio"] == pytest.approx(1.75)
    assert guided["step_ratio_min"] == pytest.approx(1.5) and guided["step_ratio_max"] == pytest.approx(1.5)
    assert guided["sampling_share"] == pytest.approx((0.11 / 11) / 0.15)
    assert guided["tokens_per_s"] == pytest.approx(4 * 11 / 5.25)


def test_decode_clock_splits_prefill_from_decode_steps():
    from prodsample.hf import guided_generate

    loaded = load_model("tiny", device="cpu")
    widths = []
    loaded.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    clock = generate.DecodeClock(loaded.model)
    with clock.running():
        guided_generate(loaded.model, loaded.tokenizer, ["What is 1+1?"], ["2"], lam=0.5, max_new_tokens=4, seed=0)
    # prefill forwards (the shared prefix, then both contexts' rest) read several tokens; then one per later token
    assert widths[-3:] == [1, 1, 1] and len(widths) > 3 and all(width > 1 for width in widths[:-3])
    assert 0 < clock.prefill_seconds < clock.seconds and clock.prefill_seconds + clock.decode_seconds == pytest.approx(clock.seconds)
    with pytest.raises(RuntimeError, match="no one-token forward"), clock.running():
        guided_generate(loaded.model, loaded.tokenizer, ["What is 1+1?"], ["2"], lam=0.5, max_new_tokens=1, seed=0)


def _start(run_dir, config):
    run_dir.start(invocation("reward", "prodsample reward", config, ["model"], {"seed": 0}, "cpu"))


def test_run_dir_checks_identity_and_keeps_provenance(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    _start(run_dir, {"model": "tiny", "prompts": 2})
    run_dir.append([{"x": 1}])
    again = RunDir(tmp_path / "run")
    _start(again, {"model": "tiny", "prompts": 5})  # sizes may grow
    again.append([{"x": 2}])
    assert [r["invocation"] for r in again.records()] == [0, 1]
    with pytest.raises(UsageError, match="model: 'tiny' -> 'other'"):
        _start(RunDir(tmp_path / "run"), {"model": "other", "prompts": 5})
    with pytest.raises(UsageError, match="holds a 'reward' run"):
        RunDir(tmp_path / "run").start(invocation("generate", None, {"model": "tiny"}, ["model"], {}, "cpu"))

    csv_text = again.write_csv("t.csv", [{"x": 1}], ["x"]).read_text()
    comments = [json.loads(line[2:]) for line in csv_text.splitlines() if line.startswith("# ")]
    assert len(comments) == 2 and all({"command", "git", "packages", "seeds", "machine"} <= set(c) for c in comments)
    assert csv_text.splitlines()[-2:] == ["x", "1"]
    summary = json.loads(again.write_json("s.json", {"rows": []}).read_text())
    assert summary["provenance"][0]["git"]["revision"] and summary["provenance"][0]["packages"]["torch"]


def test_run_dir_drops_a_torn_last_line_and_appends_after_it(tmp_path):
    run_dir = RunDir(tmp_path)
    _start(run_dir, {"model": "tiny"})
    run_dir.append([{"x": 1}])
    with run_dir.records_path.open("a") as handle:
        handle.write('{"type": "record", "x": 2, "trunc')  # a kill in the middle of a write
    assert [r["x"] for r in run_dir.records()] == [1]
    run_dir.append([{"x": 3}])
    assert [r["x"] for r in RunDir(tmp_path).records()] == [1, 3]


def test_run_dir_rejects_damage_before_the_last_line(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"type": "invocation"}\nnot json\n{"type": "record"}\n')
    with pytest.raises(UsageError, match="records.jsonl:2 is not valid JSON"):
        RunDir(tmp_path).records()


def test_load_model_tiny_and_bad_names(tmp_path):
    loaded = load_model("tiny", device="cpu")
    assert loaded.tokenizer.padding_side == "left" and not loaded.model.training
    with pytest.raises(UsageError, match="--model"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(UsageError, match="--dtype"):
        load_model("tiny", dtype="int3")
