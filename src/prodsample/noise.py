"""Keyed exponential noise: the randomness every prodsample backend shares.

Sampling is an exponential race: with E_v ~ Exp(1) independent per token,

    argmax_v  log p(v) − log E_v   is distributed as  p,

because P(E_v / p(v) is the smallest) = p(v) / Σ_u p(u). The race needs no normaliser, so one streaming
pass over the logits can sample (the Triton kernel does exactly that).

E_v is a pure function of the key (seed, rollout id, position, token id): the G rollouts of one prompt use
different rollout ids and so draw independently, a rollout re-run with the same key draws the same
tokens, and the eager reference, the compiled CPU path, the Triton kernel and the vLLM processor draw the
same token. The key is hashed with the splitmix64 finaliser in wrapping int64 arithmetic (logical shifts
emulated with masks, since torch and Triton shift signed integers arithmetically):

    row_key = mix64(mix64(mix64(seed) ^ rollout_id) ^ position)
    bits_v  = mix64(row_key + (v + 1)·γ)               γ = 0x9E3779B97F4A7C15 (splitmix64's stream step)
    m_v     = bits_v >>> 11                            53 uniform bits

Tail resolution: a token of probability p wins only when E_v ≲ p, so the smallest representable E decides
the smallest probability sampled correctly. E = −log(u) with a 24-bit float u bottoms out near 6e-8. Here
u = (m + ½)·2⁻⁵³ and, for u > ½, E = −log1p(−b) with b = 1 − u computed from the integer itself, so E
resolves down to about 1e-16 while all arithmetic stays in float32 (cheap on every device):

    E = −log(u)                              u ≤ ½
    E = b·(1 + b·(½ + b·(⅓ + b/4)))          b < 2⁻⁷   (log1p series, relative error < 1e-9)
    E = −log(1 − b)                          otherwise
"""

from __future__ import annotations

import torch

__all__ = ["mix64", "row_keys", "exponential_noise", "exponential_from_mantissa", "log_exponential_noise"]


def _signed(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
MIX_MULT_1 = _signed(0xBF58476D1CE4E5B9)
MIX_MULT_2 = _signed(0x94D049BB133111EB)
SERIES_CUTOFF = 2.0**-7  # below it, −log1p(−b) comes from its series; above, from log(1 − b)


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic, same bits as the uint64 original)."""
    x = (x ^ _shift_right_logical(x, 30)) * MIX_MULT_1
    x = (x ^ _shift_right_logical(x, 27)) * MIX_MULT_2
    return x ^ _shift_right_logical(x, 31)


def row_keys(seed: torch.Tensor, rollout_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row hash of (seed, rollout id, position), all int64 `[B]` → int64 `[B]`."""
    return mix64(mix64(mix64(seed) ^ rollout_ids) ^ positions)


def exponential_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) for each (row key, token): `keys` int64 `[B, 1]`, `token_ids` int64 `[1, V]` → float32 `[B, V]`."""
    bits = mix64(keys + (token_ids + 1) * GOLDEN_GAMMA)
    return exponential_from_mantissa(_shift_right_logical(bits, 11))


def exponential_from_mantissa(mantissa: torch.Tensor) -> torch.Tensor:
    """E = −log(u), u = (m + ½)·2⁻⁵³, from 53 uniform bits m (int64 in [0, 2⁵³)), in float32 (see above)."""
    u = (mantissa.to(torch.float32) + 0.5) * 2.0**-53
    b = ((2**53 - mantissa).to(torch.float32) - 0.5) * 2.0**-53  # 1 − u, exact to float32 rounding
    series = b * (1.0 + b * (0.5 + b * (1.0 / 3.0 + b * 0.25)))
    upper = torch.where(b < SERIES_CUTOFF, series, -torch.log(1.0 - b))
    return torch.where(u <= 0.5, -torch.log(u), upper)


def log_exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log E for every token of every row: `keys` int64 `[B]` → float32 `[B, V]`."""
    token_ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64).unsqueeze(0)
    return torch.log(exponential_noise(keys.unsqueeze(1), token_ids))
