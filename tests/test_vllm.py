"""prodsample on a real vLLM CPU engine (V1 runner): tiny fp32 Llama, eager mode, engines shared per session.

- `guided`: GuidedLLM with its default settings. Same tokens as `prodsample.hf.guided_generate`, records
  equal to `prodsample.hf.score`, a chi-square test that the draws follow q, untagged requests untouched.
- `stressed`: a KV cache of a few blocks and a prefill budget smaller than the prompts, every pair
  submitted at once (no pacing), and a read-only observer (tests/vllm_observer.py) logging where each
  request stands at every step. Preemptions and prefill chunks happen; every rollout the observer saw fall
  out of step is flagged, no other, and every recorded log-prob is what was drawn.
"""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from prodsample.benchmarks.tiny import save_tiny  # noqa: E402
from prodsample.hf import build_contexts, guided_generate, score  # noqa: E402
from prodsample.pacing import PacedDriver  # noqa: E402
from prodsample.pairing import GuidanceTag, Role  # noqa: E402
from prodsample.vllm import GuidedLLM, build_engine  # noqa: E402

from . import vllm_observer  # noqa: E402
from .reference import chi_square_pvalue, product_distribution  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = [
    "What is 12+7?",
    "Add 3 and 4",
    "9*9=",
    "A train leaves at 3pm and arrives at 5pm. How long is the trip?",
    "Name a prime number larger than 10 and smaller than 14.",
    "Compute 100 - 58",
    "What is the capital of France? Answer in one word.",
    "2^5 =",
]
ANSWERS = ["19", "7", "81", "2 hours", "11 or 13", "42", "Paris", "32"]
LAMS = [0.5, 0.0, 0.3, 1.0, 0.8, 0.5, 0.2, 0.6]  # per prompt; 0 and 1 included
TOL = 2e-4  # fp32 logits of two engines (vLLM's CPU kernels vs transformers')
ENGINE = dict(dtype="float32", enforce_eager=True, seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for the tiny model's default head_dim of 16
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1, heads=2)


@pytest.fixture(scope="session")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def guided(model_dir):
    return GuidedLLM(model_dir, max_model_len=256, **ENGINE)


def records_match_score(rollout, hf, prompts, answers, *, temperature=1.0, top_k=None, top_p=None):
    """Recorded log-probs equal teacher-forced ones: λ's q up to the first position whose guide log-prob is
    NaN (where the rollout lost its guide context), π at λ = 1 from there. Returns the largest error."""
    model, tokenizer = hf
    completions = rollout.completion_lists()
    lams = rollout.lam.tolist()
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    with_lam = score(model, tokenizer, prompts, answers, completions, lam=lams, **filters)
    on_policy = score(model, tokenizer, prompts, answers, completions, lam=1.0, **filters)
    worst = 0.0
    for r, completion in enumerate(completions):
        guide = rollout.guide_logprobs[r, : len(completion)]
        lost = int(torch.isnan(guide).nonzero()[0]) if torch.isnan(guide).any() else len(completion)
        assert bool(torch.isnan(guide[lost:]).all()), "guide log-probs are NaN from the loss on"
        assert lost == len(completion) or rollout.desynced[r], "a rollout that lost its guide context is flagged"
        expected = torch.cat([with_lam.logprobs[r, :lost], on_policy.logprobs[r, lost : len(completion)]])
        pairs = [
            (rollout.logprobs[r, : len(completion)], expected),
            (rollout.plain_logprobs[r, : len(completion)], with_lam.plain_logprobs[r, : len(completion)]),
            (guide[:lost], with_lam.guide_logprobs[r, :lost]),
        ]
        for got, want in pairs:
            both_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
            errors = torch.where(both_inf, 0.0, (got - want).abs())
            worst = max([worst, *errors.tolist()])
    return worst


def per_rollout(values, generations):
    return [v for v in values for _ in range(generations)]


# -- agreement with the HF path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.95)],
    ids=["greedy", "sampled"],
)
def test_same_tokens_and_records_as_the_hf_path(guided, hf, sampling):
    generations, max_new_tokens, seed = 25, 20, 11
    model, tokenizer = hf
    got = guided.generate(PROMPTS, ANSWERS, lam=LAMS, num_generations=generations, max_new_tokens=max_new_tokens,
                          seed=seed, **sampling)
    want = guided_generate(model, tokenizer, PROMPTS, ANSWERS, lam=LAMS, num_generations=generations,
                           max_new_tokens=max_new_tokens, seed=seed, **sampling)
    assert len(got) == len(want) == 200
    assert guided.last_stats.desynced == 0 and not got.desynced.any()
    assert torch.equal(got.guided, want.guided) and torch.equal(got.lam, want.lam)
    assert torch.equal(got.group_ids, want.group_ids) and got.prompt_ids == want.prompt_ids
    same = (got.completion_ids == want.completion_ids) & want.completion_mask
    assert float(same.sum() / want.completion_mask.sum()) >= 0.99
    assert float((got.completion_mask == want.completion_mask).float().mean()) >= 0.99
    prompts, answers = per_rollout(PROMPTS, generations), per_rollout(ANSWERS, generations)
    assert records_match_score(got, hf, prompts, answers, **sampling) <= TOL


def test_draws_follow_q_over_two_tokens(guided, hf):
    """Chi-square goodness of fit of the first two tokens against q computed in float64 from the model's
    logits, with a negative control: the same draws against the plain policy are rejected."""
    model, tokenizer = hf
    prompt, answer, lam, top_k, draws = "9*9=", "81", 0.3, 3, 900
    got = guided.generate([prompt], [answer], lam=lam, num_generations=draws, max_new_tokens=2, seed=5, top_k=top_k)
    assert got.completion_mask[:, :2].all(), "no EOS within two tokens for this prompt"
    (plain_ids,), (guide_ids,) = build_contexts(tokenizer, [prompt], [answer])

    def next_logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].double()

    def two_token_table(lam_value):
        first = product_distribution(next_logits(plain_ids), next_logits(guide_ids), lam_value, top_k=top_k)
        table = {}
        for token in first.nonzero().flatten().tolist():
            second = product_distribution(
                next_logits(plain_ids + [token]), next_logits(guide_ids + [token]), lam_value, top_k=top_k
            )
            for other in second.nonzero().flatten().tolist():
                table[(token, other)] = float(first[token] * second[other])
        return table

    counts = {}
    for row in got.completion_ids[:, :2].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1

    def pvalue(table):
        cells = sorted(set(table) | set(counts))
        return chi_square_pvalue([counts.get(c, 0) for c in cells], [table.get(c, 0.0) for c in cells])

    assert pvalue(two_token_table(lam)) > 1e-3
    assert pvalue(two_token_table(1.0)) < 1e-6, "negative control: the plain policy is a different distribution"


def test_untagged_requests_pass_through(guided, hf):
    """The processor is loaded into every engine of the environment: plain requests must be untouched."""
    model, tokenizer = hf
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = guided.llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(temperature=0.0, max_tokens=16),
                                  use_tqdm=False)
    same = total = 0
    for prompt_ids, output in zip(ids, outputs):
        reference = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=16,
                                   eos_token_id=tokenizer.eos_token_id)[0, len(prompt_ids):].tolist()
        mine = list(output.outputs[0].token_ids)
        same += sum(a == b for a, b in zip(reference, mine))
        total += max(len(reference), len(mine))
    assert same / total >= 0.99


def test_wrapping_an_existing_engine_gives_the_same_rollouts(guided):
    again = GuidedLLM(guided.llm)
    a = guided.generate(PROMPTS[:3], ANSWERS[:3], lam=0.5, num_generations=4, max_new_tokens=12, seed=3)
    b = again.generate(PROMPTS[:3], ANSWERS[:3], lam=0.5, num_generations=4, max_new_tokens=12, seed=3)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ValueError, match="only apply when GuidedLLM builds the engine"):
        GuidedLLM(guided.llm, dtype="float32")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lam=1.5), "lam must lie in"),
        (dict(lam=[0.5, 0.5]), "lam must be a float, one per prompt"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(temperature=-1.0), "temperature must lie in"),
        (dict(top_k=-3), "top_k must be an integer"),
        (dict(num_generations=0), "num_generations must be a positive integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_arguments_fail_before_reaching_the_engine(guided, kwargs, message):
    call = dict(lam=0.5, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        guided.generate(PROMPTS[:3], ANSWERS[:3], **call)


def test_bad_prompts_and_answers(guided):
    with pytest.raises(ValueError, match="answers must be a list"):
        guided.generate(PROMPTS[:2], ANSWERS[:1], lam=0.5, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        guided.generate(["a", ""], ["1", "2"], lam=0.5, max_new_tokens=4)


def test_the_engine_rejects_tagged_requests_with_interfering_settings(guided):
    tag = GuidanceTag.checked(rollout="x", role=Role.PLAIN, rollout_index=0, seed=0, lam=0.5, temperature=1.0,
                              release_token=2)
    with pytest.raises(VLLMValidationError, match="presence_penalty"):
        guided.llm.generate([{"prompt_token_ids": [1, 5, 6]}],
                            SamplingParams(presence_penalty=0.5, extra_args=tag.to_extra_args()), use_tqdm=False)


# -- desync: forced, observed, flagged -----------------------------------------------------------------------


class Unpaced(PacedDriver):
    """Submits every rollout at once, as a naive client would: the engine then preempts and chunks."""

    def admit(self, waiting, running, limits):
        return len(waiting)


@pytest.fixture(scope="session")
def stressed(model_dir):
    llm = build_engine(
        model_dir, max_model_len=256, block_size=32, num_gpu_blocks_override=24, max_num_batched_tokens=96,
        logits_processors=["tests.vllm_observer:StepObserver"], disable_log_stats=False, **ENGINE,
    )
    return GuidedLLM(llm, driver=Unpaced())


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def observe(stressed, prompts, answers, **kwargs):
    vllm_observer.LOG.__init__()
    rollout = stressed.generate(prompts, answers, **kwargs)
    log = vllm_observer.LOG
    names = sorted({rollout_name for rollout_name, _ in log.outputs}, key=lambda name: int(name.rsplit("-", 1)[1]))
    assert len(names) == len(rollout), "the observer saw every rollout (all have λ < 1 here)"
    observed = torch.tensor([not log.in_step(name) for name in names])
    return rollout, observed, log


def test_preemptions_are_detected_flagged_and_recorded_exactly(stressed, hf):
    prompts, answers, generations = PROMPTS[:6], ANSWERS[:6], 4
    before = preemptions(stressed.llm)
    rollout, observed, _ = observe(stressed, prompts, answers, lam=0.5, num_generations=generations,
                                   max_new_tokens=48, seed=7, temperature=1.0)
    assert preemptions(stressed.llm) > before, "the small KV cache forced preemptions"
    assert torch.equal(rollout.desynced, observed), "flagged exactly the rollouts seen out of step"
    assert 0 < int(rollout.desynced.sum()) < len(rollout)
    assert not (rollout.guided & rollout.desynced).any()
    assert stressed.last_stats.desynced == int(observed.sum())
    assert records_match_score(rollout, hf, per_rollout(prompts, generations), per_rollout(answers, generations)) <= TOL


def test_prefill_chunks_are_detected_flagged_and_recorded_exactly(stressed, hf):
    # prompts longer than the prefill budget (96 tokens: the tokenizer is character-level) are chunked
    prompts = [p * 3 for p in PROMPTS[3:7]]
    answers, generations = ANSWERS[3:7], 3
    rollout, observed, log = observe(stressed, prompts, answers, lam=0.4, num_generations=generations,
                                     max_new_tokens=12, seed=8, temperature=0.8)
    assert log.repeated_positions() > 0, "the prefill budget split prompts over steps"
    assert torch.equal(rollout.desynced, observed)
    assert int(rollout.desynced.sum()) > 0
    assert stressed.last_stats.desynced == int(observed.sum())
    records = records_match_score(rollout, hf, per_rollout(prompts, generations), per_rollout(answers, generations),
                                  temperature=0.8)
    assert records <= TOL


def test_benchmark_command_at_toy_size(tmp_path):
    """`prodsample vllm` end to end on the tiny model: a warm-up round apart, then alternating rounds of every
    kind at every batch size, the ratios per batch size with the 2B-plain floor, the load, the desyncs."""
    import json

    from prodsample import cli

    out = tmp_path / "vllm-tiny"
    assert cli.main(["vllm", "--model", "tiny", "--dtype", "float32", "--batch-sizes", "2", "4", "--generations", "2",
                     "--max-new-tokens", "4", "--rounds", "2", "--desync-prompts", "2", "--desync-generations", "2",
                     "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    kinds = {"plain", "plain_2b", "guided", "guided_lam1"}
    timed = [(run["round"], run["kind"], run["batch"]) for run in summary["runs"] if run["round"] is not None]
    assert sorted(timed) == sorted((r, k, b) for r in (0, 1) for k in kinds for b in (2, 4))
    assert {(entry["kind"], entry["batch"]) for entry in summary["warmup"]} == {(k, b) for k in kinds for b in (2, 4)}
    assert [run["kind"] for run in summary["runs"] if run["round"] == 0 and run["batch"] == 2] != \
        [run["kind"] for run in summary["runs"] if run["round"] == 1 and run["batch"] == 2], "the order alternates"
    for batch in ("2", "4"):
        ratios = summary["time_per_token_ratios"][batch]
        assert set(ratios) == {"guided_over_plain", "plain_2b_over_plain", "guided_over_plain_2b", "lam1_over_plain"}
        assert all(len(ratio["per_round"]) == 2 and ratio["median"] > 0 for ratio in ratios.values())
    plain_2b = [run for run in summary["runs"] if run["kind"] == "plain_2b" and run["batch"] == 4]
    assert all(run["requests"] == 8 for run in plain_2b), "2B plain runs both contexts' rows: 2 × 4 requests"
    assert summary["desync"]["pairs"] == 4 and summary["load_average_1min"]["max_during"] >= 0
    assert summary["command"].startswith("prodsample vllm --model tiny") and summary["git"]["revision"]
    assert (out / "runs.csv").read_text().startswith("round,kind,batch,")
