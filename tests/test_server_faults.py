"""A real CPU vLLM server (prodsample's scheduler and worker extension, tiny fp32 Llama) under bad input: a
hostile or careless client must get HTTP 400 naming the field, and the engine must live on and still serve
exact guided rollouts. One server for the module (startup dominates on a loaded machine)."""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
httpx = pytest.importorskip("httpx", reason="the client needs the server extra (httpx)")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.testing import LocalVllmServer, save_tiny  # noqa: E402
from prodsample.vllm.client import GuidedClient  # noqa: E402
from prodsample.vllm.guided_call import NEUTRAL_SAMPLING, rollout_requests  # noqa: E402
from prodsample.vllm.scheduler import SCHEDULER_CLS  # noqa: E402

from .helpers.rollouts import TOL, per_rollout, records_match_score  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-batched-tokens", "512",
                "--seed", "0", "--distributed-executor-backend", "uni", "--scheduler-cls", SCHEDULER_CLS,
                "--worker-extension-cls", "prodsample.vllm.processor.RecordsExtension"]
REQUEST_TIMEOUT_S = 300.0  # the machine is shared with training runs at a higher priority


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for the tiny model's default head_dim of 16
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1, heads=2)


@pytest.fixture(scope="module")
def hf(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalVllmServer(model_dir, SERVER_FLAGS, env={"VLLM_SERVER_DEV_MODE": "1"}, log=log) as url:
        yield url


def lone_request(tokenizer, role="guide", **tag_changes) -> dict:
    """The body of one tagged request of a fresh rollout, its tag changed by `tag_changes` (unchecked)."""
    settings = SamplingSettings(lam=0.5, max_new_tokens=4, seed=0, temperature=1.0)
    ids = tokenizer("2+3?")["input_ids"]
    requests = rollout_requests("lone-" + role, 0, ids, ids, settings, tokenizer.eos_token_id).requests
    request = requests[0] if role == "guide" else requests[1]
    tag = request.tag.to_extra_args()
    tag.update({f"prodsample.{name}": value for name, value in tag_changes.items()})
    return {"prompt": list(ids), "max_tokens": request.max_new_tokens, **NEUTRAL_SAMPLING, "vllm_xargs": tag}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model_name(url)} | body, timeout=REQUEST_TIMEOUT_S)


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=REQUEST_TIMEOUT_S).json()["data"][0]["id"]


def assert_serves_exact_guided_rollouts(url: str, hf) -> None:
    """The engine is alive and a normal guided call returns records equal to teacher-forced score."""
    assert httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    _, tokenizer = hf
    prompts, answers = ["What is 2+3?", "Add 3 and 4"], ["5", "7"]
    client = GuidedClient(url, tokenizer, timeout=REQUEST_TIMEOUT_S)
    rollout = client.generate(prompts, answers, lam=0.5, num_generations=2, max_new_tokens=6, seed=3, temperature=1.0)
    assert client.last_records_source == "server" and bool(rollout.guided.all()) and not rollout.desynced.any()
    assert records_match_score(rollout, hf, per_rollout(prompts, 2), per_rollout(answers, 2)) <= TOL


def test_a_release_token_past_the_vocabulary_is_refused_and_the_engine_lives_on(server, hf):
    """A lone guide request is released at once: its release token indexes the logits. Before: IndexError in
    the worker, EngineDeadError, the server exits (HTTP 500). Now: HTTP 400 naming the field."""
    _, tokenizer = hf
    response = post(server, lone_request(tokenizer, release_token=10**12))
    assert response.status_code == 400, response.text
    assert "release_token" in response.text
    assert_serves_exact_guided_rollouts(server, hf)
