"""Fused product sampling: one read of the plain and guide logits per row, on the GPU (or Triton's interpreter).

The math. For one row, a = plain logits, b = guide logits, weights w_a = λ, w_b = 1 − λ, inverse
temperature τ = 1/T (τ = 1 for a greedy row, T = 0). With ℓ_a = a − LSE(a) and ℓ_b = b − LSE(b),

    q(v) ∝ exp((w_a·ℓ_a(v) + w_b·ℓ_b(v))·τ) = exp(z_v − c),   z_v = (w_a·a_v + w_b·b_v)·τ,
                                                              c   = (w_a·LSE(a) + w_b·LSE(b))·τ,

and c is one constant per row, so q = softmax(z) on the kept tokens (z_v ≥ the row's filter threshold,
from `prodsample.sampling.filter_threshold`; −inf elsewhere). Every output is then a function of the token
o and five log-sum-exps of the row, each accumulated online in a single pass over the vocabulary:

    token          o = argmax_v (z_v − log E_v)       E_v ~ Exp(1) keyed (prodsample.noise): o ~ softmax(z)
                       (argmax_v z_v for a greedy row)
    log q(o)       z_o − LSE(z)                        (0 for a greedy row)
    log_normalizer LSE(z) − c                          (z_o − c for a greedy row)
    plain_logprob  a_o·τ − LSE(a·τ)                    log_softmax(a / T)(o), unfiltered
    guide_logprob  b_o·τ − LSE(b·τ)

A weight-0 context has no say: its term w·x is replaced by 0 (never 0·(−inf) = NaN), in z and in c alike.

The online log-sum-exp keeps (m, s) with LSE = m + log s. A block x of BLOCK tokens updates it as

    m' = max(m, max(x)),   s' = s·exp(m − m') + Σ exp(x − m'),

with m' replaced by 0 inside the exps while it is still −inf (a row whose tokens so far are all −inf), so
exp(−inf − (−inf)) never appears: s stays 0 and LSE = −inf. The race keeps the best (z − log E) and its
index; a block's best replaces it only when strictly greater, and within a block the lowest index wins,
so ties go to the lowest index, as torch.argmax.

Parallel layout. A row's vocabulary is cut into S contiguous splits (more programs than rows when
the batch is small next to the GPU): `_scan_kernel` (grid B × S) writes each split's five LSEs and
its race winner; `_finish_kernel` (grid B) merges the splits (LSEs by a log-sum-exp, the race by the
strictly-greater rule in split order, which keeps the lowest index on ties), reads a_o and b_o back, and
writes the five outputs. Filters (top-k → top-p → min-p) are not fused: the core computes one threshold
on z per row with a sort (multi-pass) and the kernel applies it (HAS_THRESHOLD).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prodsample import noise
from prodsample.fused import FusedInputs, ProductSample

__all__ = ["triton_fused_sample", "launch_config", "default_num_splits", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 4096
NUM_STATS = 6  # per split: LSE(z), LSE(a), LSE(b), LSE(a·τ), LSE(b·τ), best race value
PROGRAMS_PER_SM = 2  # splits are added until the grid has this many programs per streaming multiprocessor

_GOLDEN_GAMMA = tl.constexpr(noise.GOLDEN_GAMMA)
_MIX_MULT_1 = tl.constexpr(noise.MIX_MULT_1)
_MIX_MULT_2 = tl.constexpr(noise.MIX_MULT_2)
_SERIES_CUTOFF = tl.constexpr(noise.SERIES_CUTOFF)
_TWO_POW_53 = tl.constexpr(2**53)
_TWO_POW_MINUS_53 = tl.constexpr(2.0**-53)
_NUM_STATS = tl.constexpr(NUM_STATS)


@triton.jit
def _shift_right_logical(x, BITS: tl.constexpr):
    """x >>> BITS on int64 (Triton shifts signed integers arithmetically, so the sign copies are masked)."""
    return (x >> BITS) & ((1 << (64 - BITS)) - 1)


@triton.jit
def _mix64(x):
    """splitmix64's finaliser in wrapping int64 arithmetic: the same bits as `prodsample.noise.mix64`."""
    x = (x ^ _shift_right_logical(x, 30)) * _MIX_MULT_1
    x = (x ^ _shift_right_logical(x, 27)) * _MIX_MULT_2
    return x ^ _shift_right_logical(x, 31)


@triton.jit
def _log_exponential_noise(row_key, token_ids):
    """log E_v for int64 `token_ids` under one row key: `prodsample.noise.log_exponential_noise`'s formula.

    E comes from 53 uniform bits; −log(u) and −log(1 − b) share one log by choosing its argument first.
    """
    bits = _mix64(row_key + (token_ids + 1) * _GOLDEN_GAMMA)
    mantissa = _shift_right_logical(bits, 11)
    u = (mantissa.to(tl.float32) + 0.5) * _TWO_POW_MINUS_53
    b = ((-mantissa + _TWO_POW_53).to(tl.float32) - 0.5) * _TWO_POW_MINUS_53  # 1 − u, from the integer
    lower_half = u <= 0.5
    minus_log = -tl.log(tl.where(lower_half, u, 1.0 - b))
    series = b * (1.0 + b * (0.5 + b * (1.0 / 3.0 + b * 0.25)))  # −log1p(−b) for tiny b
    return tl.log(tl.where(lower_half | (b >= _SERIES_CUTOFF), minus_log, series))


@triton.jit
def _weighted(weight, x):
    """w·x, and 0 when w = 0 even where x = −inf (x is replaced before the product, so no NaN ever forms)."""
    return weight * tl.where(weight > 0, x, 0.0)


@triton.jit
def _mixed_logits(a, b, plain_weight, guide_weight, inverse_temperature):
    """z = (w_a·a + w_b·b)·τ, with a weight-0 context's term dropped (no 0·(−inf))."""
    return (_weighted(plain_weight, a) + _weighted(guide_weight, b)) * inverse_temperature


@triton.jit
def _row_settings(lam_ptr, temperature_ptr, row):
    """(w_a, w_b, τ, greedy) of one row; τ = 1 for a greedy row, as the reference."""
    lam = tl.load(lam_ptr + row)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inverse_temperature = tl.where(greedy, 1.0, tl.math.div_rn(1.0, tl.maximum(temperature, 1e-30)))
    return lam, 1.0 - lam, inverse_temperature, greedy


@triton.jit
def _online_logsumexp(running_max, running_sum, x):
    """Fold block `x` into (m, s) with LSE = m + log s; −inf-safe (see the module docstring)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return new_max, running_sum


@triton.jit
def _logsumexp(x):
    """LSE of a small vector (−inf when all of it is −inf)."""
    top = tl.max(x, axis=0)
    shift = tl.where(top == -float("inf"), 0.0, top)
    return shift + tl.log(tl.sum(tl.exp(x - shift), axis=0))


@triton.jit
def _scan_kernel(
    plain_ptr,  # [B, V] fp32/fp16/bf16, unit stride along V
    guide_ptr,  # [B, V]
    plain_row_stride,
    guide_row_stride,
    lam_ptr,  # fp32 [B]
    temperature_ptr,  # fp32 [B], 0 = greedy
    threshold_ptr,  # fp32 [B] on z (read only when HAS_THRESHOLD)
    keys_ptr,  # int64 [B] noise keys
    stats_ptr,  # fp32 [B, S, 6] out: five LSEs and the best race value of each split
    best_index_ptr,  # int32 [B, S] out: each split's race winner
    vocab_size,
    split_size,  # tokens per split, a multiple of BLOCK
    num_splits,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (row, split): stream the split once, folding each block into the five online LSEs
    (of z, a, b, a·τ, b·τ) and the race argmax(z − log E); write them to `stats` and `best_index`."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    plain_weight, guide_weight, inverse_temperature, greedy = _row_settings(lam_ptr, temperature_ptr, row)
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + row)
    row_key = tl.load(keys_ptr + row)
    plain_row = plain_ptr + row * plain_row_stride
    guide_row = guide_ptr + row * guide_row_stride

    split_begin = split * split_size
    split_end = tl.minimum(split_begin + split_size, vocab_size)
    neg_inf = -float("inf")
    # (running max, running sum) of z, a, b, a·τ, b·τ; the race's best value and index.
    z_max, z_sum = neg_inf, 0.0
    a_max, a_sum = neg_inf, 0.0
    b_max, b_sum = neg_inf, 0.0
    at_max, at_sum = neg_inf, 0.0
    bt_max, bt_sum = neg_inf, 0.0
    best_value = neg_inf
    best_index = split_begin
    for block_begin in range(split_begin, split_end, BLOCK):
        token_ids = block_begin + tl.arange(0, BLOCK)
        in_split = token_ids < split_end
        a = tl.load(plain_row + token_ids, mask=in_split, other=neg_inf, eviction_policy="evict_first").to(tl.float32)
        b = tl.load(guide_row + token_ids, mask=in_split, other=neg_inf, eviction_policy="evict_first").to(tl.float32)
        z = _mixed_logits(a, b, plain_weight, guide_weight, inverse_temperature)
        if HAS_THRESHOLD:
            z = tl.where(z >= threshold, z, neg_inf)

        z_max, z_sum = _online_logsumexp(z_max, z_sum, z)
        a_max, a_sum = _online_logsumexp(a_max, a_sum, a)
        b_max, b_sum = _online_logsumexp(b_max, b_sum, b)
        at_max, at_sum = _online_logsumexp(at_max, at_sum, a * inverse_temperature)
        bt_max, bt_sum = _online_logsumexp(bt_max, bt_sum, b * inverse_temperature)

        raced = tl.where(greedy, z, z - _log_exponential_noise(row_key, token_ids.to(tl.int64)))
        block_best, block_offset = tl.max(raced, axis=0, return_indices=True, return_indices_tie_break_left=True)
        improves = block_best > best_value
        best_index = tl.where(improves, block_begin + block_offset, best_index)
        best_value = tl.where(improves, block_best, best_value)

    stats = stats_ptr + (row * num_splits + split) * _NUM_STATS
    tl.store(stats + 0, z_max + tl.log(z_sum))
    tl.store(stats + 1, a_max + tl.log(a_sum))
    tl.store(stats + 2, b_max + tl.log(b_sum))
    tl.store(stats + 3, at_max + tl.log(at_sum))
    tl.store(stats + 4, bt_max + tl.log(bt_sum))
    tl.store(stats + 5, best_value)
    tl.store(best_index_ptr + row * num_splits + split, best_index)


@triton.jit
def _finish_kernel(
    plain_ptr,
    guide_ptr,
    plain_row_stride,
    guide_row_stride,
    lam_ptr,
    temperature_ptr,
    threshold_ptr,
    stats_ptr,  # fp32 [B, S, 6] from _scan_kernel
    best_index_ptr,  # int32 [B, S]
    token_ptr,  # int64 [B] out
    logprob_ptr,  # fp32 [B] out: log q(o)
    plain_logprob_ptr,  # fp32 [B] out
    guide_logprob_ptr,  # fp32 [B] out
    log_normalizer_ptr,  # fp32 [B] out
    num_splits,
    SPLITS_BLOCK: tl.constexpr,  # next power of two ≥ num_splits
    HAS_THRESHOLD: tl.constexpr,
):
    """One program per row: merge the splits' LSEs and race winners, read a_o and b_o back, and write
    token, log q = z_o − LSE(z), the tempered log-probs and log_normalizer = LSE(z) − c (module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    plain_weight, guide_weight, inverse_temperature, greedy = _row_settings(lam_ptr, temperature_ptr, row)
    splits = tl.arange(0, SPLITS_BLOCK)
    valid = splits < num_splits
    stats = stats_ptr + (row * num_splits + splits) * _NUM_STATS
    z_lse = _logsumexp(tl.load(stats + 0, mask=valid, other=-float("inf")))
    a_lse = _logsumexp(tl.load(stats + 1, mask=valid, other=-float("inf")))
    b_lse = _logsumexp(tl.load(stats + 2, mask=valid, other=-float("inf")))
    at_lse = _logsumexp(tl.load(stats + 3, mask=valid, other=-float("inf")))
    bt_lse = _logsumexp(tl.load(stats + 4, mask=valid, other=-float("inf")))
    # The first split holding the best value wins: splits are in token order, so ties keep the lowest index.
    _, winner = tl.max(
        tl.load(stats + 5, mask=valid, other=-float("inf")), axis=0, return_indices=True,
        return_indices_tie_break_left=True,
    )
    token = tl.load(best_index_ptr + row * num_splits + winner).to(tl.int64)

    a = tl.load(plain_ptr + row * plain_row_stride + token).to(tl.float32)
    b = tl.load(guide_ptr + row * guide_row_stride + token).to(tl.float32)
    z = _mixed_logits(a, b, plain_weight, guide_weight, inverse_temperature)
    if HAS_THRESHOLD:
        z = tl.where(z >= tl.load(threshold_ptr + row), z, -float("inf"))
    expert_lse = _weighted(plain_weight, a_lse) + _weighted(guide_weight, b_lse)
    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, tl.where(greedy, 0.0, z - z_lse))
    tl.store(plain_logprob_ptr + row, a * inverse_temperature - at_lse)
    tl.store(guide_logprob_ptr + row, b * inverse_temperature - bt_lse)
    tl.store(log_normalizer_ptr + row, tl.where(greedy, z, z_lse) - expert_lse * inverse_temperature)


def default_num_splits(rows: int, vocab: int, block_size: int, device: torch.device) -> int:
    """Splits per row so that a small batch still fills the GPU (PROGRAMS_PER_SM programs per SM); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = triton.cdiv(vocab, block_size)
    return max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * processors, rows)))


def launch_config(
    rows: int, vocab: int, device: torch.device, block_size: int | None = None, num_splits: int | None = None
) -> tuple[int, int, int]:
    """(BLOCK, number of splits, tokens per split) for a `[rows, vocab]` batch; validates the overrides."""
    block = block_size or min(DEFAULT_BLOCK_SIZE, triton.next_power_of_2(vocab))
    if block & (block - 1):
        raise ValueError(f"block_size must be a power of two, got {block}")
    blocks = triton.cdiv(vocab, block)
    splits = num_splits or default_num_splits(rows, vocab, block, device)
    if not 1 <= splits <= blocks:
        raise ValueError(f"num_splits must lie in [1, {blocks}] for V={vocab}, got {splits}")
    split_size = triton.cdiv(blocks, splits) * block
    return block, triton.cdiv(vocab, split_size), split_size  # rounding up the split size may empty the last splits


def _launchable(device: torch.device) -> bool:
    return device.type == "cuda" or triton.knobs.runtime.interpret


def triton_fused_sample(
    inputs: FusedInputs, *, block_size: int | None = None, num_splits: int | None = None, num_warps: int = 8
) -> ProductSample:
    """The fused pass of `prodsample.fused.reference_fused_sample`, as two Triton launches.

    `inputs` as `FusedInputs` says (logits of any row stride). `block_size` (a power of two) and `num_splits`
    default to DEFAULT_BLOCK_SIZE (capped at V's next power of two) and `default_num_splits` (`launch_config`).
    Returns a ProductSample of `[B]` tensors.
    """
    plain_logits, guide_logits, lam, temperature, threshold, keys = inputs
    device = plain_logits.device
    if not _launchable(device):
        raise ValueError(f"the Triton kernel needs a CUDA device or TRITON_INTERPRET=1; the logits are on {device}")
    if plain_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"plain_logits must be fp32, fp16 or bf16 for the Triton kernel, got {plain_logits.dtype}")
    if guide_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"guide_logits must be fp32, fp16 or bf16 for the Triton kernel, got {guide_logits.dtype}")
    rows, vocab = plain_logits.shape
    if rows == 0:  # an empty grid is no launch
        empty = torch.empty(0, device=device)
        return ProductSample(empty.long(), empty, empty, empty, empty)
    block, splits, split_size = launch_config(rows, vocab, device, block_size, num_splits)

    plain = plain_logits if plain_logits.stride(1) == 1 else plain_logits.contiguous()
    guide = guide_logits if guide_logits.stride(1) == 1 else guide_logits.contiguous()
    lam = lam.to(device=device, dtype=torch.float32).contiguous()
    temperature = temperature.to(device=device, dtype=torch.float32).contiguous()
    keys = keys.to(device=device, dtype=torch.int64).contiguous()
    has_threshold = threshold is not None
    threshold = threshold.to(device=device, dtype=torch.float32).contiguous() if has_threshold else lam

    stats = torch.empty(rows, splits, NUM_STATS, device=device, dtype=torch.float32)
    best_index = torch.empty(rows, splits, device=device, dtype=torch.int32)
    token_ids = torch.empty(rows, device=device, dtype=torch.int64)
    logprobs, plain_logprobs, guide_logprobs, log_normalizer = (
        torch.empty(rows, device=device, dtype=torch.float32) for _ in range(4)
    )
    _scan_kernel[(rows, splits)](
        plain, guide, plain.stride(0), guide.stride(0), lam, temperature, threshold, keys, stats, best_index,
        vocab, split_size, splits, HAS_THRESHOLD=has_threshold, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False,
    )
    _finish_kernel[(rows,)](
        plain, guide, plain.stride(0), guide.stride(0), lam, temperature, threshold, stats, best_index,
        token_ids, logprobs, plain_logprobs, guide_logprobs, log_normalizer,
        splits, SPLITS_BLOCK=triton.next_power_of_2(splits), HAS_THRESHOLD=has_threshold, num_warps=1,
        enable_fp_fusion=False,
    )
    return ProductSample(token_ids, logprobs, plain_logprobs, guide_logprobs, log_normalizer)
