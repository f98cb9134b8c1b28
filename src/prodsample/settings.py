"""How a batch of guided rollouts samples: λ, temperature and the filters, in one frozen object.

`SamplingSettings` is validated once, when it is built, with errors that name the argument; every backend
takes it from there (`prodsample.hf`, `prodsample.vllm`, and the engine-side tag `prodsample.vllm.pairing.
GuidanceTag`, which carries it as flat values). `check_sampling_values` is the one rule per setting, for
these settings and for the per-row tensors that `prodsample.product_sample` accepts.

Example:
    >>> from prodsample.settings import SamplingSettings
    >>> settings = SamplingSettings(lam=[0.25, 1.0], temperature=0.7, top_p=0.9)
    >>> settings.lam_per_rollout(num_prompts=2, num_generations=2).tolist()
    [0.25, 0.25, 1.0, 1.0]
    >>> settings.to_flat()
    {'lam': [0.25, 1.0], 'temperature': 0.7, 'top_k': 0, 'top_p': 0.9, 'min_p': 0.0}
    >>> SamplingSettings.from_flat(settings.to_flat()) == settings
    True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

__all__ = ["SamplingSettings", "check_sampling_values"]

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


def _integer(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


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
    """λ, temperature and the filters of a batch of rollouts, checked when built.

    Args:
        lam: λ ∈ [0, 1]: a float for every rollout, or a sequence (or tensor) with one value per prompt or
            one per rollout (`lam_per_rollout` expands it). 1 = the plain policy, 0 = the hinted one.
        temperature: ≥ 0, applied to q; 0 is greedy.
        top_k: an integer ≥ 0 (0 or None = off); top_p: in (0, 1] (1 or None = off); min_p: in [0, 1] (0 or
            None = off). Applied to q in the order top-k → top-p → min-p, as `prodsample.product_sample`.
        lam_per_position: the extension point for a λ that changes along the completion (one value per
            position). Not supported yet: anything but None raises ValueError.

    A field left at its off value is stored as that value (None becomes 0, 1.0 or 0.0), so two settings that
    sample alike compare equal.
    """

    lam: float | tuple[float, ...]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    lam_per_position: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.lam_per_position is not None:
            raise ValueError(
                "lam_per_position is not supported yet: λ is set per rollout (lam); leave lam_per_position None"
            )
        normalised = {
            "lam": _lam_values(self.lam),
            "temperature": _number(self.temperature, "temperature"),
            "top_k": 0 if self.top_k is None else _integer(self.top_k, "top_k"),
            "top_p": 1.0 if self.top_p is None else _number(self.top_p, "top_p"),
            "min_p": 0.0 if self.min_p is None else _number(self.min_p, "min_p"),
        }
        check_sampling_values(**normalised)
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def lam_per_rollout(self, num_prompts: int, num_generations: int) -> torch.Tensor:
        """λ of each of the num_prompts · num_generations rollouts (prompt-major), float32 `[R]`."""
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

    def sampler_kwargs(self) -> dict[str, float | int]:
        """temperature, top_k, top_p and min_p as keyword arguments of `prodsample.product_sample` and
        `prodsample.product_logprobs` (which take λ per row as their own argument)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}

    def to_flat(self) -> dict[str, FlatValue]:
        """The settings as a flat mapping of str, int, float and list values: what an engine request tag can
        carry (vLLM's `SamplingParams.extra_args`, and `vllm_xargs` over its HTTP server)."""
        flat: dict[str, FlatValue] = {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }
        if isinstance(self.lam, tuple):
            flat["lam"] = list(self.lam)
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, FlatValue]) -> SamplingSettings:
        """The settings `to_flat` wrote; unknown or missing keys and bad values raise ValueError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = set(flat) - names
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; expected some of {sorted(names)}")
        if "lam" not in flat:
            raise ValueError("sampling settings lack 'lam'")
        return cls(**flat)
