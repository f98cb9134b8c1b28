"""The dispatcher: which fused pass runs where, the first-use check against the reference, and its fallback."""

from __future__ import annotations

import pytest
import torch

from prodsample import dispatch, product_sample
from prodsample.kernels.compiled import compiled_fused_sample
from prodsample.fused import FusedInputs, ProductSample, reference_fused_sample

# Inductor's first compile in a process calls the deprecated torch.jit.script_method: torch's noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def fresh_checks(monkeypatch):
    """Each test sees no earlier first-use checks."""
    monkeypatch.setattr(dispatch, "_verified", {})


def large_batch():
    """Big enough for CPU "auto" to use the compiled path."""
    rows, vocab = 2, dispatch.AUTO_COMPILE_MIN_LOGITS // 2
    assert vocab >= dispatch.AUTO_COMPILE_MIN_VOCAB
    return torch.randn(rows, vocab), torch.randn(rows, vocab)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'auto_engine', 'reference', 'compiled', 'triton'\)"):
        dispatch.fused_sampler(torch.device("cpu"), "cuda-graphs")


def test_explicit_backends():
    assert dispatch.fused_sampler("cpu", "reference") is reference_fused_sample
    assert dispatch.fused_sampler("cpu", "compiled") is compiled_fused_sample


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA devices, or anywhere under TRITON_INTERPRET=1"):
        dispatch.fused_sampler("cpu", "triton")


def test_cpu_auto_keeps_small_problems_on_the_reference(fresh_checks, monkeypatch):
    called = []
    monkeypatch.setattr(dispatch, "_verified_backend", lambda device, backend: called.append(backend))
    out = product_sample(torch.randn(64, 1000), torch.randn(64, 1000), 0.5, seed=0, positions=0)
    assert called == [] and out.token_ids.shape == (64,)


@pytest.mark.slow  # the first torch.compile in a process
def test_cpu_auto_uses_the_checked_compiled_path_for_large_batches(fresh_checks):
    plain, guide = large_batch()
    fused = dispatch.fused_sampler("cpu")
    inputs = FusedInputs(plain, guide, torch.full((2,), 0.5), torch.ones(2), None, torch.tensor([3, 4]))
    assert torch.equal(fused(inputs).token_ids, reference_fused_sample(inputs).token_ids)
    assert dispatch._verified[("cpu", "compiled")] is compiled_fused_sample


def test_cpu_auto_engine_uses_the_checked_compiled_path_for_a_real_vocabulary_at_any_batch(fresh_checks, monkeypatch):
    """An engine samples every decode step, so even one row of a language model's vocabulary compiles; a toy
    vocabulary stays on the reference."""
    called = []
    monkeypatch.setattr(dispatch, "_verified_backend", lambda device, backend: called.append(backend) or reference_fused_sample)
    fused = dispatch.fused_sampler("cpu", "auto_engine")
    settings = (torch.full((1,), 0.5), torch.ones(1), None, torch.tensor([3]))
    vocab = dispatch.AUTO_COMPILE_MIN_VOCAB
    fused(FusedInputs(torch.randn(1, vocab), torch.randn(1, vocab), *settings))
    assert called == ["compiled"], "one row, below auto's batch threshold, still takes the compiled path"
    fused(FusedInputs(torch.randn(1, 100), torch.randn(1, 100), *settings))
    assert called == ["compiled"], "a toy vocabulary stays on the reference"
    assert dispatch.fused_sampler("cpu", "auto") is not fused


def shifted_tokens(inputs: FusedInputs) -> ProductSample:
    """A plausible bug: right values, token off by one."""
    out = reference_fused_sample(inputs)
    return out._replace(token_ids=(out.token_ids + 1) % inputs.plain_logits.shape[1])


def crashing(inputs: FusedInputs) -> ProductSample:
    raise RuntimeError("no C++ compiler")


@pytest.mark.parametrize("broken, reason", [(shifted_tokens, "drew tokens"), (crashing, "no C\\+\\+ compiler")])
def test_a_fast_path_that_disagrees_or_fails_falls_back_to_the_reference_with_a_warning(
    fresh_checks, monkeypatch, broken, reason
):
    plain, guide = large_batch()
    expected = product_sample(plain, guide, 0.5, seed=1, positions=0, backend="reference")
    monkeypatch.setattr(dispatch, "_explicit", lambda device, backend: broken)
    with pytest.warns(RuntimeWarning, match=f"'compiled' sampler on cpu is not used because .*{reason}.*falling back"):
        out = product_sample(plain, guide, 0.5, seed=1, positions=0)
    assert torch.equal(out.token_ids, expected.token_ids)
    assert dispatch._verified[("cpu", "compiled")] is reference_fused_sample  # checked once, not per call


def test_cuda_auto_falls_back_when_the_kernel_cannot_run(fresh_checks):
    """Here there is no GPU: the first-use check fails, so "auto" on CUDA warns and uses the reference."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernel check runs for real")
    with pytest.warns(RuntimeWarning, match="'triton' sampler on cuda"):
        assert dispatch.fused_sampler("cuda") is reference_fused_sample


def test_the_triton_kernel_passes_the_first_use_check():
    """Natively on CUDA; interpreted on CPU tensors elsewhere (tests/conftest.py)."""
    triton = pytest.importorskip("triton")
    interpreted = triton.knobs.runtime.interpret
    if not (interpreted or torch.cuda.is_available()):
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1")
    from prodsample.kernels.product_sample import triton_fused_sample

    device = torch.device("cpu" if interpreted else "cuda")
    for splits in (1, 2):
        sampler = lambda inputs, splits=splits: triton_fused_sample(inputs, num_splits=splits)  # noqa: E731
        assert dispatch._disagreement_with_reference(sampler, device) is None


def test_other_devices_use_the_reference():
    assert dispatch.fused_sampler("meta") is reference_fused_sample
