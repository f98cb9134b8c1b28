"""How a call samples guided rollouts, in one frozen object: λ, G, the length, temperature and filters,
the seed and the hint template.

`SamplingSettings` is to prodsample what `SamplingParams` is to vLLM: every entry point takes one
(`prodsample.hf.guided_generate` and `score`, `prodsample.vllm.GuidedLLM.generate`, the server clients,
the verl agent loop and the TRL backends), and it is validated once, when it is built, with errors that name
the argument. Its flat form (`to_flat`) is what an engine request's tag carries
(`prodsample.vllm.pairing.GuidanceTag`). The small rules every module shares live here too: one
`check_sampling_values` per setting (also for the per-row tensors of `prodsample.product_sample`), one
`check_integer`, one `is_guided`, one `draw_seed`.

Example:
    >>> from prodsample.settings import SamplingSettings
    >>> settings = SamplingSettings(lam=[0.25, 1.0], num_generations=2, temperature=0.7, top_p=0.9, seed=0)
    >>> settings.lam_per_rollout(num_prompts=2).tolist()
    [0.25, 0.25, 1.0, 1.0]
    >>> settings.to_flat()   # what an engine request's tag carries
    {'lam': [0.25, 1.0], 'temperature': 0.7, 'top_k': 0, 'top_p': 0.9, 'min_p': 0.0}
    >>> SamplingSettings.from_flat(settings.to_flat()) == settings.draw_settings()
    True
    >>> SamplingSettings.build(settings, lam=1.0).lam   # a copy with some fields changed
    1.0
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .prompts import DEFAULT_HINT_TEMPLATE, check_hint_template

__all__ = ["SamplingSettings", "check_sampling_values", "check_integer", "is_guided", "draw_seed", "SEED_BOUND"]

# What an engine's draw needs, and so what a request's tag carries (`SamplingSettings.to_flat`).
DRAW_FIELDS = ("lam", "temperature", "top_k", "top_p", "min_p", "guide_prefix_tokens")

# Seeds drawn here lie in [0, SEED_BOUND): the keyed noise mixes them with 64-bit row keys without overflow.
SEED_BOUND = 2**62

FlatValue = str | int | float | list


def _check_range(value, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    tensor = torch.as_tensor(value, dtype=torch.float64)
    below = tensor <= low if low_open else tensor < low
    if torch.isnan(tensor).any() or below.any() or (tensor > high).any():
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {interval}, got {value if tensor.dim() == 0 else tensor.tolist()}")


def check_sampling_values(*, lam=None, temperature=None, top_k=None, top_p=None, min_p=None) -> None:
    """Raise ValueError naming the first setting out of range. Each is a number, a sequence or a tensor of
    per-row values, or None (not given / off)."""
    if lam is not None:
        _check_range(lam, "lam", 0.0, 1.0)
    if temperature is not None:
        _check_range(temperature, "temperature", 0.0, math.inf)
    if top_k is not None:
        values = torch.as_tensor(top_k)
        if values.is_floating_point() or values.dtype == torch.bool or (values < 0).any():
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if top_p is not None:
        _check_range(top_p, "top_p", 0.0, 1.0, low_open=True)
    if min_p is not None:
        _check_range(min_p, "min_p", 0.0, 1.0)


def _number(value, name: str) -> float:
    if value is None or isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _top_k(value) -> int:
    """top_k as an int; one beyond int64 is refused here, since samplers hold it in int64 tensors."""
    value = check_integer(value, "top_k")
    if value >= 2**63:
        raise ValueError(f"top_k must be below 2**63 (it is held as int64; any value >= the vocabulary is off), got {value}")
    return value


def check_integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high) (a missing bound is no bound); else ValueError naming `name`. A bool
    is not an integer here, though Python counts it as one."""
    if low == 1 and high is None:
        expected = "a positive integer"
    elif high is not None:
        expected = f"an integer in [{low}, {high})"
    else:
        expected = "an integer" if low is None else f"an integer >= {low}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def is_guided(lam):
    """Whether a rollout at λ is guided (draws from the hinted context at all): λ < 1. A float gives a bool, a
    tensor of per-row λ a bool tensor."""
    return lam < 1


def draw_seed() -> int:
    """A noise seed in [0, SEED_BOUND) from torch's global RNG (so `torch.manual_seed` reproduces it)."""
    return int(torch.randint(0, SEED_BOUND, ()))


def _lam_values(value) -> float | tuple[float, ...]:
    """λ as one float, or a tuple of floats (one per prompt or one per rollout)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise ValueError(f"lam must be a float or a sequence of floats, got {value!r}")
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"lam must be a float or a sequence of floats, got {value!r}") from None
    if values.dim() == 0:
        return float(values)
    if values.numel() == 0:
        raise ValueError("lam must hold at least one value")
    return tuple(values.flatten().tolist())


@dataclass(frozen=True)
class SamplingSettings:
    """How one call samples guided rollouts, checked when built.

    Args:
        lam: λ ∈ [0, 1]: a float for every rollout, or a sequence (or tensor) with one value per prompt or
            one per rollout (`lam_per_rollout` expands it). 1 = the plain policy, 0 = the hinted one.
        temperature: ≥ 0, applied to q; 0 is greedy.
        top_k: an integer ≥ 0 (0 or None = off); top_p: in (0, 1] (1 or None = off); min_p: in [0, 1] (0 or
            None = off). Applied to q in the order top-k → top-p → min-p, as `prodsample.product_sample`.
        num_generations: G ≥ 1 rollouts per prompt, prompt-major (rollout r = i·G + g).
        max_new_tokens: ≥ 1 tokens at most per rollout (16 when not given, as vLLM's `max_tokens`).
        seed: the keyed noise's seed (an integer ≥ 0), or None: each call draws one (`draw_seed`).
        hint_template: how the answer joins the prompt (`prodsample.prompts.add_hint`).
        guide_prefix_tokens: k ≥ 0: the first k tokens of every guided rollout (λ < 1) are drawn at λ = 0,
            from the hinted context alone, and the rest at the rollout's λ (`lam_at`); a λ = 1 rollout stays
            plain throughout. Every token's log q is recorded at the λ it was drawn with.

    A field left at its off value is stored as that value (None becomes 0, 1.0 or 0.0), so two settings that
    sample alike compare equal.
    """

    lam: float | tuple[float, ...]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    num_generations: int = dataclasses.field(default=1, kw_only=True)
    max_new_tokens: int = dataclasses.field(default=16, kw_only=True)
    seed: int | None = dataclasses.field(default=None, kw_only=True)
    hint_template: str = dataclasses.field(default=DEFAULT_HINT_TEMPLATE, kw_only=True)
    guide_prefix_tokens: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        normalised = {
            "lam": _lam_values(self.lam),
            "temperature": _number(self.temperature, "temperature"),
            "top_k": 0 if self.top_k is None else _top_k(self.top_k),  # its lower bound: below
            "top_p": 1.0 if self.top_p is None else _number(self.top_p, "top_p"),
            "min_p": 0.0 if self.min_p is None else _number(self.min_p, "min_p"),
        }
        check_sampling_values(**normalised)
        normalised["num_generations"] = check_integer(self.num_generations, "num_generations", low=1)
        normalised["max_new_tokens"] = check_integer(self.max_new_tokens, "max_new_tokens", low=1)
        normalised["guide_prefix_tokens"] = check_integer(self.guide_prefix_tokens, "guide_prefix_tokens", low=0)
        if self.seed is not None:
            normalised["seed"] = check_integer(self.seed, "seed", low=-(2**63), high=2**63)
        check_hint_template(self.hint_template)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, settings: SamplingSettings | None = None, **changes) -> SamplingSettings:
        """`settings` with `changes` applied, or new settings from `changes` alone: how an entry point that
        takes `settings=` and keyword overrides (as `transformers`' `generate` takes a generation config and
        keywords) turns them into one object."""
        if settings is None:
            if "lam" not in changes:
                raise ValueError("lam is required: pass settings=SamplingSettings(lam=...) or lam=...")
            return cls(**changes)
        if not isinstance(settings, SamplingSettings):
            raise TypeError(f"settings must be a prodsample.settings.SamplingSettings, got {type(settings).__name__}")
        return dataclasses.replace(settings, **changes) if changes else settings

    def with_seed(self) -> SamplingSettings:
        """These settings with a seed: their own, or one drawn now (`draw_seed`)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=draw_seed())

    def lam_per_rollout(self, num_prompts: int, num_generations: int | None = None) -> torch.Tensor:
        """λ of each of the num_prompts · G rollouts (prompt-major), float32 `[R]`; G is `num_generations`
        unless given."""
        num_generations = self.num_generations if num_generations is None else num_generations
        rollouts = num_prompts * num_generations
        values = torch.tensor(self.lam, dtype=torch.float32).flatten()
        if values.numel() == 1:
            return values.expand(rollouts).contiguous()
        if values.numel() == num_prompts:
            return values.repeat_interleave(num_generations)
        if values.numel() == rollouts:
            return values
        raise ValueError(
            f"lam must be a float, one value per prompt ({num_prompts}) or one per rollout ({rollouts}), "
            f"got {values.numel()} values"
        )

    def lam_at(self, lam, positions) -> torch.Tensor:
        """The λ each token is drawn with: 0 at positions below `guide_prefix_tokens` of a guided rollout, the
        rollout's λ elsewhere. `lam` (per row) and `positions` (completion indices) broadcast together.

        >>> SamplingSettings(lam=0.5, guide_prefix_tokens=2).lam_at(torch.tensor([0.5, 1.0]), 1).tolist()
        [0.0, 1.0]
        """
        lam, positions = torch.as_tensor(lam), torch.as_tensor(positions, device=torch.as_tensor(lam).device)
        return torch.where(is_guided(lam) & (positions < self.guide_prefix_tokens), torch.zeros_like(lam), lam)

    def sampler_kwargs(self) -> dict[str, float | int]:
        """temperature, top_k, top_p and min_p as keyword arguments of `prodsample.product_sample` and
        `prodsample.product_logprobs` (which take λ per row as their own argument)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}

    def to_flat(self) -> dict[str, FlatValue]:
        """The fields an engine's draw needs (`DRAW_FIELDS`) as a flat mapping of int, float and list values:
        what an engine request's tag carries (vLLM's `SamplingParams.extra_args`, and `vllm_xargs` over its
        HTTP server). G, the length, the seed and the hint template stay with the caller."""
        flat: dict[str, FlatValue] = {name: getattr(self, name) for name in DRAW_FIELDS}
        if not self.guide_prefix_tokens:  # left out at 0, so a call without a prefix tags as before it existed
            del flat["guide_prefix_tokens"]
        if isinstance(self.lam, tuple):
            flat["lam"] = list(self.lam)
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, FlatValue]) -> SamplingSettings:
        """The settings `to_flat` wrote; unknown or missing keys and bad values raise ValueError naming them."""
        unknown = set(flat) - set(DRAW_FIELDS)
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; expected some of {sorted(DRAW_FIELDS)}")
        if "lam" not in flat:
            raise ValueError("sampling settings lack 'lam'")
        return cls(**flat)

    def draw_settings(self) -> SamplingSettings:
        """Only what the draw needs (`DRAW_FIELDS`), the rest at defaults: what a request's tag holds."""
        return SamplingSettings.from_flat(self.to_flat())
