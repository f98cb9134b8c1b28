"""TRL integration: GRPOTrainer runs on guided rollouts, λ follows the schedule, metrics reach the logs,
the controller resumes, bad input fails clearly, and the framework-free helpers do what they say.

The off-policy modes' gradients are checked against their analytic values in test_trl_bandit.py.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from prodsample.testing import tiny_model, tiny_tokenizer
from prodsample.controller import GuidanceController
from prodsample.grpo import DistillCoefficient
from prodsample.hf import guided_generate, score
from prodsample.prompts import DEFAULT_HINT_TEMPLATE, HINT_TEMPLATES
from prodsample.importance import OFF_POLICY_MODE_NAMES, ImportanceConfig
from prodsample.importance import off_policy_weights
from prodsample.settings import SamplingSettings
from prodsample.schedules import Adaptive, Constant, Linear
from prodsample.rollout import GuidedRollout
from prodsample.vllm.guided_call import GuidedCall
from prodsample.vllm.pacing import settle
from prodsample.vllm.pairing import RolloutRecord
from prodsample.trl import (
    ROLLOUT_BACKENDS,
    GatheredBatch,
    GuidedBatch,
    GuidedRolloutFunc,
    GuidedGRPOTrainer,
    HeldOutEvalCallback,
    engine_importance_config,
    guidance_metrics,
    GuidedGRPOConfig,
    off_policy_mode_weights,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
GUIDANCE_METRICS = [
    "guidance/lambda_mean",
    "guidance/lambda_std",
    "guidance/guided_fraction",
    "guidance/reward_guided",
    "guidance/reward_plain",
    "guidance/groups_informative",
    "guidance/groups_all_fail",
    "guidance/groups_all_pass",
    "guidance/kl_q_pi",
    "guidance/is_weight_mean",
    "guidance/is_clipped_fraction",
    "guidance/is_ess",
    "guidance/length_guided",
    "guidance/length_plain",
    "guidance/hint_leakage_guided",
    "guidance/hint_leakage_plain",
    "guidance/hint_echo_guided",
    "guidance/hint_echo_plain",
    "guidance/desynced_fraction",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def config(tmp_path, **overrides) -> GuidedGRPOConfig:
    settings = dict(
        output_dir=str(tmp_path),
        guidance_schedule=Linear(0.5, end_step=4),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-2,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    return GuidedGRPOConfig(**{**settings, **overrides})


def sums(count: int) -> Dataset:
    return Dataset.from_list([{"prompt": f"{i % 5}+{i // 5}=", "answer": str(i % 5 + i // 5)} for i in range(count)])


def contains_answer(completions, answer, **kwargs):
    """The reward and held-out verifier: 1 when the completion contains the answer."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(expected in text) for text, expected in zip(texts, answer)]


class RewardSpy:
    """`contains_answer`, remembering what TRL passed it."""

    __name__ = "contains_answer"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, answer, lam, guided, trainer_state, **kwargs):
        self.calls.append({"step": trainer_state.global_step, "prompts": prompts, "lam": lam, "guided": guided})
        return contains_answer(completions, answer)


# ---------------------------------------------------------------------------------------------------------
# GRPOTrainer end to end
# ---------------------------------------------------------------------------------------------------------


def test_grpo_trainer_follows_the_schedule_and_logs_the_metrics(tokenizer, tmp_path):
    """Chat prompts, Linear(0.5 → 1 by step 3) over 4 steps, held-out evaluation every 2 steps."""
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in sums(12)])
    schedule = Linear(start=0.5, end_step=3)
    reward = RewardSpy()
    trainer = GuidedGRPOTrainer(
        model=tiny_model(tokenizer, seed=0),
        reward_funcs=reward,
        args=config(tmp_path, guidance_schedule=schedule, off_policy="token_truncate"),
        train_dataset=chat,
        processing_class=tokenizer,
    )
    heldout = HeldOutEvalCallback(trainer, chat.select(range(3)), contains_answer, eval_steps=2, num_samples=2)
    trainer.add_callback(heldout)
    trainer.train()

    assert [call["step"] for call in reward.calls] == [0, 1, 2, 3]
    for call in reward.calls:
        assert call["lam"] == pytest.approx([schedule.value(call["step"])] * 8)
        assert call["guided"] == [schedule.value(call["step"]) < 1] * 8
    # Reward functions see the dataset's plain prompts, never the hint.
    dataset_prompts = [row["prompt"] for row in chat]
    for call in reward.calls:
        assert all(prompt in dataset_prompts and "Hint" not in json.dumps(prompt) for prompt in call["prompts"])

    logged = [entry for entry in trainer.state.log_history if "guidance/lambda_mean" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    for entry in logged:
        assert entry["guidance/lambda_mean"] == pytest.approx(schedule.value(entry["step"] - 1))
        assert entry["guidance/lambda_std"] == 0.0  # one λ per group, and every group shares the schedule's
        assert all(name in entry for name in GUIDANCE_METRICS)
    assert logged[0]["guidance/guided_fraction"] == 1.0 and logged[-1]["guidance/guided_fraction"] == 0.0
    assert logged[-1]["guidance/kl_q_pi"] == 0.0 and logged[-1]["guidance/is_weight_mean"] == 1.0
    evaluated = [entry for entry in trainer.state.log_history if "heldout/pass@1" in entry]
    assert [entry["step"] for entry in evaluated] == [0, 2, 4]
    assert all({"heldout/mean@2", "heldout/pass@2"} <= set(entry) for entry in evaluated)
    assert [entry["step"] for entry in heldout.history] == [0, 2, 4]


def test_guided_per_group_mixes_guided_and_plain_rollouts(tokenizer, tmp_path):
    reward = RewardSpy()
    trainer = GuidedGRPOTrainer(
        model=tiny_model(tokenizer, seed=0),
        reward_funcs=reward,
        args=config(tmp_path, max_steps=1, guidance_schedule=Constant(0.4, end_step=1), guided_per_group=1),
        train_dataset=sums(8),
        processing_class=tokenizer,
    )
    trainer.train()
    assert reward.calls[0]["lam"] == pytest.approx([0.4, 1.0, 1.0, 1.0] * 2)
    assert trainer.state.log_history[0]["guidance/guided_fraction"] == 0.25


def test_guided_per_group_counts_positions_in_the_global_batch():
    """A group can straddle two processes: positions are counted in TRL's global (process-major) order."""
    rollout_func = GuidedRolloutFunc(GuidanceController(Constant(0.4, end_step=10)), ROLLOUT_BACKENDS["hf"])
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0), accelerator=SimpleNamespace(process_index=1), num_generations=4,
                              args=SimpleNamespace(guided_per_group=2))
    prompts = ["a", "a", "b", "b", "b", "b"]  # process 1 holds global entries 6..11: positions 2, 3, 0, 1, 2, 3
    assert rollout_func.rollout_lambdas(trainer, prompts, training=True) == [1.0, 1.0, 0.4, 0.4, 1.0, 1.0]
    assert rollout_func.rollout_lambdas(trainer, prompts, training=False) == [1.0] * 6


def test_the_vllm_backend_samples_with_trls_engine_through_guided_llm(monkeypatch):
    """The seam for prodsample.vllm: one GuidedLLM per engine TRL syncs weights into, rendering with the
    trainer's tokenizer, given the sampling settings (GuidedLLM.generate's keywords on the vllm branch).
    A stand-in GuidedLLM, so this test needs neither vLLM nor the integration."""
    calls = []

    class StandInGuidedLLM:
        def __init__(self, llm, tokenizer=None):
            calls.append(("wrap", llm, tokenizer))

        def generate(self, prompts, answers, settings):
            calls.append(("generate", prompts, answers, settings))
            return "rollout"

    class Engine:  # stands for vllm.LLM
        pass

    module = ModuleType("prodsample.vllm")
    module.GuidedLLM = StandInGuidedLLM
    monkeypatch.setitem(sys.modules, "prodsample.vllm", module)
    engine = Engine()
    trainer = SimpleNamespace(vllm_generation=SimpleNamespace(llm=engine), processing_class="the trainer's tokenizer")
    settings = SamplingSettings(lam=[0.5, 0.5], num_generations=2, seed=3, max_new_tokens=8, temperature=0.7,
                                top_k=0, top_p=1.0, min_p=None, hint_template="{prompt} [{answer}]")  # fmt: skip
    for _ in range(2):
        assert ROLLOUT_BACKENDS["vllm"](trainer, ["1+1="], ["2"], settings) == "rollout"
    assert calls == [("wrap", engine, "the trainer's tokenizer")] + [("generate", ["1+1="], ["2"], settings)] * 2


def test_the_vllm_backend_explains_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodsample.vllm", None)  # as if the vLLM integration were not installed
    with pytest.raises(ImportError, match="backend='vllm' needs prodsample.vllm.GuidedLLM"):
        ROLLOUT_BACKENDS["vllm"](SimpleNamespace(), ["1+1="], ["2"], SamplingSettings(lam=0.5))


# ---------------------------------------------------------------------------------------------------------
# The per-batch object
# ---------------------------------------------------------------------------------------------------------


def test_the_rollout_function_gets_each_rows_answer_from_its_batch(tokenizer, tmp_path):
    """The trainer opens each generation batch from its rows; the rollout function reads the answers there."""
    seen = []

    def recording_backend(trainer, prompts, answers, settings):
        seen.extend(zip(prompts, answers))
        return ROLLOUT_BACKENDS["hf"](trainer, prompts, answers, settings)

    build(tokenizer, tmp_path, rollout_backend=recording_backend, guidance_schedule=Linear(0.5, end_step=2), max_steps=2).train()
    answers = {row["prompt"]: row["answer"] for row in sums(8)}
    assert len(seen) == 4  # 2 steps x 2 prompts of 4 rollouts each
    assert [answer for _, answer in seen] == [answers[prompt] for prompt, _ in seen]


def test_a_batch_is_open_only_during_its_generation_step(tokenizer, tmp_path):
    def failing_verifier(**kwargs):
        raise ArithmeticError("the verifier failed")

    trainer = build(tokenizer, tmp_path, reward=failing_verifier)
    rows = [{"prompt": "1+1=", "answer": "2"} for _ in range(4)] + [{"prompt": "2+1=", "answer": "3"} for _ in range(4)]
    prompts = [row["prompt"] for row in rows]
    with pytest.raises(RuntimeError, match="no generation batch of these prompts is open"):
        trainer.rollout_func(prompts, trainer)
    with pytest.raises(ArithmeticError, match="the verifier failed"):
        trainer._generate_and_score_completions(rows)
    with pytest.raises(RuntimeError, match="no generation batch of these prompts is open"):
        trainer.guided_batch(prompts)  # closed even though its step failed


def blank_rollout(rows: int) -> GuidedRollout:
    zeros = torch.zeros(rows, 1)
    flags = torch.zeros(rows, dtype=torch.bool)
    return GuidedRollout([[1]] * rows, zeros.long(), flags[:, None], zeros, zeros, zeros, torch.ones(rows), flags, flags, torch.arange(rows))


def test_a_batch_takes_its_answers_then_one_rollout_then_the_rewards():
    with pytest.raises(ValueError, match="row 1 of the batch has no answer in column 'answer'"):
        GuidedBatch.from_rows([{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": " "}], "answer")
    batch = GuidedBatch.from_rows([{"prompt": "1+1=", "answer": 2}] * 2, "answer")
    assert batch.answers == ["2", "2"] and batch.prompt_keys[0] == batch.prompt_keys[1]
    with pytest.raises(RuntimeError, match="after its rollout"):
        batch.record_rewards(torch.zeros(2))
    with pytest.raises(ValueError, match="the rollout has 3 rows for the batch's 2 prompts"):
        batch.record_rollout(blank_rollout(3))
    batch.record_rollout(blank_rollout(2))
    with pytest.raises(RuntimeError, match="one rollout_func call per batch"):
        batch.record_rollout(blank_rollout(2))
    batch.record_rewards(torch.zeros(2))
    with pytest.raises(RuntimeError, match="recorded once"):
        batch.record_rewards(torch.zeros(2))


def test_group_statistics_come_from_the_gathered_batch_where_a_group_straddles_processes():
    """Process 1 of 2 holds rows 3-5 of 6 in groups of 2: group "b" (rows 2 and 3) lies on both processes."""
    tokens = torch.zeros(6, 2)
    gathered = GatheredBatch(
        prompt_keys=["a", "a", "b", "b", "c", "c"],
        group_size=2,
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        lam=torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0]),
        guided=torch.tensor([True, True, True, False, False, False]),
        desynced=torch.zeros(6, dtype=torch.bool),
        leaked=torch.zeros(6, dtype=torch.bool),
        echoed=torch.zeros(6, dtype=torch.bool),
        logprobs=tokens,
        plain_logprobs=tokens,
        trainer_logprobs=None,
        mask=torch.ones(6, 2, dtype=torch.bool),
        process_rows=slice(3, 6),
    )
    controller = GuidanceController(Linear(0.5, end_step=10))
    gathered.record(controller, step=1)
    # Per group: its smallest λ, its success rate, the step.
    assert controller.state_dict()["records"] == {"a": [0.5, 0.5, 1], "b": [0.5, 1.0, 1], "c": [1.0, 0.0, 1]}
    assert gathered.local(torch.arange(6)).tolist() == [3, 4, 5]
    metrics = gathered.metrics(gathered.off_policy_weights("none", ImportanceConfig(), 0.1), success_threshold=0.0)
    assert metrics["guidance/groups_informative"] == pytest.approx(1 / 3)  # only "a"; "b" is all-pass across processes
    interleaved = dataclasses.replace(gathered, prompt_keys=["a", "b", "a", "b", "c", "c"])
    with pytest.raises(RuntimeError, match="contiguous groups of num_generations"):
        interleaved.record(controller, step=2)


def test_baseline_keeping_weights_come_from_the_gathered_batch_where_a_group_straddles_processes():
    """Process 1 of 2 holds rows 3-5 of 6 in groups of 2: row 3's weight and advantage depend on row 2, which
    lies on process 0. Each value below is written out from the definitions (docs/trl.md), engine weight
    (π_trainer/π_engine, token_truncate at 3) included; padding (row 3's second token) must not count."""
    log_q = torch.tensor([[-1.0, 0.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    log_pi = log_q + torch.tensor([[0.0, 0.0], [0.0, 0.0], [-0.4, -0.6], [0.0, 5.0], [0.0, 0.0], [0.0, 0.0]])
    trainer_logprobs = log_pi + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.bool)
    gathered = GatheredBatch(
        prompt_keys=["a", "a", "b", "b", "c", "c"],
        group_size=2,
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        lam=torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0]),
        guided=torch.tensor([False, False, True, False, False, False]),
        desynced=torch.zeros(6, dtype=torch.bool),
        leaked=torch.zeros(6, dtype=torch.bool),
        echoed=torch.zeros(6, dtype=torch.bool),
        logprobs=log_q,
        plain_logprobs=log_pi,
        trainer_logprobs=trainer_logprobs,
        mask=mask,
        process_rows=slice(3, 6),
    )
    engine = ImportanceConfig("token", "truncate", cap=3.0)
    advantages, weights = gathered.baseline_keeping(
        gathered.off_policy_weights("none", engine, 0.1), truncate=None, scale_rewards="group"
    )
    # Group "b": ℓ = (−1, 0), w̃ = (σ(−1), σ(1)); b = w̃_2·1; s² = w̃_2·w̃_3 / (1 − w̃_2² − w̃_3²) = ½.
    w2, w3 = torch.sigmoid(torch.tensor(-1.0)), torch.sigmoid(torch.tensor(1.0))
    expected_advantages = torch.tensor([(0.0 - w2) / (0.5**0.5 + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(gathered.local(advantages), expected_advantages)
    expected_weights = torch.tensor([[2 * w3 * torch.e**0.5, 0.0], [2 * 0.5 * 3.0, 0.0], [2 * 0.5 * 1.0, 0.0]])
    torch.testing.assert_close(gathered.local(weights.weights), expected_weights)
    assert gathered.local(weights.clipped).tolist() == [[False, False], [True, False], [False, False]]
    assert float(weights.clipped_fraction) == pytest.approx(1 / 7)  # one token of seven capped
    # Row 0's group "a" is uniform (ℓ = 0): GRPO's advantage (1 − ½)/(std with Bessel + 1e-4).
    assert float(advantages[0]) == pytest.approx(0.5 / (0.5**0.5 + 1e-4))


# ---------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# ---------------------------------------------------------------------------------------------------------

SOLVED = {"0+0=", "2+0="}


class PromptReward:
    """Success (reward ≥ 1) on SOLVED prompts whatever the completion, failure elsewhere; a small
    completion-dependent part keeps the groups informative so the model trains."""

    __name__ = "prompt_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, lam, trainer_state, **kwargs):
        self.calls.append([(trainer_state.global_step, prompt, value) for prompt, value in zip(prompts, lam)])
        return [(1.0 if prompt in SOLVED else 0.0) + 0.1 * (len(text) % 2) for prompt, text in zip(prompts, completions)]


def resumable_trainer(tokenizer, tmp_path, reward, **overrides):
    # Rows repeat prompts, unshuffled, so steps 2-3 revisit the prompts of steps 0-1 within one epoch.
    rows = [{"prompt": f"{i}+0=", "answer": str(i)} for i in (0, 1, 2, 3, 0, 1, 2, 3)]
    controller = GuidanceController(Adaptive(Linear(0.5, end_step=6), mode="history"), success_threshold=0.9)
    return GuidedGRPOTrainer(
        model=tiny_model(tokenizer, seed=0),
        reward_funcs=reward,
        args=config(tmp_path, per_device_train_batch_size=8, max_steps=4, save_steps=2, save_strategy="steps", shuffle_dataset=False, max_completion_length=3,
                    guidance_schedule=controller.schedule),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        guidance_controller=controller,
    )


def test_resume_continues_the_schedule_and_the_controller(tokenizer, tmp_path):
    straight_reward = PromptReward()
    straight = resumable_trainer(tokenizer, tmp_path / "straight", straight_reward)
    straight.train()

    resumed_reward = PromptReward()
    resumed = resumable_trainer(tokenizer, tmp_path / "resumed", resumed_reward)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))

    straight_lams = [entry for call in straight_reward.calls for entry in call]
    resumed_lams = [entry for call in resumed_reward.calls for entry in call]
    assert {step for step, _, _ in resumed_lams} == {2, 3}
    assert resumed_lams == [entry for entry in straight_lams if entry[0] >= 2]
    # The controller is what decides: solved prompts are released to λ = 1, the others stay guided at the
    # schedule's value, which a fresh controller (no records) would give every prompt.
    expected = {(step, prompt): 1.0 if prompt in SOLVED else Linear(0.5, end_step=6).value(step) for step, prompt, _ in resumed_lams}
    assert [(s, p, pytest.approx(lam)) for s, p, lam in resumed_lams] == [(s, p, expected[s, p]) for s, p, _ in resumed_lams]
    assert resumed.rollout_func.controller.state_dict() == straight.rollout_func.controller.state_dict()
    for name, parameter in straight.model.named_parameters():
        torch.testing.assert_close(resumed.model.state_dict()[name], parameter.detach())


def test_resume_refuses_a_checkpoint_without_the_controller(tokenizer, tmp_path):
    checkpoint = tmp_path / "foreign"
    trainer = resumable_trainer(tokenizer, tmp_path / "run", PromptReward())
    trainer.args.max_steps = 1
    trainer.train()
    trainer.save_model(str(checkpoint))
    trainer.state.save_to_json(str(checkpoint / "trainer_state.json"))
    with pytest.raises(FileNotFoundError, match="prodsample_guidance.json"):
        resumable_trainer(tokenizer, tmp_path / "again", PromptReward())._load_optimizer_and_scheduler(str(checkpoint))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def build(tokenizer, tmp_path, *, model=None, dataset=None, reward=None, trainer_kwargs=None, rollout_backend=None,
          **config_overrides):
    return GuidedGRPOTrainer(
        model=model if model is not None else tiny_model(tokenizer, seed=0),
        reward_funcs=reward if reward is not None else RewardSpy(),
        args=config(tmp_path, **config_overrides),
        train_dataset=dataset if dataset is not None else sums(8),
        processing_class=tokenizer,
        rollout_backend=rollout_backend,
        **(trainer_kwargs or {}),
    )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda tok, tmp: build(tok, tmp, dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": None}])),
         ValueError, r"train_dataset row 1 has no answer in column 'answer'"),
        (lambda tok, tmp: build(tok, tmp, dataset=Dataset.from_list([{"prompt": "1+1=", "solution": "2"}])),
         ValueError, r"train_dataset has no 'answer' column"),
        (lambda tok, tmp: config(tmp, guidance_backend="sglang"),
         ValueError, r"guidance_backend must be one of \['hf', 'server', 'vllm'\]"),
        (lambda tok, tmp: build(tok, tmp, temperature=0.0),
         ValueError, r"temperature must be > 0 .* greedy \(T = 0\) rollouts have no valid importance ratio"),
        (lambda tok, tmp: config(tmp, off_policy="clip_everything"),
         ValueError, "off_policy must be one of"),
        (lambda tok, tmp: config(tmp, guidance_schedule=Adaptive(Linear(0.5, end_step=4), mode="probe")),
         ValueError, "mode='probe'"),
        (lambda tok, tmp: build(tok, tmp, guidance_backend="vllm"),
         ValueError, "use_vllm=True"),
        (lambda tok, tmp: build(tok, tmp, trainer_kwargs={"rollout_func": lambda prompts, trainer: {}}),
         TypeError, "builds its rollout_func from args"),
        (lambda tok, tmp: GuidedGRPOTrainer(tiny_model(tok), RewardSpy(), args=GRPOConfig(output_dir=str(tmp), use_cpu=True)),
         TypeError, "needs args=prodsample.trl.GuidedGRPOConfig"),
        (lambda tok, tmp: config(tmp, guidance_schedule=None),
         ValueError, "guidance_schedule is required"),
        (lambda tok, tmp: build(tok, tmp, trainer_kwargs={"guidance_controller": GuidanceController(Constant(0.5, end_step=1))}),
         ValueError, "guidance_controller's schedule .* is not the config's guidance_schedule"),
        (lambda tok, tmp: build(tok, tmp, off_policy="luffy_shaping", num_iterations=2),
         ValueError, "luffy_shaping"),
        (lambda tok, tmp: build(tok, tmp, repetition_penalty=1.2),
         ValueError, "repetition_penalty"),
        (lambda tok, tmp: build(tok, tmp, guided_per_group=5),
         ValueError, "guided_per_group"),
        (lambda tok, tmp: build(tok, tmp, off_policy="baseline_keeping"),
         ValueError, r"loss_type='dapo' does not .* set loss_type to one of \('dr_grpo',\)"),
        (lambda tok, tmp: build(tok, tmp, off_policy="baseline_keeping", loss_type="dr_grpo", scale_rewards="batch"),
         ValueError, "scale_rewards must be 'group' or 'none', got 'batch'"),
        (lambda tok, tmp: build(tok, tmp, off_policy="baseline_keeping", loss_type="dr_grpo",
                                multi_objective_aggregation="normalize_then_sum"),
         ValueError, "multi_objective_aggregation must be 'sum_then_normalize'"),
        (lambda tok, tmp: config(tmp, baseline_keeping_truncate=2.0),
         ValueError, "baseline_keeping_truncate applies to off_policy='baseline_keeping' only, got off_policy='none'"),
        (lambda tok, tmp: config(tmp, off_policy="baseline_keeping", baseline_keeping_truncate=0.5),
         ValueError, "baseline_keeping_truncate must be >= 1"),
        (lambda tok, tmp: config(tmp, self_distill=0.5),
         ValueError, "self_distill must be a mapping or its JSON"),
        (lambda tok, tmp: config(tmp, distill_clip=2.0),
         ValueError, "distill_clip .* needs self_distill"),
        (lambda tok, tmp: build(tok, tmp, self_distill=DistillCoefficient(1.0, Linear(0.0, end_step=10))),
         ValueError, r"self_distill's β reaches 0 at step 10, after training stops at max_steps=4"),
        (lambda tok, tmp: build(tok, tmp, self_distill=DistillCoefficient(1.0, Linear(0.0, end_step=4)),
                                importance_sampling_level="sequence", loss_type="grpo"),
         ValueError, "importance_sampling_level must be 'token', got 'sequence'"),
    ],
    ids=["row without answer", "no answer column", "unknown backend", "temperature 0", "unknown off-policy mode",
         "probe mode", "vllm backend without vllm", "foreign rollout_func", "plain GRPOConfig", "no schedule",
         "foreign controller", "luffy with reuse", "repetition penalty",
         "guided_per_group > G", "baseline_keeping with a token-mean loss", "baseline_keeping with batch scaling",
         "baseline_keeping with per-function normalisation", "truncate without baseline_keeping", "truncate below 1",
         "self_distill not a coefficient", "distill_clip without self_distill", "self_distill past max_steps",
         "self_distill with sequence-level ratios"],
)
def test_bad_input_fails_clearly(tokenizer, tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        make(tokenizer, tmp_path)


def test_self_distill_ending_after_an_epoch_based_run_is_refused_when_training_starts(tokenizer, tmp_path):
    """Without max_steps the number of steps is known only once training starts: refused then, before the
    first rollout."""
    coefficient = DistillCoefficient(1.0, Linear(0.0, end_step=10))
    trainer = build(tokenizer, tmp_path, guidance_schedule=Linear(0.5, end_step=1), self_distill=coefficient,
                    max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match="after training stops at max_steps=4"):  # 8 prompts x 4 rollouts / 8 per step
        trainer.train()


def test_tokenizer_that_does_not_match_the_model(tokenizer, tmp_path):
    small = tiny_model(tokenizer, seed=0)
    small.resize_token_embeddings(len(tokenizer) - 10)
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        build(tokenizer, tmp_path, model=small)


def test_schedules_that_never_reach_one_warn(tokenizer, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule itself warns when built; the trainer must warn too
        endless = Constant(0.5)
    with pytest.warns(UserWarning, match="never reaches lam = 1"):
        build(tokenizer, tmp_path, guidance_schedule=endless)
    with pytest.warns(UserWarning, match="reaches lam = 1 at step 40 but training stops at max_steps=4"):
        build(tokenizer, tmp_path, guidance_schedule=Linear(0.5, end_step=40))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build(tokenizer, tmp_path, guidance_schedule=Linear(0.5, end_step=4))


def test_a_plain_grpo_trainer_is_refused_at_the_first_rollout(tokenizer, tmp_path):
    trainer = GRPOTrainer(
        model=tiny_model(tokenizer, seed=0),
        reward_funcs=RewardSpy(),
        args=config(tmp_path, max_steps=1),
        train_dataset=sums(8),
        processing_class=tokenizer,
        rollout_func=GuidedRolloutFunc(GuidanceController(Linear(0.5, end_step=1)), ROLLOUT_BACKENDS["hf"]),
    )
    with pytest.raises(TypeError, match="need prodsample.trl.GuidedGRPOTrainer"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------
# Framework-free helpers
# ---------------------------------------------------------------------------------------------------------


def test_guidance_metrics_on_a_handmade_batch():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-0.5, -0.5, 0.0], [-1.0, 0.0, 0.0], [-2.0, -2.0, -2.0], [-0.1, -0.1, 0.0]])
    plain = torch.tensor([[-1.0, -1.5, 0.0], [-1.0, 0.0, 0.0], [-2.0, -2.0, -2.0], [-0.1, -0.1, 0.0]])
    weights = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    metrics = guidance_metrics(
        lam=torch.tensor([0.5, 0.5, 1.0, 1.0]),
        guided=torch.tensor([True, True, False, False]),
        desynced=torch.tensor([False, False, False, True]),
        leaked=torch.tensor([True, False, False, False]),
        echoed=torch.tensor([False, False, True, False]),
        rewards=torch.tensor([1.0, 0.0, 0.0, float("nan")]),  # groups [1, 0] and [0, unscorable]
        group_size=2,
        success_threshold=0.0,
        logprobs=logprobs,
        plain_logprobs=plain,
        mask=mask,
        weights=weights,
        clipped_fraction=0.125,
    )
    assert metrics["guidance/lambda_mean"] == 0.75 and metrics["guidance/lambda_std"] == 0.25
    assert metrics["guidance/reward_guided"] == 0.5 and metrics["guidance/reward_plain"] == 0.0
    assert metrics["guidance/groups_informative"] == 0.5
    assert metrics["guidance/groups_all_fail"] == 0.5 and metrics["guidance/groups_all_pass"] == 0.0
    assert metrics["guidance/kl_q_pi"] == pytest.approx((0.5 + 1.0) / 8)
    assert metrics["guidance/is_weight_mean"] == pytest.approx(8.5 / 8)
    assert metrics["guidance/is_ess"] == pytest.approx(8.5**2 / (8 * 10.25))  # Σw² = 0.25 + 4 + 6·1
    assert metrics["guidance/length_guided"] == 1.5 and metrics["guidance/length_plain"] == 2.5
    assert metrics["guidance/hint_leakage_guided"] == 0.5 and metrics["guidance/hint_leakage_plain"] == 0.0
    assert metrics["guidance/hint_echo_guided"] == 0.0 and metrics["guidance/hint_echo_plain"] == 0.5
    assert metrics["guidance/desynced_fraction"] == 0.25 and metrics["guidance/is_clipped_fraction"] == 0.125


@pytest.mark.parametrize("mode", OFF_POLICY_MODE_NAMES)
def test_the_engine_weight_multiplies_every_mode(mode):
    """With a separate engine, each mode's weight is its guidance weight times π_trainer/π_engine under
    TRL's engine settings; without one (trainer_logprobs None), the guidance weight alone."""
    generator = torch.Generator().manual_seed(0)
    logprobs, plain = -torch.rand(3, 5, generator=generator) * 2, -torch.rand(3, 5, generator=generator) * 2
    trainer_logprobs = plain + 0.3 * torch.randn(3, 5, generator=generator)
    mask = torch.ones(3, 5, dtype=torch.bool)
    guided = torch.tensor([True, True, False])
    engine = ImportanceConfig("token", "truncate", cap=3.0)
    # LUFFY shapes the trained policy's probability, π_trainer when an engine sampled.
    alone = off_policy_mode_weights(mode, logprobs, trainer_logprobs if mode == "luffy_shaping" else plain, mask, guided)
    with_engine = off_policy_mode_weights(mode, logprobs, plain, mask, guided, trainer_logprobs, engine=engine)
    engine_weight = off_policy_weights(plain, plain, mask, trainer_logprobs, engine=engine).engine
    torch.testing.assert_close(with_engine.weights, alone.weights * engine_weight)
    assert not torch.allclose(engine_weight, torch.ones_like(engine_weight))


def test_engine_settings_follow_trls_arguments(tmp_path):
    default = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert engine_importance_config(default) == ImportanceConfig("sequence", "mask", cap=3.0)
    truncated = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0)
    assert engine_importance_config(truncated) == ImportanceConfig("token", "truncate", cap=2.0)
    floored = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.5)
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
        engine_importance_config(floored)


# ---------------------------------------------------------------------------------------------------------
# Scale-out: accelerate launch with 2 CPU processes
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_example_under_accelerate_launch_with_two_processes(tmp_path):
    """Both training signals on, so their gathered paths (a group on both processes; the teacher's log-probs
    gathered) run under real collectives too."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(REPO / "examples" / "trl_grpo.py"), "--max-steps", "2", "--eval-steps", "2", "--save-steps", "2",
        "--batch-size", "6", "--output-dir", str(tmp_path), "--off-policy", "baseline_keeping", "--self-distill", "0.5",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=540, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2
    # Both processes hold the same controller (records from the gathered batch) as the checkpoint does.
    controllers = [json.loads((tmp_path / f"controller-{rank}.json").read_text()) for rank in (0, 1)]
    saved = json.loads((tmp_path / "checkpoint-2" / "prodsample_guidance.json").read_text())["controller"]
    assert controllers[0] == controllers[1] == saved == summary["controller"]
    logged = [entry for entry in summary["log_history"] if "guidance/lambda_mean" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert logged[0]["guidance/lambda_mean"] == 0.5
    assert [entry["guidance/distill_coef"] for entry in logged] == [0.5, 0.25]
    assert all(math.isfinite(entry["guidance/distill_advantage_mean"]) for entry in logged)
    # 2 processes x 6 rollouts in groups of 4: 3 groups per step, the middle one on both processes, and every
    # group recorded from the gathered batch (group statistics of one process's rows would fail here).
    assert len({step for _, _, step in saved["records"].values()}) == 2
    assert [entry["step"] for entry in summary["heldout"]] == [0, 2]


# ---------------------------------------------------------------------------------------------------------
# Training signals: baseline-keeping weights and self-distillation (gradients: test_trl_bandit.py)
# ---------------------------------------------------------------------------------------------------------


def token_reward(completion_ids, **kwargs):
    """Rewards that vary within a group, so GRPO's advantages are not all 0."""
    return [float(sum(ids) % 3) for ids in completion_ids]


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_baseline_keeping_on_plain_rollouts_gives_trls_grpo_advantages(tokenizer, tmp_path, scale_rewards):
    """λ = 1 (q = π): w̃ = 1/G, so G·w̃·A is TRL's own advantage (its std with Bessel's correction and + 1e-4)."""
    rows = [row for row in sums(2) for _ in range(4)]
    advantages = {}
    for mode in ("none", "baseline_keeping"):
        trainer = build(
            tokenizer, tmp_path / mode, reward=token_reward, loss_type="dr_grpo", scale_rewards=scale_rewards,
            guidance_schedule=Constant(1.0, end_step=0), off_policy=mode,
        )
        trainer.model.train()
        advantages[mode] = trainer._generate_and_score_completions(rows)["advantages"]
    assert advantages["none"].abs().max() > 0.1  # informative groups: the comparison is not 0 = 0
    torch.testing.assert_close(advantages["baseline_keeping"], advantages["none"])


def test_self_distill_teacher_forces_the_hinted_prompt_on_plain_rollouts(tokenizer, tmp_path):
    """On λ = 1 rollouts (pure self-distillation) the teacher is log π(o_t | prompt ⊕ hint), teacher-forced:
    the guide context's log-probs as prodsample.hf.score computes them (chat prompts: the hint joins the user
    turn). Two steps of training then log β on its schedule and the term's diagnostics."""
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in sums(8)])
    coefficient = DistillCoefficient(0.5, Linear(0.0, end_step=2))
    trainer = build(
        tokenizer, tmp_path, dataset=chat, max_steps=2,
        guidance_schedule=Constant(1.0, end_step=0), self_distill=coefficient,
    )
    rows = [chat[i] for i in (0, 0, 1, 1)]
    prompts, answers = [row["prompt"] for row in rows], [row["answer"] for row in rows]
    batch = GuidedBatch.from_rows(rows, "answer")
    rollout = guided_generate(trainer.model, tokenizer, prompts, answers, lam=1.0, max_new_tokens=4, seed=0)
    batch.record_rollout(rollout)
    teacher = trainer._teacher_logprobs(rows, batch)
    expected = score(trainer.model, tokenizer, prompts, answers, rollout.completion_lists(), lam=0.5).guide_logprobs
    real = rollout.completion_mask
    torch.testing.assert_close(teacher[real], expected[real])
    assert (teacher[real] - rollout.plain_logprobs[real]).abs().max() > 0.01  # the hint changes the teacher

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "guidance/distill_coef" in entry]
    assert [entry["guidance/distill_coef"] for entry in logged] == [0.5, 0.25]
    assert all(math.isfinite(entry["guidance/distill_advantage_mean"]) for entry in logged)
    assert all(0.0 <= entry["guidance/distill_clipped_fraction"] <= 1.0 for entry in logged)


def test_a_rollout_whose_records_are_lost_enters_no_loss_and_leaves_the_batch_finite(tokenizer, tmp_path):
    """One server rollout of eight lost its records: built as the server backend builds it (settle, then
    GuidedCall.rollout), it is rewarded but masked like padding. The batch's advantages, metrics (the
    self-distillation teacher's included) and loss stay finite, where its old NaN log-probs failed the batch, and
    none of its tokens enters the loss: other tokens in its place leave the loss as it was. Rollout 2 lost step
    after one token: its guide log-probs are NaN from there (the pairing's convention), and the teacher is
    re-scored for it as for every unguided rollout, so that NaN reaches no tensor either."""
    lost, desynced, eos = 5, 2, tokenizer.eos_token_id

    def backend(trainer, prompts, answers, settings):
        call = GuidedCall.plan(trainer.processing_class, prompts, answers, settings)
        completions, records = {}, {}
        for r, rollout in enumerate(call.rollouts):
            tokens = [5 + r % 3, 7, eos]
            completions.update({request.request_id: tokens for request in rollout.requests})
            if r == desynced:  # in step for one token: the guide context's log-probs are NaN from there on
                records[rollout.name] = RolloutRecord(tokens, [-1.0, -2.1, -0.4], [-1.2, -2.1, -0.4],
                                                      [-0.8, math.nan, math.nan], 1, "out_of_step")
            elif r != lost:  # rollout 5's record is missing (forgotten after record_ttl_s)
                records[rollout.name] = RolloutRecord(tokens, [-1.0, -2.0, -0.5], [-1.2, -2.1, -0.4],
                                                      [-0.8, -1.9, -0.6], None, None)
        return call.rollout(settle(call.rollouts, completions, records), tokenizer.pad_token_id)

    trainer = build(tokenizer, tmp_path, rollout_backend=backend, reward=token_reward,
                    self_distill=DistillCoefficient(0.5, Linear(0.0, end_step=4)))
    trainer.model.train()
    rows = [row for row in sums(2) for _ in range(4)]
    output = trainer._generate_and_score_completions(rows)
    mask = output["completion_mask"].bool()
    assert mask.sum(dim=1).tolist() == [0 if r == lost else 3 for r in range(8)]
    assert output["completion_ids"][lost, :3].tolist() == [5 + lost % 3, 7, eos]  # kept, and rewarded
    assert int(output["num_items_in_batch"]) == 7 * 3
    assert torch.isfinite(output["advantages"]).all() and not output["advantages"][lost].any()
    assert output["advantages"][mask].abs().max() > 0  # the others train
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items() if name.startswith("guidance/")}
    for name in ("kl_q_pi", "is_weight_mean", "is_ess", "desynced_fraction", "guided_fraction",
                 "distill_advantage_mean"):
        assert math.isfinite(logged[f"guidance/{name}"]), name
    assert (logged["guidance/guided_fraction"], logged["guidance/desynced_fraction"]) == (6 / 8, 2 / 8)
    trainer.current_gradient_accumulation_steps = 1  # what transformers' training loop sets before each step
    loss = trainer.compute_loss(trainer.model, output)
    assert torch.isfinite(loss)
    other = dict(output, completion_ids=output["completion_ids"].clone())
    other["completion_ids"][lost, :3] = torch.tensor([9, 9, 9])
    torch.testing.assert_close(trainer.compute_loss(trainer.model, other), loss)


# The completions of each group (answer a), and which state the answer before any derivation: the answer among
# the first 8 words, as the default template's own answer line invites ("a because ...").
LEAKY_COMPLETIONS = ["{a} because the sum is {a}", "adding the two numbers one at a time gives {a}",
                     "as the hint says the sum is {a}", "no idea"]


@pytest.mark.parametrize("template, echo", [(DEFAULT_HINT_TEMPLATE, 0.0), (HINT_TEMPLATES["answer"], 0.25)],
                         ids=["default", "answer"])
def test_the_logged_leakage_counts_answers_stated_first_under_every_template(tokenizer, tmp_path, template, echo):
    """`hint_leakage_*` counts the completions that state the answer first, whatever the template (under the
    default one, whose hint is an answer line, restating the hint cannot be told from answering); `hint_echo_*`
    those that restate the hint, which only a template with wording of its own ("hint") can show."""
    eos = tokenizer.eos_token_id

    def backend(trainer, prompts, answers, settings):
        sampled = ROLLOUT_BACKENDS["hf"](trainer, prompts, answers, settings)
        texts = [LEAKY_COMPLETIONS[r % 4].format(a=answers[group]) for r, group in enumerate(sampled.group_ids.tolist())]
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[t < len(row) for t in range(width)] for row in rows])
        zeros = torch.zeros(ids.shape)
        return dataclasses.replace(sampled, completion_ids=ids, completion_mask=mask, logprobs=zeros,
                                   plain_logprobs=zeros, guide_logprobs=zeros, lengths=None)

    trainer = build(tokenizer, tmp_path, rollout_backend=backend, hint_template=template, max_completion_length=64)
    trainer.model.train()
    trainer._generate_and_score_completions([row for row in sums(2) for _ in range(4)])
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items() if name.startswith("guidance/")}
    assert logged["guidance/guided_fraction"] == 1.0  # λ = 0.5 at step 0: every rollout is guided
    assert logged["guidance/hint_leakage_guided"] == 0.5  # rows 0 and 2 of each group
    assert logged["guidance/hint_echo_guided"] == echo  # row 2 names the hint


# ---------------------------------------------------------------------------------------------------------
# The config: saved, printed and parsed like every GRPO setting
# ---------------------------------------------------------------------------------------------------------


def test_the_guidance_settings_parse_from_the_command_line_and_yaml(tmp_path):
    from trl import TrlParser

    schedule = '{"kind": "linear", "start": 0.5, "end_step": 10}'
    distill = '{"start": 0.2, "shape": {"kind": "linear", "start": 0.0, "end_step": 10}}'
    (args,) = TrlParser(GuidedGRPOConfig).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "True", "--guidance_schedule", schedule,
        "--off_policy", "token_truncate", "--guided_per_group", "2", "--self_distill", distill,
    ])
    assert args.schedule() == Linear(0.5, end_step=10) and args.off_policy == "token_truncate"
    assert args.guided_per_group == 2 and args.distill_coefficient() == DistillCoefficient(0.2, Linear(0.0, end_step=10))

    yaml_file = tmp_path / "guided.yaml"
    yaml_file.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\noff_policy: baseline_keeping\nloss_type: dr_grpo\n"
        "guidance_schedule:\n  kind: constant\n  lam: 0.5\n  end_step: 3\n"
    )
    (from_yaml,) = TrlParser(GuidedGRPOConfig).parse_args_and_config(["--config", str(yaml_file)])
    assert from_yaml.schedule() == Constant(0.5, end_step=3) and from_yaml.off_policy == "baseline_keeping"

    saved = json.loads(args.to_json_string())  # what the trainer writes next to its checkpoints
    assert saved["guidance_schedule"] == Linear(0.5, end_step=10).to_dict() and saved["off_policy"] == "token_truncate"
    assert "guidance_schedule" in str(args)  # printed with the rest


def test_an_off_policy_mode_is_one_registry_entry(tokenizer, tmp_path, monkeypatch):
    """A new mode needs only its entry: the config accepts its name, the trainer calls its advantages and its
    check. The stand-in doubles TRL's advantages and keeps unit weights."""
    from prodsample.trl import OFF_POLICY_MODES, OffPolicyMode

    checked = []

    def doubled(gathered, advantages, engine, args):
        return 2 * advantages, gathered.off_policy_weights("none", engine, args.luffy_gamma)

    monkeypatch.setitem(OFF_POLICY_MODES, "doubled", OffPolicyMode(doubled, checked.append))
    rows = [row for row in sums(2) for _ in range(4)]
    advantages = {}
    for mode in ("none", "doubled"):
        trainer = build(tokenizer, tmp_path / mode, reward=token_reward, guidance_schedule=Constant(1.0, end_step=0),
                        off_policy=mode)
        trainer.model.train()
        advantages[mode] = trainer._generate_and_score_completions(rows)["advantages"]
    assert len(checked) == 1 and checked[0].off_policy == "doubled"
    assert advantages["none"].abs().max() > 0.1
    torch.testing.assert_close(advantages["doubled"], 2 * advantages["none"])


@pytest.mark.parametrize("mask", [True, False], ids=["masked", "kept"])
def test_a_guided_prefix_is_sampled_at_lam_zero_and_masked_or_kept(tokenizer, tmp_path, mask):
    """guide_prefix_tokens = 2: the rollout function samples the first 2 tokens of each guided rollout at
    λ = 0 (log q = the hinted log π there), and the trainer gives them advantage 0 unless told to keep them."""
    rows = [row for row in sums(2) for _ in range(4)]
    trainer = build(tokenizer, tmp_path, reward=token_reward, guidance_schedule=Constant(0.5, end_step=4),
                    guide_prefix_tokens=2, mask_guide_prefix=mask)
    trainer.model.train()
    seen = []
    backend = trainer.rollout_func.backend
    trainer.rollout_func.backend = lambda *call: seen.append(backend(*call)) or seen[-1]
    advantages = trainer._generate_and_score_completions(rows)["advantages"]
    (rollout,) = seen
    real = rollout.completion_mask[:, :2]
    torch.testing.assert_close(rollout.logprobs[:, :2][real], rollout.guide_logprobs[:, :2][real])
    prefix, rest = advantages[:, :2][real], advantages[:, 2:][rollout.completion_mask[:, 2:]]
    assert rest.abs().max() > 0.01  # informative groups: the comparison is not 0 = 0
    assert (prefix.abs().max() == 0) == mask
