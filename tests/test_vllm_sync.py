"""The checked weight sync (`prodsample.vllm.sync`) on a real CPU engine, and its failure paths.

On the engine (tiny fp32 Llama, eager, its own engine: these tests change its weights): a sync of new weights
passes its checks and the engine then computes with them (log-probs of other text and of a cached prompt
equal transformers' with the new weights); a partial sync and a complete sync of the wrong tensors are
refused. On a stand-in engine: the failures a real engine cannot survive (a reload that stops or raises
part-way) are refused, and every later sync with them.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs the CPU engine)")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from prodsample.testing import save_tiny  # noqa: E402
from prodsample.vllm import build_engine  # noqa: E402
from prodsample.vllm.sync import (  # noqa: E402
    FLOAT32_TOLERANCE,
    HALF_PRECISION_TOLERANCE,
    EngineWeightSync,
    WeightSyncError,
    default_tolerance,
    engine_probe_logprobs,
    probe_token_ids,
)

pytestmark = pytest.mark.vllm

TOL = 2e-4  # fp32 logits of two engines (vLLM's CPU kernels vs transformers')
OTHER_TEXT = "Compute 100 - 58, then name a prime number larger than 10 and smaller than 14."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention has no kernel for the tiny model's default head_dim of 16
    return save_tiny(tmp_path_factory.mktemp("tiny-sync"), arch="llama", seed=2, heads=2)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir):
    return build_engine(model_dir, dtype="float32", enforce_eager=True, max_model_len=256, block_size=32, seed=0)


def trainer_model(model_dir, noise_seed: int | None = None):
    """The checkpoint's model, moved by a seeded perturbation (as training would) unless `noise_seed` is None."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def model_logprobs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def sync_to(llm, tokenizer, model) -> EngineWeightSync:
    """A fresh sync that loads `model` (restores the engine for the next test)."""
    sync = EngineWeightSync(llm, probe_token_ids(tokenizer), tolerance=FLOAT32_TOLERANCE)
    sync.sync(model.named_parameters(), model_logprobs(model, sync.probe_ids))
    return sync


def test_a_sync_loads_new_weights_and_the_engine_then_computes_with_them(llm, tokenizer, model_dir):
    old, new = trainer_model(model_dir), trainer_model(model_dir, noise_seed=0)
    other = tokenizer(OTHER_TEXT)["input_ids"]
    # a prompt long enough to fill prefix-cache blocks, run before the sync so that its KV is cached
    cached = tokenizer(OTHER_TEXT * 2)["input_ids"]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0, detokenize=False)
    llm.generate([{"prompt_token_ids": cached}], greedy, use_tqdm=False)
    assert (engine_probe_logprobs(llm, other) - model_logprobs(old, other)).abs().max() <= TOL

    sync = EngineWeightSync(llm, probe_token_ids(tokenizer), tolerance=FLOAT32_TOLERANCE)
    report = sync.sync(new.named_parameters(), model_logprobs(new, sync.probe_ids))
    assert report.tensors == len(list(new.named_parameters()))
    assert report.probe_mean_abs_diff <= report.probe_max_abs_diff <= TOL and report.tolerance == FLOAT32_TOLERANCE

    # Text the probe never saw: the engine's log-probs are the new model's, far from the old one's.
    engine = engine_probe_logprobs(llm, other)
    assert (engine - model_logprobs(new, other)).abs().max() <= TOL
    assert (engine - model_logprobs(old, other)).abs().max() > 100 * TOL
    # Decoding after the cached prompt: its KV was recomputed with the new weights (the cache was reset).
    (output,) = llm.generate([{"prompt_token_ids": cached}], greedy, use_tqdm=False)
    completion = list(output.outputs[0].token_ids)
    recorded = torch.tensor([entry[token].logprob for entry, token in zip(output.outputs[0].logprobs, completion)])
    teacher_forced = model_logprobs(new, cached + completion)[len(cached) - 1 :]
    assert (recorded.double() - teacher_forced).abs().max() <= TOL

    sync_to(llm, tokenizer, old)


def test_a_partial_sync_is_refused_and_so_is_every_later_sync(llm, tokenizer, model_dir):
    new = trainer_model(model_dir, noise_seed=1)
    sync = EngineWeightSync(llm, probe_token_ids(tokenizer), tolerance=FLOAT32_TOLERANCE)
    reference = model_logprobs(new, sync.probe_ids)
    with pytest.raises(WeightSyncError, match="left weights unloaded"):
        sync.sync(list(new.named_parameters())[:5], reference)
    with pytest.raises(WeightSyncError, match="an earlier weight sync into this engine failed"):
        sync.sync(new.named_parameters(), reference)
    # The engine itself survives a partial reload (vLLM keeps the old tensors of layers it did not load):
    # a new sync with every tensor passes.
    sync_to(llm, tokenizer, trainer_model(model_dir))


def test_a_complete_sync_of_the_wrong_tensors_fails_the_probe(llm, tokenizer, model_dir):
    """Every tensor arrives, but layers 0 and 1 trade places: only the probe can tell."""
    new = trainer_model(model_dir, noise_seed=2)
    swapped = [(name.replace("layers.0.", "layers.@.").replace("layers.1.", "layers.0.").replace("layers.@.", "layers.1."),
                tensor) for name, tensor in new.named_parameters()]  # fmt: skip
    sync = EngineWeightSync(llm, probe_token_ids(tokenizer), tolerance=FLOAT32_TOLERANCE)
    with pytest.raises(WeightSyncError, match="does not hold the trainer's weights"):
        sync.sync(swapped, model_logprobs(new, sync.probe_ids))
    sync_to(llm, tokenizer, trainer_model(model_dir))


# -- a stand-in engine: failures a real engine does not survive ------------------------------------------------


class StandInWorker:
    """Reads `reads` tensors (all when None) and then returns, or raises `error` after reading them."""

    def __init__(self, reads=None, error=None):
        self.reads, self.error, self.received = reads, error, []

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        for name, _ in weights_iterator:
            self.received.append(name)
            if self.reads is not None and len(self.received) == self.reads:
                break
        if self.error is not None:
            raise self.error


class StandInEngine:
    """`collective_rpc` runs the function on one in-process worker; the probe sees `logprob` everywhere."""

    def __init__(self, worker, logprob=-1.0, resets=True):
        self.worker, self.logprob, self.resets = worker, logprob, resets

    def collective_rpc(self, function, args=()):
        return [function(self.worker, *args)]

    def reset_prefix_cache(self):
        return self.resets

    def generate(self, prompts, params, use_tqdm):
        ids = prompts[0]["prompt_token_ids"]
        entries = [None] + [{token: SimpleNamespace(logprob=self.logprob)} for token in ids[1:]]
        return [SimpleNamespace(prompt_logprobs=entries)]


PROBE = [1, 5, 6, 7]
REFERENCE = torch.full((3,), -1.0)


def tensors(count):
    return [(f"w{i}", torch.zeros(2)) for i in range(count)]


def test_stand_in_a_sync_that_passes_reports_what_it_loaded():
    worker = StandInWorker()
    report = EngineWeightSync(StandInEngine(worker), PROBE, tolerance=1e-3).sync(tensors(4), REFERENCE)
    assert worker.received == ["w0", "w1", "w2", "w3"] and report.tensors == 4 and report.probe_max_abs_diff == 0


def test_stand_in_an_engine_that_stops_reading_part_way_is_refused_and_the_rest_is_drained():
    remaining = iter(tensors(5))
    sync = EngineWeightSync(StandInEngine(StandInWorker(reads=2)), PROBE, tolerance=1e-3)
    with pytest.raises(WeightSyncError, match="stopped reading the trainer's weights after 2 tensors"):
        sync.sync(remaining, REFERENCE)
    assert next(remaining, None) is None, "the trainer's iterator ran to its end (its collectives stay matched)"
    with pytest.raises(WeightSyncError, match="an earlier weight sync into this engine failed"):
        sync.sync(tensors(5), REFERENCE)


def test_stand_in_a_reload_that_raises_part_way_is_refused_and_so_is_every_later_sync():
    sync = EngineWeightSync(StandInEngine(StandInWorker(reads=1, error=KeyError("model.extra.weight"))), PROBE,
                            tolerance=1e-3)
    with pytest.raises(WeightSyncError, match="failed part-way .*KeyError.*must not sample") as raised:
        sync.sync(tensors(3), REFERENCE)
    assert isinstance(raised.value.__cause__, KeyError)
    with pytest.raises(WeightSyncError, match="an earlier weight sync into this engine failed"):
        sync.sync(tensors(3), REFERENCE)


def test_stand_in_other_failures_are_refused():
    with pytest.raises(WeightSyncError, match="prefix cache"):
        EngineWeightSync(StandInEngine(StandInWorker(), resets=False), PROBE, tolerance=1e-3).sync(tensors(2), REFERENCE)
    with pytest.raises(WeightSyncError, match="differs from the trainer's by 0.5"):
        EngineWeightSync(StandInEngine(StandInWorker(), logprob=-1.5), PROBE, tolerance=1e-3).sync(tensors(2), REFERENCE)
    with pytest.raises(WeightSyncError, match="differs from the trainer's by nan"):
        EngineWeightSync(StandInEngine(StandInWorker(), logprob=float("nan")), PROBE, tolerance=1e-3).sync(
            tensors(2), REFERENCE)
    with pytest.raises(WeightSyncError, match="has no in-place reload_weights"):
        EngineWeightSync(StandInEngine(object()), PROBE, tolerance=1e-3).sync(tensors(2), REFERENCE)


def test_stand_in_bad_arguments():
    engine = StandInEngine(StandInWorker())
    for tolerance in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance must be a positive finite number"):
            EngineWeightSync(engine, PROBE, tolerance=tolerance)
    with pytest.raises(ValueError, match="probe_ids must hold at least 2 tokens"):
        EngineWeightSync(engine, [1], tolerance=1e-3)
    sync = EngineWeightSync(engine, PROBE, tolerance=1e-3)
    with pytest.raises(ValueError, match=r"trainer_logprobs must have shape \(3,\)"):
        sync.sync(tensors(2), torch.zeros(4))
    assert sync.failure is None, "a call refused before touching the engine leaves it usable"
    sync.sync(tensors(2), REFERENCE)


def test_default_tolerance_by_dtype():
    assert default_tolerance(torch.float32, torch.float32) == FLOAT32_TOLERANCE
    assert default_tolerance(torch.float32, torch.bfloat16) == HALF_PRECISION_TOLERANCE
    assert default_tolerance(torch.float16) == HALF_PRECISION_TOLERANCE
