"""TRL's vLLM colocate mode with guided rollouts (`prodsample.trl.colocate`), end to end on the CPU engine.

`tests/trl_colocate_run.py` trains `GuidedGRPOTrainer` (use_vllm=True, vllm_mode="colocate", backend="vllm")
for 2 steps on the tiny model, in 1 process and in 2 (`accelerate launch`, an engine per process), each run
in a subprocess (the engine, torch.distributed and the environment variables TRL sets stay out of the test
process) with a time limit. For every process and generation batch, the engine's recorded log π equals
TRL's recomputed log π_old within 2e-4: at step 0 both are the checkpoint's, at step 1 both differ from
the checkpoint's by more than 10× that, so the engine sampled with the weights the first step trained.

torch.distributed's stores listen on every interface (torch has no setting to bind them to one address), so
where `unshare --net` works the runs go into a private network namespace whose only interface is loopback.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")
pytest.importorskip("trl", reason="TRL is not installed")

import psutil  # noqa: E402  (a dependency of vLLM)
from transformers import AutoModelForCausalLM  # noqa: E402

from prodsample.testing import save_tiny  # noqa: E402
from prodsample.trl.colocate import colocated_engine_settings  # noqa: E402
from prodsample.vllm.sync import FLOAT32_TOLERANCE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "tests" / "trl_colocate_run.py"
TOL = 2e-4  # fp32 logits of two engines (vLLM's CPU kernels vs transformers')
LEARNING_RATE = 1e-4  # moves log π by well over 10 × TOL in one step (asserted below)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for the tiny model's default head_dim of 16
    return save_tiny(tmp_path_factory.mktemp("tiny-colocate"), arch="llama", seed=1, heads=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_only() -> list[str]:
    """A command prefix that runs in a private network namespace with only loopback up, if this machine
    allows one; else none."""
    prefix = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if done.returncode == 0 else []


def run(model_dir, out: Path, processes: int, timeout: int) -> None:
    script = [str(RUN), "--model-dir", str(model_dir), "--out", str(out), "--learning-rate", str(LEARNING_RATE)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *script,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    process = subprocess.Popen([*loopback_only(), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # accelerate's workers run in sessions of their own: end every process the run started, by id
        for started in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                started.kill()
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"the run took more than {timeout} s: {stderr[-4000:]}")
    assert process.returncode == 0, stderr[-6000:]


def checkpoint_logprobs(model, record) -> torch.Tensor:
    """log π of each recorded completion under the checkpoint's weights (what the engine held before step 1)."""
    rows = []
    for prompt, completion, mask in zip(record["prompt_ids"], record["completion_ids"], record["mask"]):
        length = int(mask.sum())
        ids = torch.tensor([prompt + completion[:length].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        logprobs = logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None])[:, 0]
        rows.append(torch.nn.functional.pad(logprobs, (0, completion.shape[0] - length)))
    return torch.stack(rows)


def check_process(out: Path, rank: int, model) -> None:
    records = torch.load(out / f"records-{rank}.pt")
    assert [record["step"] for record in records] == [0, 1]
    for record in records:
        mask = record["mask"]
        assert record["guided"].all() and not record["desynced"].any(), "λ < 1 at both steps, no pair lost"
        engine, trainer = record["engine_logprobs"], record["trainer_logprobs"]
        assert (engine - trainer).abs()[mask].max() <= TOL, "the engine sampled with the trainer's weights"
    before, after = records
    assert (before["engine_logprobs"] - checkpoint_logprobs(model, before)).abs()[before["mask"]].max() <= TOL
    moved = (after["engine_logprobs"] - checkpoint_logprobs(model, after)).abs()[after["mask"]].max()
    assert moved > 10 * TOL, "after the first step the engine no longer holds the checkpoint's weights"
    log = json.loads((out / f"log-{rank}.json").read_text())
    probes = [entry["weight_sync/probe_mean_abs_diff"] for entry in log if "weight_sync/probe_mean_abs_diff" in entry]
    assert len(probes) == 2 and all(0 <= probe <= FLOAT32_TOLERANCE for probe in probes)


@pytest.mark.vllm
def test_one_process_trains_with_the_engine_synced_every_step(model_dir, tmp_path):
    run(model_dir, tmp_path, processes=1, timeout=600)
    check_process(tmp_path, 0, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_under_accelerate_launch_each_sync_their_own_engine(model_dir, tmp_path):
    run(model_dir, tmp_path, processes=2, timeout=900)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for rank in (0, 1):
        check_process(tmp_path, rank, model)


# -- the engine TRL builds ----------------------------------------------------------------------------------


def test_engine_settings_double_max_num_seqs_and_add_the_users_while_trl_builds_the_engine(monkeypatch):
    from trl.generation import vllm_generation

    built = []
    monkeypatch.setattr(vllm_generation, "LLM", lambda **kwargs: built.append(kwargs) or "engine", raising=False)
    trl_build = vllm_generation.LLM
    with colocated_engine_settings({"dtype": "float32", "enforce_eager": True}):
        assert vllm_generation.LLM(model="m", max_num_seqs=8, max_num_batched_tokens=4096, dtype="auto") == "engine"
    assert built == [dict(model="m", max_num_seqs=16, max_num_batched_tokens=4096, dtype="float32", enforce_eager=True)]
    assert vllm_generation.LLM is trl_build, "TRL's LLM is back after the trainer is built"
    with pytest.raises(RuntimeError), colocated_engine_settings({}):
        raise RuntimeError("GRPOTrainer.__init__ failed")
    assert vllm_generation.LLM is trl_build


@pytest.mark.parametrize("setting", sorted(["model", "distributed_executor_backend", "tensor_parallel_size",
                                            "enable_sleep_mode"]))  # fmt: skip
def test_engine_settings_refuse_what_trls_colocate_setup_fixes(setting):
    with pytest.raises(ValueError, match=f"vllm_engine_kwargs cannot set \\['{setting}'\\]"):
        with colocated_engine_settings({setting: 1}):
            pass


@pytest.mark.parametrize(
    ("config", "trainer_kwargs", "message"),
    [
        ({}, {"vllm_engine_kwargs": {"dtype": "float32"}}, "apply to vLLM colocate mode only"),
        ({}, {"weight_sync_tolerance": 1e-3}, "apply to vLLM colocate mode only"),
        ({"vllm_enable_sleep_mode": True}, {}, "do not wake a sleeping engine"),
        ({"vllm_tensor_parallel_size": 2}, {}, "single-worker engine: set vllm_tensor_parallel_size=1"),
    ],
    ids=["engine kwargs without colocate", "tolerance without colocate", "sleep mode", "tensor parallel"],
)
def test_the_trainer_refuses_colocate_settings_it_cannot_honour_before_building_an_engine(
    tmp_path, config, trainer_kwargs, message
):
    from datasets import Dataset

    from prodsample.testing import tiny_model, tiny_tokenizer
    from prodsample.schedules import Linear
    from prodsample.trl import GuidedGRPOConfig, GuidedGRPOTrainer

    colocate = dict(use_vllm=True, vllm_mode="colocate") if config else {}
    args = GuidedGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=4,
                            guidance_schedule=Linear(0.5, end_step=4), **colocate, **config)
    # a custom backend: the refusals hold for any sampler in colocate mode, not only backend="vllm"
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match=message):
        GuidedGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]),
                          processing_class=tokenizer, rollout_backend=lambda *args: None, **trainer_kwargs)
