"""The compiled CPU path (`torch.compile` of the reference): the reference's outputs, one graph for every
shape and setting, and the same distribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prodsample import noise, product_sample
from prodsample.kernels.compiled import compiled_fused_sample
from prodsample.fused import FusedInputs, mixed_logits, reference_fused_sample

from .helpers.kernel_inputs import CHI_SQUARE_FILTERS, chi_square_logits, fused_inputs, noise_keys
from .helpers.reference import chi_square_pvalue, product_distribution

# |compiled − reference| ≤ VALUE_RTOL·(1 + s), s = the row's largest finite |logit|·τ: Inductor fuses and
# reorders the reference's float32 arithmetic (vectorised exp/log, cascade sums).
VALUE_RTOL = 1e-5
ALPHA = 1e-3
DRAWS = 5_000  # more than the interpreted kernel's 400; each draw is a row padded to MIN_COMPILED_VOCAB

pytestmark = [
    pytest.mark.slow,  # every test needs the compiled graph, and its first compile in a process takes seconds
    # Inductor's first compile in a process calls the deprecated torch.jit.script_method: torch's noise, not ours.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def race_values64(inputs: FusedInputs) -> torch.Tensor:
    """z − log E (z for greedy rows) in float64 over the kept tokens: decides whether two tokens are a near-tie."""
    plain, guide, lam, temperature, threshold, keys = inputs
    kept = mixed_logits(plain, guide, lam, temperature) >= (threshold.unsqueeze(1) if threshold is not None else -math.inf)
    tau = torch.where(temperature == 0, 1.0, 1.0 / temperature.double()).unsqueeze(1)
    w_plain, w_guide = lam.double().unsqueeze(1), 1.0 - lam.double().unsqueeze(1)
    z = (w_plain * torch.where(w_plain > 0, plain.double(), 0.0) + w_guide * torch.where(w_guide > 0, guide.double(), 0.0)) * tau
    z = torch.where(kept, z, -math.inf)
    log_noise = noise.log_exponential_noise(keys, plain.shape[1]).double()
    return torch.where((temperature == 0).unsqueeze(1), z, z - log_noise)


@st.composite
def sampling_case(draw):
    return fused_inputs(draw, draw(st.integers(1, 5)), draw(st.integers(2, 3000)))


@settings(max_examples=60, deadline=None)
@given(sampling_case())
def test_compiled_path_returns_the_reference_outputs(case):
    got = compiled_fused_sample(case)
    want = reference_fused_sample(case)
    raced = race_values64(case)
    plain, guide, temperature = case.plain_logits, case.guide_logits, case.temperature
    finite = torch.cat([plain, guide], dim=1).float()
    scale = torch.where(torch.isfinite(finite), finite.abs(), 0.0).amax(dim=1) / torch.where(temperature == 0, 1.0, temperature)
    for row in range(plain.shape[0]):
        tol = VALUE_RTOL * (1 + float(scale[row]))
        token, reference_token = int(got.token_ids[row]), int(want.token_ids[row])
        assert token == reference_token or raced[row, token] >= raced[row, reference_token] - tol
        if token != reference_token:
            continue  # a near-tie: the two tokens' outputs differ by definition
        for name in ("logprobs", "plain_logprobs", "guide_logprobs", "log_normalizer"):
            g, w = float(getattr(got, name)[row]), float(getattr(want, name)[row])
            assert g == w or abs(g - w) <= tol, f"row {row} {name}: {g} vs reference {w}"


def check_case(rows: int, vocab: int, dtype=torch.float32, seed: int = 0) -> FusedInputs:
    generator = torch.Generator().manual_seed(seed)
    plain = torch.randn(rows, vocab, generator=generator).to(dtype)
    guide = torch.randn(rows, vocab, generator=generator).to(dtype)
    return FusedInputs(plain, guide, torch.full((rows,), 0.5), torch.full((rows,), 0.9), None, noise_keys(rows, seed))


def test_one_graph_serves_every_batch_size_vocabulary_filter_and_dtype():
    """Once compiled, no call recompiles: B = 1 or more, small or large V, a filter or none, any dtype, strides."""
    compiled_fused_sample(check_case(4, 5000))  # compiles (or loads) the one graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, vocab, dtype in [
            (1, 5000, torch.float32), (3, 777, torch.float16), (17, 12_345, torch.bfloat16), (2, 1, torch.float32)
        ]:
            unfiltered = check_case(rows, vocab, dtype)
            for inputs in (unfiltered, unfiltered._replace(threshold=torch.zeros(rows))):
                assert torch.equal(compiled_fused_sample(inputs).token_ids, reference_fused_sample(inputs).token_ids)
        # Broadcast settings (stride 0) and strided logit rows, as product_sample and generate() pass them.
        hidden = torch.randn(5, 3, 4000)
        got = compiled_fused_sample(
            FusedInputs(hidden[:, -1], hidden[:, 0], torch.tensor(0.3).expand(5), torch.tensor(1.0).expand(5), None, noise_keys(5))
        )
        want = reference_fused_sample(
            FusedInputs(hidden[:, -1], hidden[:, 0], torch.full((5,), 0.3), torch.ones(5), None, noise_keys(5))
        )
        assert torch.equal(got.token_ids, want.token_ids)


def test_degenerate_shapes():
    empty = compiled_fused_sample(FusedInputs(torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0), torch.ones(0), None, noise_keys(0)))
    assert all(x.shape == (0,) for x in empty)
    single = compiled_fused_sample(
        FusedInputs(torch.zeros(2, 1), torch.ones(2, 1), torch.full((2,), 0.5), torch.ones(2), None, noise_keys(2))
    )
    assert single.token_ids.tolist() == [0, 0] and single.logprobs.tolist() == [0.0, 0.0]
    masked = compiled_fused_sample(
        FusedInputs(torch.full((2, 3), -math.inf), torch.zeros(2, 3), torch.full((2,), 0.5), torch.ones(2), None, noise_keys(2))
    )
    assert masked.token_ids.tolist() == [0, 0], "padding must not move a fully masked row's token (the core refuses it)"


@pytest.mark.parametrize("filters", CHI_SQUARE_FILTERS, ids=["tempered", "top_k"])
def test_compiled_samples_follow_q(filters):
    """The chi-square test the Triton kernel passes (same logits, λ, filters and α), at more draws."""
    plain, guide = chi_square_logits()
    q = product_distribution(plain, guide, 0.5, filters["temperature"], filters.get("top_k"))
    out = product_sample(
        plain.expand(DRAWS, -1), guide.expand(DRAWS, -1), 0.5, seed=11, positions=0, backend="compiled", **filters
    )
    assert chi_square_pvalue(torch.bincount(out.token_ids, minlength=8), q) > ALPHA
