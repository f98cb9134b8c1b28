"""prodsample on a real vLLM CPU engine (V1 runner): tiny fp32 Llama, eager mode, engines shared per session.

- `guided`: GuidedLLM with its default settings. Same tokens as `prodsample.hf.guided_generate`, records
  equal to `prodsample.hf.score`, a chi-square test that the draws follow q, untagged requests untouched.
- `stressed`: vLLM's own scheduler, a KV cache of a few blocks and a prefill budget smaller than the
  prompts, every pair submitted at once (no pacing), and a read-only observer (tests/helpers/vllm_observer.py)
  logging where each request stands at every step. Preemptions and prefill chunks happen; every rollout the
  observer saw fall out of step is flagged, no other, and every recorded log-prob is what was drawn.
- `paired_stressed`: the same small KV cache under prodsample's scheduler (GuidedLLM's default): preemptions
  happen, and no pair falls out of step.
"""

import time

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from prodsample.testing import save_tiny  # noqa: E402
from prodsample.hf import build_contexts, guided_generate  # noqa: E402
from prodsample.vllm.pacing import AdmitAll, PacedDriver  # noqa: E402
from prodsample.vllm.pairing import GuidanceTag, Role  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.vllm import GuidedLLM, build_engine  # noqa: E402

from .helpers import vllm_observer  # noqa: E402
from .helpers.reference import chi_square_pvalue, product_distribution  # noqa: E402
from .helpers.rollouts import TOL, per_rollout, records_match_score  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # two engines for the session: seconds to build, more to stop

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


def test_a_guided_prefix_gives_the_hf_paths_tokens_and_exact_records(guided, hf):
    """guide_prefix_tokens = 3 on the engine: the first 3 tokens of each guided rollout at λ = 0, the rest at
    its λ; same tokens as guided_generate, records equal to teacher-forced score with the same settings."""
    model, tokenizer = hf
    settings = SamplingSettings(lam=LAMS, num_generations=4, max_new_tokens=12, seed=2, temperature=1.0,
                                guide_prefix_tokens=3)
    got = guided.generate(PROMPTS, ANSWERS, settings)
    want = guided_generate(model, tokenizer, PROMPTS, ANSWERS, settings)
    assert not got.desynced.any() and torch.equal(got.guided, want.guided)
    same = (got.completion_ids == want.completion_ids) & want.completion_mask
    assert float(same.sum() / want.completion_mask.sum()) >= 0.99
    prompts, answers = per_rollout(PROMPTS, 4), per_rollout(ANSWERS, 4)
    assert records_match_score(got, hf, prompts, answers, guide_prefix_tokens=3) <= TOL
    prefix = got.completion_mask[:, :3] & got.guided[:, None]
    torch.testing.assert_close(got.logprobs[:, :3][prefix], got.guide_logprobs[:, :3][prefix], atol=TOL, rtol=0)


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
    assert isinstance(again.driver, AdmitAll), "the engine runs prodsample's scheduler: everything is added at once"
    a = guided.generate(PROMPTS[:3], ANSWERS[:3], lam=0.5, num_generations=4, max_new_tokens=12, seed=3)
    b = again.generate(PROMPTS[:3], ANSWERS[:3], lam=0.5, num_generations=4, max_new_tokens=12, seed=3)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    with pytest.raises(ValueError, match="only apply when GuidedLLM builds the engine"):
        GuidedLLM(guided.llm, dtype="float32")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lam=1.5), "lam must lie in"),
        (dict(lam=[0.5, 0.5]), "lam must be a float, one value per prompt"),
        (dict(top_p=0.0), "top_p must lie in"),
        (dict(temperature=-1.0), "temperature must lie in"),
        (dict(top_k=-3), "top_k must be an integer >= 0"),
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
    tag = GuidanceTag(rollout="x", role=Role.PLAIN, rollout_index=0, seed=0, release_token=2,
                      settings=SamplingSettings(lam=0.5))
    with pytest.raises(VLLMValidationError, match="presence_penalty"):
        guided.llm.generate([{"prompt_token_ids": [1, 5, 6]}],
                            SamplingParams(presence_penalty=0.5, extra_args=tag.to_extra_args()), use_tqdm=False)


# -- desync: forced, observed, flagged -----------------------------------------------------------------------


class Unpaced(PacedDriver):
    """Submits every rollout at once, as a naive client would: the engine then preempts and chunks."""

    def admit(self, waiting, running, limits):
        return len(waiting)


SMALL_CACHE = dict(max_model_len=256, block_size=32, num_gpu_blocks_override=24, disable_log_stats=False,
                   logits_processors=["tests.helpers.vllm_observer:StepObserver"])


@pytest.fixture(scope="session")
def stressed(model_dir):
    llm = build_engine(model_dir, max_num_batched_tokens=96, scheduler_cls=None, **SMALL_CACHE, **ENGINE)
    assert type(GuidedLLM(llm).driver) is PacedDriver, "vLLM's own scheduler: the driver paces"
    return GuidedLLM(llm, driver=Unpaced())


@pytest.fixture(scope="session")
def paired_stressed(model_dir):
    timeout = {"prodsample": {"pair_timeout_s": 5}}
    engine = build_engine(model_dir, max_num_batched_tokens=256, additional_config=timeout, **SMALL_CACHE, **ENGINE)
    return GuidedLLM(engine)


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
                     "--max-new-tokens", "4", "--rounds", "2", "--desync-prompts", "2", "--desync-generations", "3",
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
    assert summary["desync"]["pairs"] == 6, "desync pairs = --desync-prompts × --desync-generations"
    assert summary["load_average_1min"]["max_during"] >= 0
    assert summary["command"].startswith("prodsample vllm --model tiny") and summary["git"]["revision"]
    assert (out / "runs.csv").read_text().startswith("round,kind,batch,")


def test_the_pair_scheduler_keeps_pairs_in_step_through_preemptions(paired_stressed, hf):
    """The load that desyncs pairs under vLLM's scheduler (`test_preemptions_are_detected...`), all added at
    once: prodsample's scheduler preempts and resumes whole pairs, and no rollout falls out of step."""
    prompts, answers, generations = PROMPTS[:6], ANSWERS[:6], 4
    before = preemptions(paired_stressed.llm)
    rollout, observed, _ = observe(paired_stressed, prompts, answers, lam=0.5, num_generations=generations,
                                   max_new_tokens=48, seed=7, temperature=1.0)
    assert preemptions(paired_stressed.llm) > before, "the small KV cache forced preemptions"
    assert not observed.any() and not rollout.desynced.any() and bool(rollout.guided.all())
    assert paired_stressed.last_stats.desynced == 0
    assert records_match_score(rollout, hf, per_rollout(prompts, generations), per_rollout(answers, generations)) <= TOL


def test_a_pair_one_step_cannot_prefill_is_refused(paired_stressed):
    """Guide and plain prompts of about 220 tokens each against a budget of 256 tokens a step: GuidedLLM
    refuses before sending; sent anyway, the engine's scheduler refuses it."""
    long_prompt = "x" * 200  # the tokenizer is character-level
    with pytest.raises(ValueError, match="max_num_batched_tokens = 256"):
        paired_stressed.generate([long_prompt], ["1"], lam=0.5, max_new_tokens=4)
    unchecked = GuidedLLM(paired_stressed.llm, driver=Unpaced())
    with pytest.raises(RuntimeError, match="finish reason 'error'"):
        unchecked.generate([long_prompt], ["1"], lam=0.5, max_new_tokens=4)
    again = paired_stressed.generate(PROMPTS[:2], ANSWERS[:2], lam=0.5, max_new_tokens=4, seed=0)
    assert again.guided.all(), "the engine serves the next call"


def test_a_lone_request_waits_for_its_partner_then_runs_alone_flagged(paired_stressed):
    """The engine steps while the first request of a pair waits (empty steps), and runs it alone once the
    pair timeout (5 s here) has passed; the pairing records its rollout as lost at position 0."""
    llm, tokenizer = paired_stressed.llm, paired_stressed.tokenizer
    tag = GuidanceTag(rollout="lone", role=Role.PLAIN, rollout_index=0, seed=0,
                      release_token=tokenizer.eos_token_id, settings=SamplingSettings(lam=0.5))
    params = SamplingParams(max_tokens=4, temperature=0.0, extra_args=tag.to_extra_args())
    added = time.monotonic()
    llm.llm_engine.add_request("lone-plain", {"prompt_token_ids": tokenizer("9*9=")["input_ids"]}, params)
    held = [llm.llm_engine.step() for _ in range(3)]
    assert time.monotonic() - added < 5 and all(not outputs for outputs in held), "held while within the timeout"
    time.sleep(max(0.0, 5.2 - (time.monotonic() - added)))
    finished = []
    while llm.llm_engine.has_unfinished_requests():
        finished += [output for output in llm.llm_engine.step() if output.finished]
    assert [output.request_id for output in finished] == ["lone-plain"]
    record = paired_stressed._take(["lone"])["lone"]
    assert (record.lost_at, record.cause) == (0, "partner_absent")
