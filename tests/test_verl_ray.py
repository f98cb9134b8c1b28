"""verl's trainer end to end on a local Ray cluster, with prodsample's guided rollouts (slow).

`python -m verl.trainer.main_ppo` with docs/verl.md's recipe, the tiny offline model, a 4-row parquet and two
rollout replicas, for a few GRPO steps, on this CPU machine: the CPU shims of `tests/verl_ray/cpu.py` and the
observers of `tests/verl_ray/probe.py` load into every process through `VERL_USE_EXTERNAL_MODULES`, and the
settings below the recipe's are the CPU's (docs/verl.md). Ray runs in the trainer's process, with its own temp
dir, and goes with it; the process group is killed by its id if it overruns.

Asserted: every training trajectory guided and in step with its records; both replicas serve, both requests of
each pair on one; the engines follow each weight update (their log π of the sampled tokens matches the trainer's
log-probs of the same tokens, which moved away from the initial weights' by far more); validation plain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (scripts/with-env.sh installs it)")
pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
pytest.importorskip("transfer_queue", reason="transferqueue is not installed (requirements/verl.txt)")

from prodsample.testing import save_tiny  # noqa: E402

from .test_verl import RECIPE_YAML, TINY, recipe_overrides, vllm_metadata  # noqa: E402,F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("What is 12+7?", "19"), ("Add 3 and 4", "7"), ("What is 5 times 6?", "30"), ("Take 2 from 9", "7")]
GENERATIONS = 4
STEPS = 2
RESPONSE_LENGTH = 16
TIMEOUT_S = 1800  # a bound, not a performance check: on a busy 2-core machine a run takes minutes
SYNC_TOL = 0.05  # engine (vLLM CPU kernels) against trainer (torch), float32, per token

# What the CPU needs beside the recipe (docs/verl.md, "On CPU").
CPU_SETTINGS = [
    "trainer.device=cpu",
    "trainer.nnodes=1",
    "trainer.n_gpus_per_node=2",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.model.use_remove_padding=false",
    "+actor_rollout_ref.rollout.enable_sleep_mode=false",
    "actor_rollout_ref.rollout.enforce_eager=true",
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.actor.fsdp_config.dtype=float32",
    "actor_rollout_ref.actor.use_torch_compile=false",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
    "reward.num_workers=1",
    "data.dataloader_num_workers=0",
]


def write_dataset(path: Path) -> Path:
    import pandas as pd

    pd.DataFrame([
        {
            "data_source": "prodsample_test", "prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer}, "extra_info": {"index": i},
        }
        for i, (question, answer) in enumerate(ROWS)
    ]).to_parquet(path)
    return path


def trainer_command(tmp: Path, model_dir: Path, data: Path, ray_dir: Path, *, use_v1: bool) -> list[str]:
    recipe = [o for o in recipe_overrides() if not o.startswith((
        "data.", "actor_rollout_ref.model.path=", "actor_rollout_ref.rollout.n=",
        "actor_rollout_ref.rollout.agent.agent_loop_config_path=",
    ))]
    return [sys.executable, "-m", "verl.trainer.main_ppo", *recipe, *CPU_SETTINGS,
        f"trainer.use_v1={str(use_v1).lower()}",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={RECIPE_YAML}",
        f"actor_rollout_ref.model.path={model_dir}",
        f"data.train_files={data}", f"data.val_files={data}",
        f"data.train_batch_size={len(ROWS)}", f"data.val_batch_size={len(ROWS)}",
        "data.max_prompt_length=96", f"data.max_response_length={RESPONSE_LENGTH}",
        f"actor_rollout_ref.rollout.n={GENERATIONS}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.max_model_len=256",
        "actor_rollout_ref.rollout.max_num_batched_tokens=1024",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.1",
        "actor_rollout_ref.rollout.agent.num_workers=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "algorithm.use_kl_in_reward=false",
        f"reward.custom_reward_function.path={ROOT / 'tests' / 'verl_ray' / 'reward.py'}",
        f"trainer.total_training_steps={STEPS}", "trainer.test_freq=1", "trainer.val_before_train=true",
        "trainer.save_freq=-1", "trainer.logger=[console,file]",
        f"trainer.default_local_dir={tmp / 'checkpoints'}",
        "ray_kwargs.ray_init.num_cpus=16", "+ray_kwargs.ray_init.num_gpus=2",
        f"+ray_kwargs.ray_init._temp_dir={ray_dir}", "+ray_kwargs.ray_init.include_dashboard=false",
        "+ray_kwargs.ray_init._node_ip_address=127.0.0.1",
    ]


def read_probe(run: TrainerRun, kind: str) -> list[dict]:
    return [json.loads(line) for path in sorted(run.probe.glob(f"{kind}-*.jsonl")) for line in path.read_text().splitlines()]


class TrainerRun(NamedTuple):
    use_v1: bool
    probe: Path  # the probe's JSON lines (tests/verl_ray/probe.py)
    model_dir: Path  # the initial weights
    seconds: float
    peak_gib: float  # the trainer's process tree (Ray's processes included), sampled every second
    log: Path  # the trainer's output


def tree_memory(pid: int) -> int:
    """The proportional set size of a process and its descendants (RSS would count their shared pages, the
    libraries every Ray worker maps, once per process)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_trainer(tmp: Path, *, use_v1: bool) -> TrainerRun:
    model_dir = save_tiny(tmp / "tiny", **TINY)
    data = write_dataset(tmp / "rows.parquet")
    probe = tmp / "probe"
    probe.mkdir()
    # Ray's socket paths sit under its temp dir and must fit AF_UNIX's 107 bytes; pytest's tmp_path is too deep
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),  # vllm_metadata's too
        VERL_USE_EXTERNAL_MODULES="tests.verl_ray.cpu,tests.verl_ray.probe", VERL_PLATFORM="cpu",
        # verl 0.9.1 registers its FSDP engine for cuda and npu only; on CPU it runs as is
        VERL_ENGINE_DEVICE="cuda",
        PRODSAMPLE_PROBE_DIR=str(probe), VERL_FILE_LOGGER_PATH=str(tmp / "metrics.jsonl"),
        RAY_TMPDIR=str(ray_dir), TMPDIR=str(tmp), VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
        RAY_DEDUP_LOGS="0", HYDRA_FULL_ERROR="1",
        RAY_worker_niceness="0",  # Ray's default (15) starves the trainer on a machine shared with other work
        # Ray 2.x: a process with no Ray node of its own (verl's vLLM server actors) finds its address by routing
        # towards 8.8.8.8, i.e. the host's interface, and verl's servers bind there; with this off it is loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    log = tmp / "trainer.log"
    started = time.monotonic()
    peak = 0
    with open(log, "w") as out:
        process = subprocess.Popen(
            trainer_command(tmp, model_dir, data, ray_dir, use_v1=use_v1), cwd=tmp, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            while process.poll() is None and time.monotonic() - started < TIMEOUT_S:
                peak = max(peak, tree_memory(process.pid))
                time.sleep(1)
            code = process.wait(timeout=max(TIMEOUT_S - (time.monotonic() - started), 1))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # its group: the trainer, Ray's head processes
                process.wait()
            shutil.rmtree(ray_dir, ignore_errors=True)
    run = TrainerRun(use_v1, probe, model_dir, time.monotonic() - started, peak / 2**30, log)
    print(f"trainer (use_v1={use_v1}): exit {code} after {run.seconds:.0f} s, peak {run.peak_gib:.1f} GiB; log {log}")
    if code != 0:
        pytest.fail(f"verl's trainer exited {code} (None: over {TIMEOUT_S} s):\n{log.read_text()[-6000:]}")
    return run


@pytest.fixture(scope="module", params=[False, True], ids=["v0", "v1"])
def trained(request, tmp_path_factory, vllm_metadata):
    """One trainer run per trainer path (V0: trainer.use_v1=false; V1: verl's default), read back from its probe."""
    tmp = tmp_path_factory.mktemp("verl-ray-v1" if request.param else "verl-ray-v0")
    return run_trainer(tmp, use_v1=request.param)


def test_every_training_rollout_is_guided_in_step_on_one_replica(trained):
    requests = read_probe(trained, "requests")
    training = [r for r in requests if r["lam"] < 1]
    roles = defaultdict(list)
    replicas = defaultdict(set)
    for request in training:
        roles[request["rollout"]].append(request["role"])
        replicas[request["rollout"]].add(request["replica"])
    assert len(roles) == STEPS * len(ROWS) * GENERATIONS
    assert all(sorted(r) == ["guide", "plain"] for r in roles.values()), "each rollout is one guided pair"
    assert all(len(r) == 1 for r in replicas.values()), "both requests of a pair reach one replica"
    per_replica = Counter(next(iter(r)) for r in replicas.values())
    assert sorted(per_replica) == [0, 1], f"both replicas serve: {per_replica}"
    records = [r for r in training if "tokens" in r]
    assert len(records) == len(roles), "every rollout's records came back, once"
    assert all(r["cause"] is None and r["lost_at"] is None for r in records), "every pair stayed in step"


def test_verls_servers_listen_on_loopback_only(trained):
    addresses = re.findall(r"master_address: ([^,\s]+)", trained.log.read_text())
    assert addresses and set(addresses) == {"127.0.0.1"}, f"verl's vLLM servers bound to {sorted(set(addresses))}"


def test_validation_runs_plain(trained):
    plain = [r for r in read_probe(trained, "requests") if r["lam"] == 1]
    # before training and after each step, every row once (val_kwargs.n = 1), unpaired
    assert len(plain) == (STEPS + 1) * len(ROWS)
    assert {r["role"] for r in plain} == {"plain"}


def test_the_trainer_sees_guided_trajectories(trained):
    updates = read_probe(trained, "updates")
    assert len(updates) == STEPS
    for update in updates:
        assert len(update["responses"]) == len(ROWS) * GENERATIONS
        if not trained.use_v1:  # the V0 trainer's batch carries the loop's columns; V1's selects verl's own
            assert update["guidance"]["guidance/guided_fraction"] == 1.0
            assert update["guidance"]["guidance/desynced_fraction"] == 0.0
            assert update["guidance"]["guidance/records_missing_fraction"] == 0.0
            assert 0.0 < update["guidance"]["guidance/lambda_mean"] < 1.0


def test_the_engines_follow_each_weight_update(trained):
    """The engine's log π (plain prompt) of each sampled token against the trainer's log-probs of the same tokens
    (`old_log_probs`, from the weights it synced to the engines before that rollout): equal within the kernels'
    numerical difference at every step; after the first update, the initial weights' log-probs are far off, so
    an engine that kept them would fail."""
    from transformers import AutoModelForCausalLM

    plain_prompt = {}
    engine = defaultdict(list)
    for request in read_probe(trained, "requests"):
        if request["lam"] < 1 and "prompt_ids" in request:
            plain_prompt[request["rollout"]] = request["prompt_ids"]
    for request in read_probe(trained, "requests"):
        if request["lam"] < 1 and "tokens" in request:
            engine[tuple(request["tokens"])].append((plain_prompt[request["rollout"]], request["plain_logprobs"]))
    initial = AutoModelForCausalLM.from_pretrained(trained.model_dir, dtype=torch.float32).eval()
    synced, stale = defaultdict(list), defaultdict(list)
    for step, update in enumerate(read_probe(trained, "updates")):
        for tokens, trainer_logprobs in zip(update["responses"], update["old_log_probs"]):
            candidates = engine.get(tuple(tokens), [])
            if len(candidates) != 1:
                continue  # the same tokens drawn twice: ambiguous
            prompt_ids, engine_logprobs = candidates[0]
            trainer_logprobs = np.asarray(trainer_logprobs)
            synced[step].append(np.abs(np.asarray(engine_logprobs[: len(trainer_logprobs)]) - trainer_logprobs).max())
            with torch.no_grad():
                logits = initial(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
            initial_logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].numpy()
            stale[step].append(np.abs(initial_logprobs[: len(trainer_logprobs)] - trainer_logprobs).max())
    assert sorted(synced) == list(range(STEPS)), f"every step has unambiguous trajectories: {sorted(synced)}"
    for step in range(STEPS):
        print(f"step {step + 1}: engine vs trainer log-prob gap ≤ {max(synced[step]):.4f} over {len(synced[step])} "
              f"trajectories; initial weights vs trainer ≤ {max(stale[step]):.4f}")
        assert max(synced[step]) <= SYNC_TOL
    assert all(max(stale[step]) > 4 * SYNC_TOL for step in range(1, STEPS)), "the updates moved the policy"
