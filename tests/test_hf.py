"""HF integration against a brute-force reference that recomputes both contexts from scratch every step."""

import math

import pytest
import torch
from scipy.stats import chi2_contingency

from prodsample.testing import tiny_model, tiny_tokenizer
from prodsample.settings import SamplingSettings
from prodsample.hf import ProductLogitsProcessor, build_contexts, guided_generate, score
from prodsample.noise import exponential_noise, row_keys
from prodsample.prompts import DEFAULT_HINT_TEMPLATE

from .helpers.reference import log_softmax64

PROMPTS = ["What is 12+7?", "Add 3 and 4", "9*9="]  # different lengths: left padding is exercised
ANSWERS = ["19", "7", "81"]
FP32_TOL = 2e-4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tokenizer):
    return tiny_model(tokenizer, arch=request.param, seed=1)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_model(tokenizer, arch="llama", seed=1)


def with_eos(model, eos_id):
    model.generation_config.eos_token_id = eos_id
    return model


def brute_force(model, tokenizer, prompts, answers, lam, generations, max_new_tokens, temperature, seed, eos_ids, forced=None, template=DEFAULT_HINT_TEMPLATE):
    """Per rollout and step: two fresh unbatched forwards, the product in float64, the exponential race (or,
    with `forced`, the given tokens of each rollout)."""
    records = []
    for prompt_index, (prompt, answer) in enumerate(zip(prompts, answers)):
        plain_ids = tokenizer(prompt)["input_ids"]
        guide_ids = tokenizer(template.format(prompt=prompt, answer=answer))["input_ids"]
        for g in range(generations):
            rollout = prompt_index * generations + g
            tokens, logq, plain_lp, guide_lp = [], [], [], []
            for position in range(max_new_tokens):
                with torch.no_grad():
                    plain_logits = model(torch.tensor([plain_ids + tokens])).logits[0, -1].double()
                    guide_logits = model(torch.tensor([guide_ids + tokens])).logits[0, -1].double()
                mixed = lam * log_softmax64(plain_logits) + (1 - lam) * log_softmax64(guide_logits)
                if temperature == 0:
                    token = int(mixed.argmax()) if forced is None else forced[rollout][position]
                    logq.append(0.0)
                else:
                    q = torch.log_softmax(mixed / temperature, dim=-1)
                    keys = row_keys(torch.tensor([seed]), torch.tensor([rollout]), torch.tensor([position]))
                    noise = exponential_noise(keys.unsqueeze(1), torch.arange(len(q)).unsqueeze(0))[0].double()
                    token = int((q - noise.log()).argmax()) if forced is None else forced[rollout][position]
                    logq.append(float(q[token]))
                t = temperature or 1.0
                plain_lp.append(float(torch.log_softmax(plain_logits / t, -1)[token]))
                guide_lp.append(float(torch.log_softmax(guide_logits / t, -1)[token]))
                tokens.append(token)
                if token in eos_ids:
                    break
            records.append((tokens, logq, plain_lp, guide_lp))
    return records


def assert_matches_brute_force(rollout, reference):
    for row, (tokens, logq, plain_lp, guide_lp) in enumerate(reference):
        length = int(rollout.completion_mask[row].sum())
        assert rollout.completion_ids[row, :length].tolist() == tokens
        for name, expected in (("logprobs", logq), ("plain_logprobs", plain_lp), ("guide_logprobs", guide_lp)):
            torch.testing.assert_close(getattr(rollout, name)[row, :length].double(), torch.tensor(expected, dtype=torch.float64), atol=FP32_TOL, rtol=FP32_TOL)


def eos_that_ends_some_rollouts(model, tokenizer, temperature, seed):
    """A token that the unconstrained rollouts emit early in some rows but not all: used as EOS."""
    free = guided_generate(model, tokenizer, PROMPTS, ANSWERS, lam=0.4, num_generations=2, max_new_tokens=10, temperature=temperature, seed=seed)
    for token in free.completion_ids[:, 2:6].flatten().tolist():
        rows_with = (free.completion_ids[:, :8] == token).any(dim=1)
        if 0 < int(rows_with.sum()) < len(rows_with):
            return token
    pytest.fail("no token ends only some rollouts; pick another seed")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_guided_generate_matches_brute_force(model, tokenizer, temperature):
    seed = 11
    eos = eos_that_ends_some_rollouts(model, tokenizer, temperature, seed)
    model = with_eos(model, eos)
    try:
        rollout = guided_generate(model, tokenizer, PROMPTS, ANSWERS, lam=0.4, num_generations=2, max_new_tokens=10, temperature=temperature, seed=seed)
        reference = brute_force(model, tokenizer, PROMPTS, ANSWERS, 0.4, 2, 10, temperature, seed, {eos, tokenizer.eos_token_id})
    finally:
        with_eos(model, tokenizer.eos_token_id)
    lengths = rollout.completion_mask.sum(1)
    assert lengths.min() < 10 and lengths.max() == 10, "the test must cover rows that end at EOS and rows that don't"
    assert_matches_brute_force(rollout, reference)


def test_a_hint_placed_first_shares_no_prefix_and_still_matches(llama, tokenizer):
    template = "Answer {answer}. {prompt}"
    rollout = guided_generate(llama, tokenizer, PROMPTS, ANSWERS, lam=0.5, num_generations=2, max_new_tokens=6, temperature=0.9, seed=2, hint_template=template)
    assert_matches_brute_force(rollout, brute_force(llama, tokenizer, PROMPTS, ANSWERS, 0.5, 2, 6, 0.9, 2, {tokenizer.eos_token_id}, template=template))


def test_processor_matches_brute_force_under_greedy(model, tokenizer):
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS, ANSWERS)
    plain = tokenizer.pad({"input_ids": plain_contexts}, return_tensors="pt")
    guide = tokenizer.pad({"input_ids": guide_contexts}, return_tensors="pt")
    processor = ProductLogitsProcessor(model, guide["input_ids"], guide["attention_mask"], lam=0.4, temperature=0)
    out = model.generate(**plain, logits_processor=[processor], do_sample=False, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    rollout = processor.rollout(out, plain["attention_mask"])
    assert rollout.prompt_ids == plain_contexts
    assert_matches_brute_force(rollout, brute_force(model, tokenizer, PROMPTS, ANSWERS, 0.4, 1, 8, 0.0, 0, {tokenizer.eos_token_id}))


def test_processor_records_match_brute_force_when_sampling(model, tokenizer):
    """num_return_sequences > 1 and generate's own temperature and top-p: records equal teacher forcing."""
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS, ANSWERS)
    plain = tokenizer.pad({"input_ids": plain_contexts}, return_tensors="pt")
    guide = tokenizer.pad({"input_ids": guide_contexts}, return_tensors="pt")
    processor = ProductLogitsProcessor(model, guide["input_ids"], guide["attention_mask"], lam=[0.3, 0.6, 1.0], temperature=0.8)
    torch.manual_seed(5)
    out = model.generate(**plain, logits_processor=[processor], do_sample=True, temperature=0.8, top_k=0, max_new_tokens=8, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    rollout = processor.rollout(out, plain["attention_mask"])
    assert rollout.lam.tolist() == pytest.approx([0.3, 0.3, 0.6, 0.6, 1.0, 1.0])
    for row, group in enumerate(rollout.group_ids.tolist()):
        forced = [rollout.completion_lists()[row]]
        reference = brute_force(model, tokenizer, [PROMPTS[group]], [ANSWERS[group]], float(rollout.lam[row]), 1, 8, 0.8, 0, {tokenizer.eos_token_id}, forced)
        (tokens, logq, plain_lp, guide_lp), = reference
        length = len(tokens)
        for name, expected in (("logprobs", logq), ("plain_logprobs", plain_lp), ("guide_logprobs", guide_lp)):
            torch.testing.assert_close(getattr(rollout, name)[row, :length].double(), torch.tensor(expected, dtype=torch.float64), atol=FP32_TOL, rtol=FP32_TOL)


def test_score_equals_what_sampling_recorded(model, tokenizer):
    filters = dict(temperature=0.7, top_k=20, top_p=0.9)
    lam = [0.2, 1.0, 0.7]
    rollout = guided_generate(model, tokenizer, PROMPTS, ANSWERS, lam=lam, num_generations=3, max_new_tokens=9, seed=4, **filters)
    rows = rollout.group_ids.tolist()
    scored = score(model, tokenizer, [PROMPTS[i] for i in rows], [ANSWERS[i] for i in rows], rollout.completion_lists(), lam=rollout.lam, **filters)
    assert torch.equal(scored.completion_mask, rollout.completion_mask)
    for name in ("logprobs", "plain_logprobs", "guide_logprobs"):
        torch.testing.assert_close(getattr(scored, name), getattr(rollout, name), atol=FP32_TOL, rtol=FP32_TOL)


def test_a_guided_prefix_is_drawn_at_lam_zero_and_recorded_exactly(model, tokenizer):
    """guide_prefix_tokens = k: a guided rollout's first k tokens come from the hinted context alone (log q =
    its tempered log π there), the rest at the rollout's λ; λ = 1 rollouts stay plain. Teacher-forced `score`
    with the same settings reproduces every record."""
    k = 3
    settings = SamplingSettings(lam=[0.6, 1.0, 0.3], num_generations=2, max_new_tokens=8, temperature=1.0, seed=5,
                                guide_prefix_tokens=k)
    rollout = guided_generate(model, tokenizer, PROMPTS, ANSWERS, settings)
    rows = rollout.group_ids.tolist()
    scored = score(model, tokenizer, [PROMPTS[i] for i in rows], [ANSWERS[i] for i in rows],
                   rollout.completion_lists(), settings, lam=rollout.lam)
    for name in ("logprobs", "plain_logprobs", "guide_logprobs"):
        torch.testing.assert_close(getattr(scored, name), getattr(rollout, name), atol=FP32_TOL, rtol=FP32_TOL)
    mask, guided = rollout.completion_mask, rollout.guided
    prefix = mask.clone()
    prefix[:, k:] = False
    torch.testing.assert_close(rollout.logprobs[prefix & guided[:, None]], rollout.guide_logprobs[prefix & guided[:, None]])
    torch.testing.assert_close(rollout.logprobs[~guided[:, None] & mask], rollout.plain_logprobs[~guided[:, None] & mask])
    after = mask & guided[:, None]
    after[:, :k] = False
    assert after.any() and (rollout.logprobs[after] - rollout.guide_logprobs[after]).abs().max() > 1e-3  # λ again
    without = score(model, tokenizer, [PROMPTS[i] for i in rows], [ANSWERS[i] for i in rows],
                    rollout.completion_lists(), settings, lam=rollout.lam, guide_prefix_tokens=0)
    assert (without.logprobs[prefix & guided[:, None]] - rollout.logprobs[prefix & guided[:, None]]).abs().max() > 1e-3


def test_seeded_generation_reproduces(llama, tokenizer):
    first = guided_generate(llama, tokenizer, PROMPTS, ANSWERS, lam=0.5, num_generations=4, max_new_tokens=8, seed=3)
    again = guided_generate(llama, tokenizer, PROMPTS, ANSWERS, lam=0.5, num_generations=4, max_new_tokens=8, seed=3)
    other = guided_generate(llama, tokenizer, PROMPTS, ANSWERS, lam=0.5, num_generations=4, max_new_tokens=8, seed=4)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


@pytest.mark.slow
def test_processor_and_guided_generate_draw_from_the_same_distribution(llama, tokenizer):
    """Two-sample chi-square on the first two tokens: generate's multinomial vs keyed noise."""
    draws, temperature, lam = 3000, 1.3, 0.5
    prompt, answer = ["Add 3 and 4"], ["7"]
    fast = guided_generate(llama, tokenizer, prompt, answer, lam=lam, num_generations=draws, max_new_tokens=2, temperature=temperature, seed=21)
    plain_contexts, guide_contexts = build_contexts(tokenizer, prompt, answer)
    processor = ProductLogitsProcessor(llama, torch.tensor(guide_contexts), lam=lam, temperature=temperature)
    torch.manual_seed(0)
    out = llama.generate(torch.tensor(plain_contexts), attention_mask=torch.ones(1, len(plain_contexts[0]), dtype=torch.long), logits_processor=[processor], do_sample=True, temperature=temperature, top_k=0, max_new_tokens=2, num_return_sequences=draws, output_scores=True, return_dict_in_generate=True)
    drop_in = processor.rollout(out)
    for step in (0, 1):
        a, b = fast.completion_ids[:, step], drop_in.completion_ids[:, step]
        tokens = sorted(set(a.tolist()) | set(b.tolist()))
        table = torch.tensor([[int((x == t).sum()) for t in tokens] for x in (a, b)])
        table = table[:, table.sum(0) >= 10]  # chi-square needs populated cells; rare tokens pooled out
        assert chi2_contingency(table.numpy()).pvalue > 1e-3
    # And each path's log q is its own distribution's: scoring both with the core gives the records.
    scored = score(llama, tokenizer, prompt * draws, answer * draws, drop_in.completion_lists(), lam=lam, temperature=temperature)
    torch.testing.assert_close(scored.logprobs, drop_in.logprobs, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("lam, context", [(1.0, "plain"), (0.0, "guide")])
def test_lam_one_and_zero_reproduce_generate_on_that_context(model, tokenizer, lam, context):
    """λ = 1 is plain `generate` on the prompts, λ = 0 is `generate` on the hinted prompts (greedy)."""
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS, ANSWERS)
    inputs = tokenizer.pad({"input_ids": plain_contexts if context == "plain" else guide_contexts}, return_tensors="pt")
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=10)[:, inputs["input_ids"].shape[1] :]
    rollout = guided_generate(model, tokenizer, PROMPTS, ANSWERS, lam=lam, max_new_tokens=10, temperature=0)
    assert rollout.completion_ids.tolist() == expected.tolist()
    assert rollout.guided.tolist() == [lam < 1] * len(PROMPTS)


def test_lam_one_rows_never_reach_the_guide_forward(llama, tokenizer):
    rows_per_call = []
    handle = llama.model.register_forward_pre_hook(lambda module, args, kwargs: rows_per_call.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        guided_generate(llama, tokenizer, PROMPTS[:2], ANSWERS[:2], lam=[1.0, 0.5], num_generations=2, max_new_tokens=3, temperature=0)
        mixed_calls = list(rows_per_call)
        rows_per_call.clear()
        guided_generate(llama, tokenizer, PROMPTS[:2], ANSWERS[:2], lam=1.0, num_generations=2, max_new_tokens=3, temperature=0)
        plain_calls = list(rows_per_call)
    finally:
        handle.remove()
    # Prefill: the 2 prompts' shared prefixes, then 2 plain + 1 guide context; decode: 4 plain rows + 2 guide
    # rows (prompt 0 is λ = 1).
    assert mixed_calls == [2, 3, 6, 6]
    assert plain_calls == [2, 2, 4, 4]


def test_chat_prompts_share_their_prefix(llama, tokenizer):
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    plain, guide = build_contexts(tokenizer, chat, ANSWERS)
    for plain_ids, guide_ids in zip(plain, guide):
        shared = next(i for i, (a, b) in enumerate(zip(plain_ids, guide_ids)) if a != b)
        assert shared >= len(plain_ids) - 2, "the hint must follow the question"
    rollout = guided_generate(llama, tokenizer, chat, ANSWERS, lam=0.5, max_new_tokens=4, seed=0)
    assert rollout.prompt_ids == plain


def test_processor_refuses_a_temperature_it_was_not_told(llama, tokenizer):
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS[:1], ANSWERS[:1])
    processor = ProductLogitsProcessor(llama, torch.tensor(guide_contexts), lam=0.5, temperature=1.0)
    out = llama.generate(torch.tensor(plain_contexts), logits_processor=[processor], do_sample=True, temperature=0.5, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="temperature"):
        processor.rollout(out)


def greedy_generate_with(model, input_ids, processor, max_new_tokens=4):
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), logits_processor=[processor],
                          do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                          return_dict_in_generate=True)


def test_a_processor_reused_for_another_generate_call_is_refused(llama, tokenizer):
    """The cache-reuse bug: a second generate call whose prompts are as wide as the first call's output
    continued the first call's guide cache silently (at λ = 0, greedy, other tokens than a fresh processor)."""
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS[:1], ANSWERS[:1])
    first, guide = torch.tensor(plain_contexts), torch.tensor(guide_contexts)
    processor = ProductLogitsProcessor(llama, guide, lam=0.0, temperature=0)
    out = greedy_generate_with(llama, first, processor)
    second = torch.cat([first, first[:, :4]], dim=1)  # as wide as the first call's output, other tokens
    assert second.shape == out.sequences.shape and not torch.equal(second, out.sequences)
    with pytest.raises(RuntimeError, match="serves one generate call"):
        greedy_generate_with(llama, second, processor)


def test_reset_readies_a_processor_for_its_next_generate_call(llama, tokenizer):
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS[:1], ANSWERS[:1])
    first, guide = torch.tensor(plain_contexts), torch.tensor(guide_contexts)
    reused = ProductLogitsProcessor(llama, guide, lam=0.0, temperature=0)
    reused.rollout(greedy_generate_with(llama, first, reused))
    second = torch.cat([first, first[:, :4]], dim=1)
    with pytest.raises(RuntimeError, match="reset"):  # a processor whose records were read out is finished
        greedy_generate_with(llama, second, reused)
    reused.reset()
    again = greedy_generate_with(llama, second, reused)
    fresh = ProductLogitsProcessor(llama, guide, lam=0.0, temperature=0)
    expected = greedy_generate_with(llama, second, fresh)
    assert torch.equal(again.sequences, expected.sequences)
    # λ = 0, greedy: whatever the plain prompt, the completion is greedy decoding of the hinted prompt.
    on_guide = llama.generate(guide, attention_mask=torch.ones_like(guide), do_sample=False, max_new_tokens=4)
    assert again.sequences[:, second.shape[1] :].tolist() == on_guide[:, guide.shape[1] :].tolist()
    assert reused.rollout(again).completion_ids.tolist() == fresh.rollout(expected).completion_ids.tolist()


def test_rollout_refuses_the_outputs_of_a_call_the_processor_did_not_follow(llama, tokenizer):
    """Generating again on the first call's output, without a reset, continues the first call (the inputs are
    those of its next step); that call's outputs hold only its own steps, which rollout refuses to mix up."""
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS[:1], ANSWERS[:1])
    processor = ProductLogitsProcessor(llama, torch.tensor(guide_contexts), lam=0.5, temperature=0)
    out = greedy_generate_with(llama, torch.tensor(plain_contexts), processor)
    continued = greedy_generate_with(llama, out.sequences, processor)
    with pytest.raises(ValueError, match="not the outputs of the generate call"):
        processor.rollout(continued)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS[:2], lam=0.5, max_new_tokens=2), "one answer per prompt"),
        (lambda m, t: guided_generate(m, t, PROMPTS, None, lam=0.5, max_new_tokens=2), "one answer per prompt"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ["19", "", "81"], lam=0.5, max_new_tokens=2), r"answers\[1\] is missing"),
        (lambda m, t: guided_generate(m, t, ["ok", "  "], ["1", "2"], lam=0.5, max_new_tokens=2), r"prompts\[1\] is empty"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, lam=[0.5, 0.5], max_new_tokens=2), "one value per prompt"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, lam=1.5, max_new_tokens=2), r"lam must lie in \[0, 1\]"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, lam=0.5, max_new_tokens=0), "max_new_tokens"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2, temperature=-1), "temperature"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, lam=0.5, num_generations=True), "num_generations must be a positive integer"),
        (lambda m, t: guided_generate(m, t, PROMPTS, ANSWERS, max_new_tokens=2), "lam is required"),
        (lambda m, t: score(m, t, PROMPTS, ANSWERS, [[5], []], lam=0.5), "one entry per prompt"),
        (lambda m, t: score(m, t, PROMPTS[:2], ANSWERS[:2], [[5], []], lam=0.5), r"completions\[1\] is empty"),
        (lambda m, t: ProductLogitsProcessor(m, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4)), "shape of guide_input_ids"),
    ],
)
def test_bad_input(llama, tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(llama, tokenizer)


def test_guide_batch_must_match_the_plain_batch(llama, tokenizer):
    plain_contexts, guide_contexts = build_contexts(tokenizer, PROMPTS[:1], ANSWERS[:1])
    processor = ProductLogitsProcessor(llama, torch.tensor(guide_contexts * 2), lam=0.5)
    with pytest.raises(ValueError, match="one guide prompt per plain prompt"):
        llama.generate(torch.tensor(plain_contexts * 3), logits_processor=[processor], max_new_tokens=2)


def test_tokenizer_that_does_not_match_the_model(tokenizer):
    small = tiny_model(tokenizer, arch="llama", seed=0)
    small.resize_token_embeddings(len(tokenizer) - 10)
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        guided_generate(small, tokenizer, PROMPTS, ANSWERS, lam=0.5, max_new_tokens=2)
