"""A real CPU vLLM server (prodsample's scheduler, worker extension and middleware, tiny fp32 Llama, an API
key, no dev mode) under bad input: a hostile or careless client gets HTTP 400 naming the field, the engine
lives on and still serves exact guided rollouts, the records are served only under the API key and only
by name, and a record left unread past `record_ttl_s` is forgotten while only untagged requests run. One server for the module (startup dominates on a loaded machine); every request is bounded in time."""

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
httpx = pytest.importorskip("httpx", reason="the client needs the server extra (httpx)")


from prodsample.settings import SamplingSettings  # noqa: E402
from prodsample.testing import LocalVllmServer  # noqa: E402
from prodsample.vllm.client import GuidedClient  # noqa: E402
from prodsample.vllm.guided_call import NEUTRAL_SAMPLING, rollout_requests  # noqa: E402
from prodsample.vllm.routes import ENGINE_INFO_PATH, MIDDLEWARE, RECORDS_PATH  # noqa: E402
from prodsample.vllm.scheduler import SCHEDULER_CLS  # noqa: E402

from .helpers.rollouts import TOL, per_rollout, records_match_score  # noqa: E402
from .helpers.served_model import hf, model_dir  # noqa: E402, F401  (fixtures)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "test-key"
PAIR_TIMEOUT_S = 1.0  # lone halves of pairs run alone after this
RECORD_TTL_S = 5.0  # far above how long a test's client leaves a finished rollout's record unread
SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-batched-tokens", "512",
                "--seed", "0", "--distributed-executor-backend", "uni", "--scheduler-cls", SCHEDULER_CLS,
                "--worker-extension-cls", "prodsample.vllm.processor.RecordsExtension", "--api-key", API_KEY,
                "--additional-config", json.dumps({"prodsample": {"pair_timeout_s": PAIR_TIMEOUT_S, "record_ttl_s": RECORD_TTL_S}}),
                *(flag for name in MIDDLEWARE for flag in ("--middleware", name))]
REQUEST_TIMEOUT_S = 300.0  # the machine is shared with training runs at a higher priority
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalVllmServer(model_dir, SERVER_FLAGS, log=log) as url:
        yield url


def lone_request(tokenizer, role="guide", name="lone", **tag_changes) -> dict:
    """The body of one tagged request of rollout `name`, its tag changed by `tag_changes` (unchecked)."""
    settings = SamplingSettings(lam=0.5, max_new_tokens=3, seed=0, temperature=1.0)
    ids = tokenizer("2+3?")["input_ids"]
    requests = rollout_requests(name, 0, ids, ids, settings, tokenizer.eos_token_id).requests
    request = requests[0] if role == "guide" else requests[1]
    tag = request.tag.to_extra_args()
    tag.update({f"prodsample.{name}": value for name, value in tag_changes.items()})
    return {"prompt": list(ids), "max_tokens": request.max_new_tokens, **NEUTRAL_SAMPLING, "vllm_xargs": tag,
            "return_token_ids": True}


def post(url: str, body: dict, path: str = "/v1/completions", headers=AUTH) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)


def assert_serves_exact_guided_rollouts(url: str, hf) -> None:
    """The engine is alive and a normal guided call returns records equal to teacher-forced score."""
    assert httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    _, tokenizer = hf
    prompts, answers = ["What is 2+3?", "Add 3 and 4"], ["5", "7"]
    client = GuidedClient(url, tokenizer, timeout=REQUEST_TIMEOUT_S, api_key=API_KEY)
    rollout = client.generate(prompts, answers, lam=0.5, num_generations=2, max_new_tokens=6, seed=3, temperature=1.0)
    assert bool(rollout.guided.all()) and not rollout.desynced.any()
    assert records_match_score(rollout, hf, per_rollout(prompts, 2), per_rollout(answers, 2)) <= TOL


def test_a_release_token_past_the_vocabulary_is_refused_and_the_engine_lives_on(server, hf):
    """A lone guide request is released at once: its release token indexes the logits. Before: IndexError in
    the worker, EngineDeadError, the server exits (HTTP 500). Now: HTTP 400 naming the field."""
    _, tokenizer = hf
    response = post(server, lone_request(tokenizer, release_token=10**12))
    assert response.status_code == 400, response.text
    assert "release_token" in response.text
    assert_serves_exact_guided_rollouts(server, hf)


def test_records_are_served_without_dev_mode_only_under_the_api_key_and_only_by_name(server, hf):
    _, tokenizer = hf
    assert post(server, {"method": "prodsample_engine_info"}, "/collective_rpc").status_code == 404, "no dev mode"
    done = post(server, lone_request(tokenizer, role="plain", name="mine", lam=1.0))
    assert done.status_code == 200, done.text
    assert post(server, {"rollouts": ["mine"]}, RECORDS_PATH, headers={}).status_code == 401
    assert post(server, {"rollouts": ["mine"]}, RECORDS_PATH, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}{ENGINE_INFO_PATH}", timeout=REQUEST_TIMEOUT_S).status_code == 401
    assert post(server, {"rollouts": ["someone-elses"]}, RECORDS_PATH).json() == {}
    assert post(server, {"rollouts": "mine"}, RECORDS_PATH).status_code == 400
    records = post(server, {"rollouts": ["mine"]}, RECORDS_PATH).json()
    assert records["mine"][0] == done.json()["choices"][0]["token_ids"], "the rollout's own record, by its name"
    assert post(server, {"rollouts": ["mine"]}, RECORDS_PATH).json() == {}, "read once: taken"


def test_a_record_left_unread_past_its_ttl_is_forgotten_while_only_untagged_requests_run(server, hf):
    """Before, the TTL sweep ran only in engine steps with tagged rows: once guided traffic stopped, unread
    records outlived `record_ttl_s`. Now every step sweeps: a record left unread past the TTL while only untagged
    requests run is gone; one read in time is served."""
    _, tokenizer = hf
    assert post(server, lone_request(tokenizer, role="plain", name="stale", lam=1.0)).status_code == 200
    untagged = {"prompt": tokenizer("1+1?")["input_ids"], "max_tokens": 4, "temperature": 0.0}
    deadline = time.monotonic() + RECORD_TTL_S + 3.0  # past the TTL and the sweep's period (at most 1 s)
    for _ in range(1000):  # engine steps without a tagged row
        assert post(server, untagged).status_code == 200
        if time.monotonic() > deadline:
            break
    assert time.monotonic() > deadline, "the untagged requests ran past the TTL"
    assert post(server, {"rollouts": ["stale"]}, RECORDS_PATH).json() == {}  # before any tagged step sweeps it
    assert post(server, lone_request(tokenizer, role="plain", name="fresh", lam=1.0)).status_code == 200
    assert list(post(server, {"rollouts": ["fresh"]}, RECORDS_PATH).json()) == ["fresh"]


def tag_fields(draw) -> dict:
    """A tag whose every field is drawn from valid and hostile values (some fields left out)."""
    fields = {
        "role": draw(st.sampled_from(["plain", "guide", "critic", ""])),
        "rollout_index": draw(st.one_of(st.integers(0, 2**63 - 1), st.integers(-(2**65), 2**65))),
        "seed": draw(st.integers(-(2**65), 2**65)),
        "release_token": draw(st.one_of(st.integers(0, 102), st.integers(-3, 2**65))),
        "lam": draw(st.one_of(st.floats(0.0, 1.0), st.floats(-2.0, 3.0), st.just([0.5, 0.5]), st.just("half"))),
        "temperature": draw(st.sampled_from([0.0, 0.7, 1.0, 1e30, -1.0])),
        "top_k": draw(st.one_of(st.integers(0, 200), st.integers(-2, 2**70))),
        "top_p": draw(st.floats(-0.5, 1.5)),
        "min_p": draw(st.floats(-0.5, 1.5)),
        "guide_prefix_tokens": draw(st.integers(-2, 2**70)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
        fields[name] = None  # left out
    return fields


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_and_hostile_tags_lone_halves_aborts_and_disconnects_never_take_the_engine_down(server, hf, data):
    """Each example: a request with a random tag (HTTP 200 if the tag is valid, 400 naming a prodsample field if
    not), a lone half of a pair (runs alone after the pair timeout), a pair whose one request disconnects (its
    partner is aborted), or a client that disconnects while its request waits. The next test checks the engine
    still serves exact guided rollouts."""
    _, tokenizer = hf
    name = f"h{data.draw(st.integers(0, 2**62))}"
    action = data.draw(st.sampled_from(["random tag", "lone half", "pair, one disconnects", "disconnect"]))
    if action == "random tag":
        body = lone_request(tokenizer, name=name)
        for field, value in tag_fields(data.draw).items():
            body["vllm_xargs"][f"prodsample.{field}"] = value
            if value is None:
                del body["vllm_xargs"][f"prodsample.{field}"]
        response = post(server, body)
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            named = ("prodsample", "extra_args")  # a tag field, or vLLM's own check of extra_args (int64 range)
            assert any(word in response.text for word in named), response.text
        return
    if action == "lone half":
        response = post(server, lone_request(tokenizer, role=data.draw(st.sampled_from(["guide", "plain"])), name=name))
        assert response.status_code == 200, response.text
        return
    asyncio.run(_disconnecting(server, tokenizer, name, pair=action == "pair, one disconnects"))


async def _disconnecting(url: str, tokenizer, name: str, *, pair: bool) -> None:
    """The guide request disconnects after 0.1 s (alone: while it waits for its partner); with `pair`, the
    plain request is sent too and must finish (aborted with its partner, or done first)."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        guide = http.post("/v1/completions", json=lone_request(tokenizer, name=name), timeout=0.1)
        if not pair:
            with pytest.raises(httpx.TimeoutException):
                await guide
            return
        plain = http.post("/v1/completions", json=lone_request(tokenizer, role="plain", name=name),
                          timeout=REQUEST_TIMEOUT_S)
        results = await asyncio.gather(guide, plain, return_exceptions=True)
    assert isinstance(results[0], (httpx.Response, httpx.TimeoutException)), results[0]
    assert isinstance(results[1], httpx.Response) and results[1].status_code == 200, results[1]
    assert results[1].json()["choices"][0]["finish_reason"] in ("abort", "stop", "length")


def test_after_the_hostile_clients_the_engine_serves_exact_guided_rollouts(server, hf):
    assert_serves_exact_guided_rollouts(server, hf)
