"""Keyed exponential noise: the hash, the distribution, the tail."""

import math

import torch
from scipy.stats import kstest

from prodsample.noise import exponential_from_mantissa, exponential_noise, mix64, row_keys

MASK64 = (1 << 64) - 1


def mix64_python(x: int) -> int:
    """splitmix64's finaliser on Python ints (the published uint64 algorithm)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_mix64_matches_the_uint64_algorithm():
    values = [0, 1, 7, 2**31, 2**40 + 12345, 2**63 - 1, -1, -(2**63), -987654321]
    mixed = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [m & MASK64 for m in mixed] == [mix64_python(v) for v in values]


def test_noise_is_a_pure_function_of_the_key():
    keys = row_keys(torch.tensor([3, 3, 3]), torch.tensor([0, 0, 1]), torch.tensor([5, 5, 5]))
    noise = exponential_noise(keys.unsqueeze(1), torch.arange(100).unsqueeze(0))
    assert torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], noise[2])


def test_noise_is_exponential():
    keys = row_keys(torch.tensor([11]), torch.tensor([2]), torch.tensor([9]))
    noise = exponential_noise(keys.unsqueeze(1), torch.arange(200_000).unsqueeze(0)).flatten().double()
    assert kstest(noise.numpy(), "expon").pvalue > 1e-3
    assert abs(float(noise.mean()) - 1.0) < 0.01


def test_tail_resolves_far_below_float32_uniforms():
    """E at the 53-bit extremes: u = 1 − 2⁻⁵⁴ gives E ≈ 5.6e-17, far below a 24-bit floor (6e-8)."""
    top = exponential_from_mantissa(torch.tensor([2**53 - 1], dtype=torch.int64))
    assert 0 < float(top) < 1e-16
    bottom = exponential_from_mantissa(torch.tensor([0], dtype=torch.int64))
    assert math.isclose(float(bottom), -math.log(0.5 * 2**-53), rel_tol=1e-6)


def test_piecewise_formula_is_accurate_across_its_regimes():
    """Relative error against float64 −log1p(−b) over mantissas spanning both regimes and the series cut."""
    exponents = torch.arange(0, 53)
    mantissas = torch.cat([2**53 - 2**exponents, 2**exponents, torch.tensor([2**52 - 1, 2**52, 2**52 + 1])])
    mantissas = mantissas.clamp(0, 2**53 - 1).to(torch.int64)
    approx = exponential_from_mantissa(mantissas).double()
    u = (mantissas.double() + 0.5) * 2.0**-53
    b = ((2**53 - mantissas).double() - 0.5) * 2.0**-53
    exact = torch.where(u <= 0.5, -torch.log(u), -torch.log1p(-b))
    assert float(((approx - exact) / exact).abs().max()) < 1e-5
    grid = torch.linspace(0, 2**53 - 1, 10_001, dtype=torch.float64).to(torch.int64)
    values = exponential_from_mantissa(grid)
    assert bool((values.diff() <= 0).all()), "E must not increase with the mantissa"
