"""Which implementation of the fused sampling pass runs on a device.

Every backend implements the contract of `prodsample.fused` (`FusedSampler`, defined by `reference_fused_sample`) and draws the same token
under the same keyed noise:

- "reference": the eager PyTorch reference.
- "compiled":  `torch.compile` of the reference, one graph for every shape (`prodsample.kernels.compiled`).
- "triton":    the fused Triton kernel (`prodsample.kernels.product_sample`): CUDA, or any device's tensors
               under TRITON_INTERPRET=1 (slow; for tests).
- "auto":      on CUDA the Triton kernel; on CPU the compiled path for a language model's vocabulary (at
               least AUTO_COMPILE_MIN_VOCAB tokens) and batch (at least AUTO_COMPILE_MIN_LOGITS logits per
               context), the reference otherwise (compiling costs seconds once per process, which small
               problems never earn back); elsewhere the reference. The fast path is checked once per device against the reference on a
               small batch when it is first needed; if it fails or disagrees, a RuntimeWarning says why and
               the reference is used from then on.
- "auto_engine": "auto" for a caller that samples at every decode step of a long-lived engine (the vLLM
               logits processor): on CPU the checked compiled path for a language model's vocabulary at any
               batch, since thousands of steps earn the one-time compile back even at B = 1 (on SmolLM2's
               49152-token vocabulary, 2.0 instead of 4.9 ms per step at B = 4).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from .fused import FusedInputs, FusedSampler, ProductSample, reference_fused_sample

__all__ = ["fused_sampler", "BACKENDS", "AUTO_COMPILE_MIN_VOCAB", "AUTO_COMPILE_MIN_LOGITS"]

BACKENDS = ("auto", "auto_engine", "reference", "compiled", "triton")
# From B·V = 2^18 logits of a real vocabulary up, the compiled CPU path's one-time compile (~15 s with a warm
# Inductor cache, ~50 s cold, on a loaded 2-core machine) is earned back within ~500 calls at every size of
# benchmarks/results/kernel-cpu/; toy vocabularies (tests, tiny models) stay on the eager reference.
AUTO_COMPILE_MIN_VOCAB = 1 << 13
AUTO_COMPILE_MIN_LOGITS = 1 << 18
# The first-use check compares a candidate with the reference on this batch: V is not a multiple of any
# block size, rows cover λ ∈ {0, 1}, a greedy row and −inf logits, and the vocabulary is split on a GPU.
CHECK_ROWS, CHECK_VOCAB = 4, 5000
CHECK_ATOL = CHECK_RTOL = 1e-4

_verified: dict[tuple[str, str], FusedSampler] = {}


def fused_sampler(device: torch.device | str, backend: str = "auto") -> FusedSampler:
    """The fused pass for tensors on `device` under `backend` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if not backend.startswith("auto"):
        return _explicit(device, backend)
    if device.type == "cuda":
        return _verified_backend(device, "triton")
    if device.type == "cpu":
        return _cpu_auto if backend == "auto" else _cpu_auto_engine
    return reference_fused_sample


def _explicit(device: torch.device, backend: str) -> FusedSampler:
    if backend == "reference":
        return reference_fused_sample
    if backend == "compiled":
        from prodsample.kernels.compiled import compiled_fused_sample

        return compiled_fused_sample
    try:
        import triton
    except ImportError as error:
        raise ImportError("backend 'triton' needs the triton package: pip install 'prodsample[kernels]'") from error
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"backend 'triton' runs on CUDA devices, or anywhere under TRITON_INTERPRET=1; got {device}")
    from prodsample.kernels.product_sample import triton_fused_sample

    return triton_fused_sample


def _cpu_auto(inputs: FusedInputs, min_logits: int = AUTO_COMPILE_MIN_LOGITS) -> ProductSample:
    """CPU "auto": the checked compiled path for a language model's vocabulary in batches of at least `min_logits`
    logits, the eager reference otherwise."""
    rows, vocab = inputs.plain_logits.shape
    if vocab >= AUTO_COMPILE_MIN_VOCAB and rows * vocab >= min_logits:
        fused = _verified_backend(inputs.plain_logits.device, "compiled")
    else:
        fused = reference_fused_sample
    return fused(inputs)


# CPU "auto_engine": an engine samples at every decode step, so even one row of a real vocabulary earns the compile.
_cpu_auto_engine = functools.partial(_cpu_auto, min_logits=0)


def _verified_backend(device: torch.device, backend: str) -> FusedSampler:
    """`backend` on `device` if it matches the reference on the check batch (checked once), else the reference."""
    key = (str(device), backend)
    if key not in _verified:
        try:
            candidate = _explicit(device, backend)
            disagreement = _disagreement_with_reference(candidate, device)
        except Exception as error:  # noqa: BLE001 - no compiler, no triton, a driver error: all fall back alike
            candidate, disagreement = None, f"it failed on the check batch ({type(error).__name__}: {error})"
        if disagreement is not None:
            warnings.warn(
                f"prodsample: the {backend!r} sampler on {device} is not used because {disagreement}; "
                "falling back to the eager reference",
                RuntimeWarning,
                stacklevel=3,
            )
            candidate = reference_fused_sample
        _verified[key] = candidate
    return _verified[key]


def _check_batch(device: torch.device) -> FusedInputs:
    """A fixed small batch on `device`, with a per-row filter threshold."""
    generator = torch.Generator().manual_seed(20240601)
    plain = 3.0 * torch.randn(CHECK_ROWS, CHECK_VOCAB, generator=generator)
    guide = 3.0 * torch.randn(CHECK_ROWS, CHECK_VOCAB, generator=generator)
    plain[0, ::3] = -math.inf  # masked where the plain context has weight 0 (row 0: λ = 0)
    guide[1, ::5] = -math.inf  # masked where the guide context has weight 0 (row 1: λ = 1)
    plain[2, 1::7] = guide[3, 2::7] = -math.inf
    lam = torch.tensor([0.0, 1.0, 0.5, 0.3])
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3])
    threshold = torch.tensor([-math.inf, 1.0, 0.5, 0.0])
    keys = torch.randint(-(2**62), 2**62, (CHECK_ROWS,), generator=generator)
    return FusedInputs(*(x.to(device) for x in (plain, guide, lam, temperature, threshold, keys)))


def _disagreement_with_reference(candidate: FusedSampler, device: torch.device) -> str | None:
    """None if `candidate` reproduces the reference on the check batch (with and without a filter), else why not."""
    filtered = _check_batch(device)
    for inputs in (filtered._replace(threshold=None), filtered):
        expected = reference_fused_sample(inputs)
        got = candidate(inputs)
        if not torch.equal(got.token_ids.cpu(), expected.token_ids.cpu()):
            return f"it drew tokens {got.token_ids.tolist()} where the reference drew {expected.token_ids.tolist()}"
        for name, value, reference in zip(ProductSample._fields[1:], got[1:], expected[1:]):
            if not torch.allclose(value.cpu(), reference.cpu(), atol=CHECK_ATOL, rtol=CHECK_RTOL, equal_nan=True):
                return f"its {name} {value.tolist()} differ from the reference's {reference.tolist()}"
    return None
