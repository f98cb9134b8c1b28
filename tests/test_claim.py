"""The claim experiment (benchmarks/claim): task sets, verifier, generation, and a whole-pipeline smoke run."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from prodsample.benchmarks.claim import analyze, make_policy, run
from prodsample.benchmarks.claim.task import (
    EASY_DIFFICULTY,
    HINT_TEMPLATE,
    build_tokenizer,
    make_problems,
    reward,
    rl_and_held_out,
)
from prodsample.benchmarks.claim import train
from prodsample.benchmarks.claim.task import MAX_NEW_TOKENS
from prodsample.benchmarks.claim.train import ARMS, StepStats
from prodsample.grpo import baseline_keeping_advantages, self_distill_kl_loss
from prodsample.rollout import GuidedRollout


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


@pytest.mark.slow
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
    # The target is plain's final greedy pass@1 (PROTOCOL.md; one seed here), read from the records directly.
    plain_final = next(r for r in records if r["arm"] == "plain" and r.get("final"))
    assert summary["target_greedy_pass1"] == plain_final["greedy_pass1"]


def test_exploratory_figures_follow_the_records():
    """Per-seed figures, the seed-averaged curve and the mean pass@1 after step 0, from hand-made records."""

    def records(arm, seed, curve):
        return [{"arm": arm, "seed": seed, "step": 100 * i, "rollouts": 10 * i, "row_tokens": 20 * i,
                 "greedy_pass1": value, "mean_at_k": value, "pass_at_k": value, "seconds": 1.0, "train": {}} for i, value in enumerate(curve)]

    runs = {"plain": {0: records("plain", 0, [0.1, 0.2, 0.3]), 1: records("plain", 1, [0.1, 0.1, 0.2])}}
    plain = analyze.summarise(runs)["arms"]["plain"]
    assert plain["rollouts_to_target"] is None  # target 0.25 = mean final; seed 1 never reaches it
    extra = plain["exploratory"]
    assert extra["final_greedy_pass1_per_seed"] == {0: 0.3, 1: 0.2}
    assert extra["rollouts_to_target_per_seed"] == {0: 20, 1: None}
    assert extra["mean_greedy_pass1_after_step_0"] == pytest.approx((0.25 + 0.15) / 2)
    assert [point["greedy_pass1"] for point in extra["curve"]] == pytest.approx([0.1, 0.15, 0.25])


def _rollout(guided: list[bool], length: int = 2) -> GuidedRollout:
    rows = len(guided)
    per_token = torch.zeros(rows, length)
    return GuidedRollout(
        prompt_ids=[[1]] * rows, completion_ids=torch.zeros(rows, length, dtype=torch.long),
        completion_mask=torch.ones(rows, length, dtype=torch.bool), logprobs=per_token, plain_logprobs=per_token,
        guide_logprobs=per_token, lam=torch.ones(rows), guided=torch.tensor(guided),
        desynced=torch.zeros(rows, dtype=torch.bool), group_ids=torch.arange(rows) // 2,
    )


def test_step_stats_count_each_batch_by_its_rollouts_and_groups():
    """Guide-GRPO's step: a probe batch of 4 failing groups and a resample of 1 group, guided and solved.

    Averaged per `add` call (the old figures) this read reward ½ and all-fail groups ½; per rollout and per
    group it is 2 of 10 rollouts and 4 of 5 groups.
    """
    stats = StepStats()
    stats.add(_rollout([False] * 8), torch.zeros(8), 2, [1.0] * 4)
    stats.add(_rollout([True] * 2), torch.ones(2), 2, [0.5])
    figures = stats.flush()
    assert figures["reward"] == pytest.approx(0.2) and figures["guided_share"] == pytest.approx(0.2)
    assert figures["all_fail_groups"] == pytest.approx(0.8) and figures["informative_groups"] == 0.0
    assert figures["guided_reward"] == 1.0 and figures["plain_reward"] == 0.0
    assert figures["lam_mean"] == pytest.approx(0.9)
    assert stats.rollouts == 10 and stats.row_tokens == 8 * 2 + 2 * 2 * 2
    assert stats.flush() == {}  # a flush starts the next window empty


NEW_ARMS = ["annealed_bk", "self_distill_plain", "self_distill_annealed"]


@pytest.fixture(scope="module")
def committed_policy():
    tokenizer = PreTrainedTokenizerFast.from_pretrained(make_policy.DEFAULT_OUT)
    return tokenizer, rl_and_held_out(32, 4).rl


def _trainer(arm, committed_policy, steps=10):
    tokenizer, rl = committed_policy
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(make_policy.DEFAULT_OUT)
    config = train.RunConfig(steps=steps, prompts_per_step=4, group_size=4, warmup_steps=1)
    return train.GRPORun(ARMS[arm], config, 0, model, tokenizer, rl)


@pytest.mark.parametrize("arm", NEW_ARMS)
def test_new_arms_train_on_the_committed_policy(arm, committed_policy):
    trainer = _trainer(arm, committed_policy, steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(3):
        trainer.step(step)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    figures = trainer.stats.flush()
    assert trainer.stats.rollouts == 3 * 16
    if ARMS[arm].self_distill:  # β decays linearly from distill_coef = 1 over 3 steps: 1, ⅔, ⅓
        assert figures["distill_coef"] == pytest.approx(2 / 3) and figures["distill_kl"] > 0


def _sgd_step(trainer, batch, lr=1e-3):
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=lr)
    optimizer.zero_grad()
    trainer.loss(batch, 0).backward()
    optimizer.step()


@pytest.mark.parametrize("arm", ["self_distill_plain", "self_distill_annealed"])
def test_self_distill_arms_pull_the_plain_context_toward_the_hinted_one(arm, committed_policy):
    """A small step on the arm's loss lowers the batch's KL(plain ‖ hinted) (a sign error would raise it)."""
    trainer = _trainer(arm, committed_policy)
    batch, pad_id = trainer.rollouts(0), trainer.tokenizer.pad_token_id

    @torch.no_grad()
    def kl():
        plain = train.vocabulary_logprobs(trainer.model, batch.rollout.prompt_ids, batch.rollout, pad_id, 1.0)
        hinted = train.vocabulary_logprobs(trainer.model, trainer.hinted_contexts(batch), batch.rollout, pad_id, 1.0)
        return self_distill_kl_loss(plain, hinted, batch.rollout.completion_mask, max_new_tokens=MAX_NEW_TOKENS).item()

    before = kl()
    _sgd_step(trainer, batch)
    assert kl() < before


def test_hinted_contexts_follow_each_rollouts_group(committed_policy):
    trainer = _trainer("self_distill_annealed", committed_policy)
    batch = trainer.rollouts(0)
    texts = trainer.tokenizer.batch_decode(trainer.hinted_contexts(batch), skip_special_tokens=True)
    for row, text in enumerate(texts):
        problem = batch.problems[int(batch.rollout.group_ids[row])]
        assert text == HINT_TEMPLATE.format(prompt=problem.prompt, answer=problem.answer)


def test_baseline_keeping_arm_raises_the_weighted_log_likelihood(committed_policy):
    """A small step raises Σ_i G·w̃_i·A_i·log π(o_i): rollouts with positive weight gain against the others."""
    trainer = _trainer("annealed_bk", committed_policy)
    batch = trainer.rollouts(0)
    rollout = batch.rollout
    loss_weights = baseline_keeping_advantages(batch.rewards, rollout.plain_logprobs, rollout.logprobs,
                                               rollout.completion_mask, 4).loss_weights
    assert (loss_weights > 0).any() and (loss_weights < 0).any()  # the batch has an informative group

    @torch.no_grad()
    def weighted_log_likelihood():
        plain = train.vocabulary_logprobs(trainer.model, rollout.prompt_ids, rollout, trainer.tokenizer.pad_token_id, 1.0)
        return (loss_weights * (train.token_logprobs(plain, rollout) * rollout.completion_mask).sum(1)).sum().item()

    before = weighted_log_likelihood()
    _sgd_step(trainer, batch)
    assert weighted_log_likelihood() > before


def test_phase_matched_rewards_compare_the_same_steps():
    """Guided rewards of an annealed arm and plain rewards of plain, read over the same evaluation windows."""

    def records(arm, guided, plain):
        return [{"arm": arm, "seed": 0, "step": 100 * i, "train": {} if i == 0 else
                 {"guided_reward": guided[i - 1], "plain_reward": plain[i - 1], "informative_groups": 0.5}}
                for i in range(len(guided) + 1)]

    runs = {"annealed": {0: records("annealed", [0.9, 0.5, None, None], [None, None, 0.3, 0.4])},
            "plain": {0: records("plain", [None] * 4, [0.1, 0.2, 0.3, 0.5])}}
    phases = analyze.phase_matched_rewards(runs, anneal_end=200)
    assert phases["annealed"]["first_window"]["guided_reward"] == pytest.approx(0.9)
    assert phases["annealed"]["guided_phase"]["guided_reward"] == pytest.approx(0.7)
    assert phases["plain"]["guided_phase"]["plain_reward"] == pytest.approx(0.15)  # not the later 0.4
    assert phases["annealed"]["after"] == {"guided_reward": None, "plain_reward": pytest.approx(0.35),
                                           "informative_groups": pytest.approx(0.5)}
