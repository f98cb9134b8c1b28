"""prodsample's vLLM server as verl launches it (slow): a Ray actor of `GuidedVllmHttpServer` started by verl's own
`launch_server` (its `vllm serve` arguments, `run_server`, uvicorn, the multiprocess executor) on a local Ray
cluster, with `rollout.data_parallel_size = 2` (two engines behind one server) and a KV cache of a few blocks
per engine, so that the engines preempt. verl's agent-loop worker (prodsample's) sends the rollout batch to the
actor through verl's `LLMServerClient` and load balancer, as in a training step.

Asserted: the engines preempted (vLLM's own counter, from the server's /metrics), both engines served, and yet
every trajectory came back guided and in step, with its records, and its log q equal to the one computed by
hand from the tiny model's logits of both contexts; a pair split across the two engines would have come back
without records, or desynced.

The actor loads the CPU shims of `tests/verl_ray/cpu.py` (docs/verl.md, "On CPU"); Ray runs in this process, on
127.0.0.1, with its own temp dir, and stops with the module's tests.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (scripts/with-env.sh installs it)")
pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from .helpers.rollouts import TOL  # noqa: E402
from .test_verl import (  # noqa: E402,F401 (fixtures)
    GENERATIONS, PROMPTS, ROOT, InProcessActor, changed, config, expected_logprobs, hf, model_dir, rollout_batch,
    vllm_metadata,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

RANKS = 2
RESPONSE_LENGTH = 48
KV_BLOCKS = 12  # per engine, of 32 tokens: room for the longest sequence (256), not for the 12 sequences each engine gets
TIMEOUT_S = 300  # a bound on each wait, not a performance check


@pytest.fixture(scope="module")
def launched(config, vllm_metadata):
    """(verl's configuration, the server actor after `launch_server`, its address) on a local Ray cluster."""
    import ray
    from verl.workers.rollout.replica import RolloutMode

    from prodsample.verl.server import GuidedVllmHttpServer

    config = changed(config, {"actor_rollout_ref": {"rollout": {
        "data_parallel_size": RANKS, "tensor_model_parallel_size": 1, "response_length": RESPONSE_LENGTH, "load_format": "auto",
        "enforce_eager": True, "dtype": "float32", "enable_sleep_mode": False, "disable_log_stats": False,
        "engine_kwargs": {"vllm": {"num_gpu_blocks_override": KV_BLOCKS, "block_size": 32}},
    }}})
    # Ray's socket paths sit under its temp dir and must fit AF_UNIX's 107 bytes; pytest's tmp_path is too deep
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    actor_env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "VERL_USE_EXTERNAL_MODULES": "tests.verl_ray.cpu", "VERL_PLATFORM": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_worker_niceness", "0")
        # Ray on loopback: it resolves 127.0.0.1 to the host's interface unless clusters are off, which its
        # processes read from this variable when they start, and this one (ray is imported) from the constant
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(num_cpus=4, num_gpus=RANKS, _temp_dir=ray_dir, include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": actor_env})
    try:
        server = ray.remote(GuidedVllmHttpServer).options(max_concurrency=1000).remote(
            config=config.actor_rollout_ref.rollout, model_config=config.actor_rollout_ref.model,
            rollout_mode=RolloutMode.STANDALONE, workers=[None] * RANKS,  # verl counts them; vLLM starts its own
            replica_rank=0, node_rank=0, gpus_per_node=RANKS, nnodes=1, cuda_visible_devices="",
        )
        ray.get(server.launch_server.remote(), timeout=TIMEOUT_S)
        host, port = ray.get(server.get_server_address.remote(), timeout=60)
        assert host == "127.0.0.1"
        yield config, server, f"http://{host}:{port}"
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def engine_counters(address: str, name: str) -> dict[str, float]:
    """A counter of vLLM's Prometheus metrics, per engine (data-parallel rank)."""
    import httpx

    text = httpx.get(f"{address}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        engine = re.search(r'engine="(\d+)"', labels).group(1)
        counts[engine] = counts.get(engine, 0.0) + float(value)
    return counts


def test_pairs_stay_guided_through_preemptions_on_two_engines_behind_verls_own_server(launched, hf):
    import ray
    from verl.workers.rollout.llm_server import LLMServerClient
    from verl.workers.rollout.router import GlobalRequestLoadBalancer

    from prodsample.verl import GuidedAgentLoopWorker

    config, server, address = launched
    model, tokenizer = hf
    before = engine_counters(address, "vllm:num_preemptions_total")
    client = LLMServerClient(config, load_balancer_handle=InProcessActor(GlobalRequestLoadBalancer({"replica-0": server})))
    worker = GuidedAgentLoopWorker(config, client)
    output = asyncio.run(asyncio.wait_for(worker.generate_sequences(rollout_batch()), TIMEOUT_S))

    preempted = engine_counters(address, "vllm:num_preemptions_total")
    assert sum(preempted.values()) > sum(before.values()), f"the small KV cache forced preemptions: {preempted}"
    served = engine_counters(address, "vllm:request_success_total")
    assert sorted(served) == [str(rank) for rank in range(RANKS)] and all(served.values()), served
    reads = ray.get(server.__ray_call__.remote(lambda actor: actor.record_reader.reads), timeout=60)
    print(f"preemptions per engine {preempted}, requests finished per engine {served}, record reads {reads}")

    columns = output.non_tensor_batch
    assert len(output) == len(PROMPTS) * GENERATIONS
    assert columns["prodsample_records"].all() and columns["prodsample_guided"].all()
    assert not columns["prodsample_desynced"].any()
    mask = output.batch["response_mask"].bool()
    assert mask.any(dim=1).all()
    log_q, _ = expected_logprobs(model, tokenizer, output, columns["prodsample_lam"].astype(float))
    assert torch.allclose(output.batch["rollout_log_probs"][mask], log_q[mask], atol=TOL, rtol=0)
