"""Data parallelism on a real CPU server: two engines (`--data-parallel-size 2`), each with prodsample's
scheduler, behind prodsample's middleware. The client pins both requests of a pair to one engine (vLLM's
`X-data-parallel-rank` header, rollouts spread over the ranks) and the records come back from every engine:
vLLM's own `collective_rpc` returns engine 0's only, so the rollouts of rank 1 would come back without records."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
httpx = pytest.importorskip("httpx", reason="the client needs the server extra (httpx)")

from prodsample.testing import LocalVllmServer  # noqa: E402
from prodsample.vllm.client import GuidedClient  # noqa: E402
from prodsample.vllm.routes import ENGINE_INFO_PATH, MIDDLEWARE  # noqa: E402
from prodsample.vllm.scheduler import SCHEDULER_CLS  # noqa: E402

from .helpers.rollouts import TOL, per_rollout, records_match_score  # noqa: E402
from .helpers.served_model import hf, model_dir  # noqa: E402, F401  (fixtures)
from .test_server_faults import lone_request  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-batched-tokens", "512",
                "--seed", "0", "--data-parallel-size", "2", "--scheduler-cls", SCHEDULER_CLS,
                "--worker-extension-cls", "prodsample.vllm.processor.RecordsExtension",
                *(flag for name in MIDDLEWARE for flag in ("--middleware", name))]
REQUEST_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalVllmServer(model_dir, SERVER_FLAGS, log=log) as url:
        yield url


def test_pairs_pinned_to_one_engine_come_back_guided_with_records_from_every_engine(server, hf):
    info = httpx.get(f"{server}{ENGINE_INFO_PATH}", timeout=REQUEST_TIMEOUT_S).json()
    assert info["data_parallel_size"] == 2 and len(info["results"]) == 2, "one worker per engine, both read"
    assert all(worker["samplers"] == 1 and worker["keeps_pairs"] for worker in info["results"])
    _, tokenizer = hf
    prompts, answers = ["What is 2+3?", "Add 3 and 4", "9*9="], ["5", "7", "81"]
    client = GuidedClient(server, tokenizer, timeout=REQUEST_TIMEOUT_S)
    rollout = client.generate(prompts, answers, lam=0.5, num_generations=4, max_new_tokens=8, seed=5, temperature=1.0)
    assert client.last_stats.causes == {}, "every rollout in step, with its records, on both ranks"
    assert bool(rollout.guided.all()) and not rollout.desynced.any()
    assert records_match_score(rollout, hf, per_rollout(prompts, 4), per_rollout(answers, 4)) <= TOL


def test_a_tagged_request_without_a_rank_is_refused_on_a_data_parallel_server(server, hf):
    _, tokenizer = hf
    response = httpx.post(f"{server}/v1/completions", json=lone_request(tokenizer), timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400 and "X-data-parallel-rank" in response.text, response.text
