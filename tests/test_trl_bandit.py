"""Each off-policy mode and the self-distillation term, through TRL's real loss: one SGD step on a float64
bandit equals the analytic gradient.

The bandit is a policy over a vocabulary of 4 with one parameter per token (its logits θ); every completion
is one token. Under the plain prompt the logits are θ; once the context holds the hint (marked by the token
"c", which the `answer` hint template's "correct" contains and the prompts "p0", "p1" do not) they are θ + Δ,
Δ = φ − θ₀: the same weights see the hint, so at θ = θ₀ the teacher's logits are φ, and a teacher forward
that kept its gradient would move θ. A custom backend (the backend seam) records, in float64, which token
each rollout drew and its exact log q, q ∝ exp((λ·log softmax(θ) + (1−λ)·log softmax(φ)) / T), so the test
knows every rollout's weight and advantage and can write the update down:

    θ' − θ = η · (1/B) Σ_i (w_i · A_i + β · g_i · a_i) · ∇_θ log π_θ(o_i),   ∇_θ log π_θ(o) = (e_o − softmax(θ/T)) / T

with w_i the mode's weight (1 for "none"; G·w̃_i for "baseline_keeping", with A_i centred under w̃), for
"luffy_shaping" the gradient of A_i·π/(π+γ) on guided rows, and the self-distillation advantage
a_i = clip(log softmax(φ/T) − log softmax(θ/T), ±3) at o_i with g_i = min(π/q, 2) (β = 0 without it).
TRL's fused log-prob kernel accumulates in float32, which bounds the agreement at ~1e-8 (8.5e-9 measured);
the modes differ from one another by orders of magnitude more (asserted too).
"""

import os

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from prodsample.grpo import DEFAULT_DISTILL_CLIP, DistillCoefficient
from prodsample.prompts import HINT_TEMPLATES
from prodsample.rollout import GuidedRollout
from prodsample.schedules import Constant, Linear
from prodsample.trl import DEFAULT_OFF_POLICY_MODE, TRL_OFF_POLICY_MODES, GuidedGRPOConfig, GuidedGRPOTrainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB = 4
TEMPERATURE = 0.7
LEARNING_RATE = 0.5
LAM = 0.3
GAMMA = 0.1
THETA = torch.tensor([0.4, -0.3, 0.9, 0.1], dtype=torch.float64)  # the policy's logits
PHI = torch.tensor([2.5, -2.0, -1.5, 0.5], dtype=torch.float64)  # the hinted context's logits at θ = THETA
HINT_TOKEN = 2  # "c": in the `answer` hint template ("correct"), not in the prompts
HINT_TEMPLATE = HINT_TEMPLATES["answer"]  # pinned: the default ("Answer: {answer}") has no "c"
BETA = 0.5
# Per prompt: the token each of its 4 rollouts draws (the first two are guided) and each token's reward.
TOKENS = {"p0": [0, 1, 2, 3], "p1": [2, 3, 0, 1]}
REWARDS = {"p0": [1.0, 0.0, 0.0, 1.0], "p1": [0.0, 1.0, 1.0, 1.0]}


class BanditConfig(PretrainedConfig):
    model_type = "prodsample_bandit"

    def __init__(self, vocab_size=VOCAB, **kwargs):
        super().__init__(vocab_size=vocab_size, **kwargs)


class ConstantBackbone(nn.Module):
    """Hidden state 1 at every position: the head's weight column is the logit vector θ."""

    def forward(self, input_ids=None, **kwargs):
        return BaseModelOutput(last_hidden_state=torch.ones(*input_ids.shape, 1, dtype=torch.float64))


def hint_seen(input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, S, 1]`: the context up to each position holds the hint marker."""
    return (input_ids == HINT_TOKEN).cumsum(dim=1).gt(0).unsqueeze(-1)


class BanditLM(PreTrainedModel):
    config_class = BanditConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = ConstantBackbone()
        self.lm_head = nn.Linear(1, config.vocab_size, bias=False, dtype=torch.float64)
        self.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=3)  # TRL reads its EOS ids
        self.register_buffer("hint_shift", PHI - THETA)  # Δ: a fixed shift, so the teacher's logits are θ + Δ
        self.post_init()

    def _init_weights(self, module):
        if module is self.lm_head:
            with torch.no_grad():
                module.weight.copy_(THETA.unsqueeze(1))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, **kwargs):
        logits = self.lm_head(self.model(input_ids).last_hidden_state)
        return CausalLMOutput(logits=logits + hint_seen(input_ids) * self.hint_shift)


def bandit_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "c": 2, "d": 3}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="a", eos_token="d")


def theta_of(model) -> torch.Tensor:
    return model.lm_head.weight.detach()[:, 0].clone()


def bandit_backend(trainer, prompts, answers, settings):
    """Rollouts with known tokens and their exact float64 records (the backend contract of prodsample.trl).

    As `prodsample.hf.guided_generate` does, λ = 1 rollouts run no hinted context: their guide_logprobs repeat
    the plain ones (the trainer must teacher-force the teacher there)."""
    theta = theta_of(trainer.model)
    lam = settings.lam_per_rollout(len(prompts)).double()
    temperature = settings.temperature
    tokens = torch.tensor([token for prompt in prompts for token in TOKENS[prompt][:settings.num_generations]])
    teacher_logits = theta + trainer.model.hint_shift
    plain = torch.log_softmax(theta, 0)
    guide = torch.log_softmax(teacher_logits, 0)
    mixed = torch.log_softmax((lam[:, None] * plain + (1 - lam[:, None]) * guide) / temperature, dim=1)
    pick = lambda table: table.gather(-1, tokens[:, None])  # noqa: E731
    rows = len(tokens)
    plain_logprobs = pick(torch.log_softmax(theta / temperature, 0).expand(rows, -1))
    guided = lam < 1
    return GuidedRollout(
        prompt_ids=[[1]] * rows,
        completion_ids=tokens[:, None],
        completion_mask=torch.ones(rows, 1, dtype=torch.bool),
        logprobs=pick(mixed),
        plain_logprobs=plain_logprobs,
        guide_logprobs=torch.where(
            guided[:, None], pick(torch.log_softmax(teacher_logits / temperature, 0).expand(rows, -1)), plain_logprobs
        ),
        lam=lam.float(),
        guided=guided,
        desynced=torch.zeros(rows, dtype=torch.bool),
        group_ids=torch.arange(len(prompts)).repeat_interleave(settings.num_generations),
    )


def bandit_reward(prompts, completion_ids, **kwargs):
    return [REWARDS[prompt][TOKENS[prompt].index(ids[0])] for prompt, ids in zip(prompts, completion_ids)]


def q_over_pi(prompt: str) -> list[float]:
    """π(o)/q(o) of each rollout of the prompt's group (the first two guided at λ = LAM, the rest plain)."""
    pi = torch.softmax(THETA / TEMPERATURE, 0)
    log_plain, log_guide = torch.log_softmax(THETA, 0), torch.log_softmax(PHI, 0)
    ratios = []
    for g, token in enumerate(TOKENS[prompt]):
        lam = LAM if g < 2 else 1.0
        q = torch.softmax((lam * log_plain + (1 - lam) * log_guide) / TEMPERATURE, 0)[token]
        ratios.append(float(pi[token] / q))
    return ratios


def distill_log_ratio(token: int) -> float:
    """log π(o | hint) − log π(o | prompt) at the sampling temperature, unclipped."""
    return float(torch.log_softmax(PHI / TEMPERATURE, 0)[token] - torch.log_softmax(THETA / TEMPERATURE, 0)[token])


def distill_advantage(token: int, ratio: float) -> float:
    """g·a: the π/q weight capped at 2 times the log-ratio clipped at ±DEFAULT_DISTILL_CLIP."""
    return min(ratio, 2.0) * max(-DEFAULT_DISTILL_CLIP, min(DEFAULT_DISTILL_CLIP, distill_log_ratio(token)))


def expected_step(mode: str, beta: float = 0.0) -> torch.Tensor:
    """η times the analytic gradient of the mode's objective at θ, plus β times the self-distillation term's
    (float64, written out from the definitions)."""
    pi = torch.softmax(THETA / TEMPERATURE, 0)
    gradient = torch.zeros(VOCAB, dtype=torch.float64)
    batch = 0
    for prompt, tokens in TOKENS.items():
        rewards = torch.tensor(REWARDS[prompt], dtype=torch.float64)
        ratios = q_over_pi(prompt)
        if mode == "baseline_keeping":  # w̃ ∝ π/q over the group, the baseline and G·w̃_i taken under it
            kept = torch.tensor(ratios, dtype=torch.float64) / sum(ratios)
            advantages = len(tokens) * kept * (rewards - (kept * rewards).sum())  # scale_rewards="none"
        else:
            advantages = rewards - rewards.mean()  # scale_rewards="none"
        for g, token in enumerate(tokens):
            guided, ratio = g < 2, ratios[g]
            weight = {
                "none": 1.0,
                "token_truncate": min(ratio, 2.0),
                "geometric": min(ratio, 2.0),  # one token: the geometric mean is the ratio
                "sequence_mask": ratio if ratio <= 2.0 else 0.0,
                "luffy_shaping": float(GAMMA * pi[token] / (pi[token] + GAMMA) ** 2) if guided else 1.0,
                "baseline_keeping": 1.0,  # G·w̃_i is in the advantage above
            }[mode]
            score = (torch.nn.functional.one_hot(torch.tensor(token), VOCAB).double() - pi) / TEMPERATURE
            gradient += (weight * float(advantages[g]) + beta * distill_advantage(token, ratio)) * score
            batch += 1
    return LEARNING_RATE * gradient / batch


def test_the_bandit_exercises_truncation_and_masking():
    """The guided ratios straddle the cap of 2, so truncation and masking change some weights and not others."""
    pi = torch.softmax(THETA / TEMPERATURE, 0)
    mixed = LAM * torch.log_softmax(THETA, 0) + (1 - LAM) * torch.log_softmax(PHI, 0)
    q = torch.softmax(mixed / TEMPERATURE, 0)
    guided_tokens = [tokens[g] for tokens in TOKENS.values() for g in range(2)]
    ratios = (pi / q)[guided_tokens]
    assert (ratios > 2).any() and (ratios < 2).any()
    steps = {mode: expected_step(mode) for mode in TRL_OFF_POLICY_MODES}
    distinct = [steps[mode] for mode in ("none", "token_truncate", "sequence_mask", "luffy_shaping", "baseline_keeping")]
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            assert (a - b).abs().max() > 1e-3


def test_the_bandit_exercises_the_self_distillation_clip_and_weight():
    """a_t is clipped on some rollouts and not on others, among the guided and among the teacher-forced ones;
    the guided rollouts' π/q weights are not 1; and the term moves the update by more than 1e-3."""
    for tokens in TOKENS.values():
        for rows in (tokens[:2], tokens[2:]):  # guided, plain (teacher-forced)
            assert sorted(abs(distill_log_ratio(token)) > DEFAULT_DISTILL_CLIP for token in rows) == [False, True]
    assert all(abs(ratio - 1) > 0.1 for prompt in TOKENS for ratio in q_over_pi(prompt)[:2])
    assert (expected_step("none", BETA) - expected_step("none")).abs().max() > 1e-3


def bandit_step(tmp_path, max_steps=1, **guidance) -> GuidedGRPOTrainer:
    """The real trainer after `max_steps` steps on the bandit, with the `GuidedGRPOConfig` settings `guidance`."""
    torch.manual_seed(0)
    model = BanditLM(BanditConfig())
    assert torch.equal(theta_of(model), THETA)
    args = GuidedGRPOConfig(
        output_dir=str(tmp_path),
        guidance_schedule=Constant(LAM, end_step=max_steps),
        guided_per_group=2,
        hint_template=HINT_TEMPLATE,
        luffy_gamma=GAMMA,
        **guidance,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=1,
        temperature=TEMPERATURE,
        scale_rewards="none",
        loss_type="dr_grpo",  # every loss type normalises one-token rollouts alike; baseline_keeping needs this one
        learning_rate=LEARNING_RATE,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        gradient_checkpointing=False,
        bf16=False,  # TRL defaults to bf16 autocast, which would round the float64 bandit
        max_steps=max_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    dataset = Dataset.from_list([{"prompt": "p0", "answer": "x"}, {"prompt": "p1", "answer": "x"}])
    trainer = GuidedGRPOTrainer(
        model=model,
        reward_funcs=bandit_reward,
        args=args,
        train_dataset=dataset,
        processing_class=bandit_tokenizer(),
        rollout_backend=bandit_backend,
    )
    trainer.train()
    return trainer


def step_of(trainer) -> torch.Tensor:
    return theta_of(trainer.model) - THETA


@pytest.mark.parametrize("mode", TRL_OFF_POLICY_MODES)
def test_one_sgd_step_equals_the_modes_analytic_gradient(mode, tmp_path):
    torch.testing.assert_close(step_of(bandit_step(tmp_path, off_policy=mode)), expected_step(mode), rtol=0.0, atol=5e-8)


def test_the_default_mode_trains_as_the_mode_it_names(tmp_path):
    """Without `off_policy`, the update is the analytic one of the mode DEFAULT_OFF_POLICY_MODE names (the
    modes' updates differ by more than 1e-3, see above)."""
    step = step_of(bandit_step(tmp_path))
    torch.testing.assert_close(step, expected_step(DEFAULT_OFF_POLICY_MODE), rtol=0.0, atol=5e-8)


@pytest.mark.parametrize("mode", ["none", "baseline_keeping"])
def test_one_sgd_step_with_self_distillation_adds_beta_times_its_gradient(mode, tmp_path):
    """β·g_i·a_i on top of the mode's advantage: the teacher recorded on the guided rollouts (with the capped
    π/q weight), teacher-forced under the hinted prompt on the plain ones (weight 1), no gradient through it.

    Mutations this catches (each tried): a_t's sign flipped; the π/q weight dropped; the recorded
    guide_logprobs used on the plain rollouts (no teacher-forcing); the stop-gradient removed (prodsample.hf.score
    without no_grad and the core's detach of the teacher: θ then moves through the teacher's logits θ + Δ;
    either alone still holds it).
    """
    coefficient = DistillCoefficient(BETA, Linear(start=0.0, end_step=1))
    trainer = bandit_step(tmp_path, off_policy=mode, self_distill=coefficient)
    torch.testing.assert_close(step_of(trainer), expected_step(mode, BETA), rtol=0.0, atol=5e-8)
    logged = trainer.state.log_history[0]
    assert logged["guidance/distill_coef"] == BETA
    expected_mean = sum(
        distill_advantage(token, ratio)
        for prompt, tokens in TOKENS.items()
        for token, ratio in zip(tokens, q_over_pi(prompt))
    ) / 8
    assert logged["guidance/distill_advantage_mean"] == pytest.approx(expected_mean, abs=1e-6)
    assert logged["guidance/distill_clipped_fraction"] == 0.5


def test_the_distill_coefficient_follows_its_schedule_to_zero(tmp_path):
    """β = 1 → 0 linearly by step 2 of 3: logged per step, and once it is 0 no teacher is computed."""
    trainer = bandit_step(tmp_path, max_steps=3, self_distill=DistillCoefficient(1.0, Linear(start=0.0, end_step=2)))
    logged = [entry for entry in trainer.state.log_history if "guidance/distill_coef" in entry]
    assert [entry["guidance/distill_coef"] for entry in logged] == [1.0, 0.5, 0.0]
    assert ["guidance/distill_advantage_mean" in entry for entry in logged] == [True, True, False]
