"""Server mode end to end on the CPU engine: real vLLM servers on 127.0.0.1 (tiny fp32 Llama, eager mode,
prodsample's worker extension), driven by prodsample's client from several threads at once.

- `paired`: prodsample's scheduler and middleware (records from its endpoint, no dev mode). 224 pairs of mixed
  prompt lengths from 4 client threads (3 blocking, 1 asyncio): no pair falls out of step, the tokens are
  `guided_generate`'s under the same keyed noise, and the records equal teacher-forced `score`.
- `stock`: vLLM's own scheduler, in dev mode (records through /collective_rpc), the same load: pairs fall out
  of step, and every rollout whose log q leaves λ's teacher-forced q is flagged, never reported as guided.

Both servers start together (startup dominates: one to two minutes on a loaded 2-core machine).
"""

import asyncio
import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
httpx = pytest.importorskip("httpx", reason="the client needs the server extra (httpx)")


from prodsample.benchmarks.vllm_server import in_threads  # noqa: E402
from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.vllm.client import AsyncGuidedClient, GuidedClient  # noqa: E402
from prodsample.vllm.guided_call import GuidedCall, request_sampling_params  # noqa: E402
from prodsample.vllm.routes import MIDDLEWARE  # noqa: E402
from prodsample.hf import guided_generate  # noqa: E402
from prodsample.vllm.pairing import DesyncCause  # noqa: E402
from prodsample.testing import LocalVllmServer  # noqa: E402
from prodsample.vllm.scheduler import SCHEDULER_CLS  # noqa: E402

from .helpers.rollouts import TOL, per_rollout, records_match_score  # noqa: E402
from .helpers.served_model import hf, model_dir  # noqa: E402, F401  (fixtures)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-batched-tokens", "1536",
                "--seed", "0", "--distributed-executor-backend", "uni",
                "--worker-extension-cls", "prodsample.vllm.processor.RecordsExtension"]
# Prompts of about 5 to 300 characters (the tokenizer is character-level), each with its answer.
PROMPTS = [
    "2^5 =",
    "9*9=",
    "Add 3 and 4",
    "What is 12+7?",
    "Compute 100 - 58",
    "A train leaves at 3pm and arrives at 5pm. How long is the trip?",
    "Name a prime number larger than 10 and smaller than 14.",
    "A farmer has 3 fields. " * 6 + "How many fields does the farmer have in all?",
    "Count the letters r in the word strawberry, then double it. " * 4 + "What is the result?",
]
ANSWERS = ["32", "81", "7", "19", "42", "2 hours", "11 or 13", "3", "6"]
THREADS, GENERATIONS, MAX_NEW_TOKENS = 4, 7, 12  # 4 threads x 8 prompts x 7 generations = 224 pairs
LAMS = [0.5, 0.2, 0.0, 0.7]  # per thread


def thread_load(t: int) -> dict:
    """Thread t's call: 8 of the 9 prompts (a different one left out per thread), its λ and seed."""
    keep = [i for i in range(len(PROMPTS)) if i != t]
    return dict(prompts=[PROMPTS[i] for i in keep], answers=[ANSWERS[i] for i in keep], lam=LAMS[t],
                num_generations=GENERATIONS, max_new_tokens=MAX_NEW_TOKENS, seed=100 + t, temperature=1.0)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("servers")
    middleware = [flag for name in MIDDLEWARE for flag in ("--middleware", name)]
    started = {
        "paired": LocalVllmServer(model_dir, [*SERVER_FLAGS, "--scheduler-cls", SCHEDULER_CLS, *middleware],
                                  log=logs / "paired.log"),
        "stock": LocalVllmServer(model_dir, SERVER_FLAGS, env={"VLLM_SERVER_DEV_MODE": "1"}, log=logs / "stock.log"),
    }
    try:
        for server in started.values():
            server.start()
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def run_load(url: str, tokenizer) -> list[tuple]:
    """Every thread's call at once; thread 0 through the asyncio client, the others blocking. Returns
    (call, rollout, stats) per thread."""

    def work(t: int) -> tuple:
        call = thread_load(t)
        prompts, answers = call.pop("prompts"), call.pop("answers")
        if t == 0:
            client = AsyncGuidedClient(url, tokenizer, max_concurrency=32)
            rollout = asyncio.run(client.generate(prompts, answers, **call))
        else:
            client = GuidedClient(url, tokenizer, max_concurrency=32)
            rollout = client.generate(prompts, answers, **call)
        return thread_load(t), rollout, client.last_stats

    return in_threads(THREADS, work)[1]


def test_a_guided_prefix_through_the_server_is_recorded_exactly(servers, hf):
    """guide_prefix_tokens travels in each request's tag: the engine draws a guided rollout's first tokens at
    λ = 0, and the records the server returns equal teacher-forced score with the same settings."""
    model, tokenizer = hf
    prompts, answers = PROMPTS[:3], ANSWERS[:3]
    settings = SamplingSettings(lam=0.5, num_generations=2, max_new_tokens=MAX_NEW_TOKENS, seed=9, guide_prefix_tokens=2)
    client = GuidedClient(servers["paired"], tokenizer)
    rollout = client.generate(prompts, answers, settings)
    assert not rollout.desynced.any() and bool(rollout.guided.all())
    want = guided_generate(model, tokenizer, prompts, answers, settings)
    same = (rollout.completion_ids == want.completion_ids) & want.completion_mask
    assert float(same.sum() / want.completion_mask.sum()) >= 0.99
    assert records_match_score(rollout, hf, per_rollout(prompts, 2), per_rollout(answers, 2), guide_prefix_tokens=2) <= TOL


def test_the_pair_scheduler_keeps_every_pair_of_a_concurrent_load_in_step(servers, hf):
    model, tokenizer = hf
    results = run_load(servers["paired"], tokenizer)
    assert sum(len(rollout) for _, rollout, _ in results) == 224
    for call, rollout, stats in results:
        assert stats.desynced == 0 and not rollout.desynced.any()
        assert bool(rollout.guided.all())
        want = guided_generate(model, tokenizer, call["prompts"], call["answers"], lam=call["lam"],
                               num_generations=GENERATIONS, max_new_tokens=MAX_NEW_TOKENS, seed=call["seed"])
        same = (rollout.completion_ids == want.completion_ids) & want.completion_mask
        assert float(same.sum() / want.completion_mask.sum()) >= 0.99, "guided_generate's tokens"
        assert float((rollout.completion_mask == want.completion_mask).float().mean()) >= 0.99
        prompts, answers = per_rollout(call["prompts"], GENERATIONS), per_rollout(call["answers"], GENERATIONS)
        assert records_match_score(rollout, hf, prompts, answers) <= TOL


def test_a_pair_one_step_cannot_prefill_is_refused(servers, hf):
    """About 1850 prompt tokens against a budget of 1536 a step: refused by the client, which reads the budget,
    and by the server's scheduler when the pair is sent as it is (both requests finish with an error)."""
    _, tokenizer = hf
    prompt = "x" * 900  # the tokenizer is character-level
    with pytest.raises(ValueError, match="max_num_batched_tokens = 1536"):
        GuidedClient(servers["paired"], tokenizer).generate([prompt], ["1"], lam=0.5, max_new_tokens=2)
    call = GuidedCall.plan(tokenizer, [prompt], ["1"], SamplingSettings(lam=0.5, max_new_tokens=2, seed=0))

    async def send_pair():
        async with httpx.AsyncClient(base_url=servers["paired"], timeout=600) as http:
            bodies = [{"prompt": request.prompt_token_ids, **request_sampling_params(request)}
                      for request in call.rollouts[0].requests]
            for body in bodies:
                body["vllm_xargs"] = body.pop("extra_args")
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))

    assert [response.status_code for response in asyncio.run(send_pair())] == [500, 500]


@pytest.mark.filterwarnings("ignore:prodsample. the server does not run")
def test_without_the_pair_scheduler_every_desync_is_flagged_and_never_guided(servers, hf):
    """records_match_score finds each rollout's loss from teacher-forced score of a separately loaded model,
    and asserts that every rollout whose log q leaves λ's q is flagged and not guided."""
    _, tokenizer = hf
    results = run_load(servers["stock"], tokenizer)
    desynced = sum(int(rollout.desynced.sum()) for _, rollout, _ in results)
    assert desynced > 0, "the load splits pairs under vLLM's scheduler (else this test shows nothing)"
    for call, rollout, stats in results:
        assert stats.desynced == int(rollout.desynced.sum())
        prompts, answers = per_rollout(call["prompts"], GENERATIONS), per_rollout(call["answers"], GENERATIONS)
        # a desync the records missed would leave a solo draw's log π where log q is expected: this fails
        half_prefilled = stats.causes[DesyncCause.GUIDE_MID_PREFILL.value] > 0
        assert records_match_score(rollout, hf, prompts, answers, half_prefilled_guides=half_prefilled) <= TOL


def test_the_benchmark_command_at_toy_size(servers, tmp_path):
    """`prodsample server` against the running servers: every run kind, per-client ratios and both desync rates."""
    from prodsample import cli

    out = tmp_path / "server-tiny"
    assert cli.main(["server", "--model", "tiny", "--dtype", "float32", "--clients", "1", "2", "--prompts-per-client",
                     "1", "--generations", "2", "--max-new-tokens", "4", "--rounds", "2", "--desync-prompts", "2",
                     "--paired-url", servers["paired"], "--stock-url", servers["stock"], "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    kinds = {"plain", "plain_2b", "guided"}
    timed = sorted((run["round"], run["kind"], run["clients"]) for run in summary["runs"] if run["round"] is not None)
    assert timed == sorted((r, k, c) for r in (0, 1) for k in kinds for c in (1, 2))
    warmup = {(run["kind"], run["clients"]) for run in summary["runs"] if run["round"] is None and run["kind"] != "desync"}
    assert warmup == {(k, 1) for k in kinds}, "a warm-up pass of every kind at the smallest client count, apart"
    assert set(summary["time_per_token_ratios"]) == {"1", "2"}
    for ratios in summary["time_per_token_ratios"].values():
        assert set(ratios) == {"guided_over_plain", "plain_2b_over_plain", "guided_over_plain_2b"}
        assert all(len(ratio["per_round"]) == 2 and ratio["median"] > 0 for ratio in ratios.values())
    assert summary["desync"]["with_scheduler"] == {"pairs": 4, "desynced": 0, "rate": 0.0, "causes": {}}
    assert summary["desync"]["without_scheduler"]["pairs"] == 4
    assert summary["command"].startswith("prodsample server --model tiny") and summary["git"]["revision"]
    assert (out / "runs.csv").read_text().startswith("round,kind,server,clients,")
