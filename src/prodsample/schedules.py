"""λ schedules: training step (and, for `Adaptive`, per-prompt history) → λ for each group of rollouts.

Every schedule reaches λ = 1 by its `end_step` and stays there, so the final policy trains with no help
from the answer; one that would not (a `Constant` without an end, a `Piecewise` ending below 1) warns.
Schedules are small frozen dataclasses that round-trip through `to_dict` / `schedule_from_dict`, so a
trainer checkpoint restores them exactly.

    Constant(lam, end_step)            λ until end_step, then 1
    Linear(start, end_step)            start → 1, linearly
    Cosine(start, end_step)            start → 1 along a half cosine (slow at both ends)
    Exponential(start, end_step, rate) 1 − λ decays like exp(−rate·progress), reaching exactly 0 at the end
    Piecewise(points)                  linear between (step, λ) points, flat after the last
    Adaptive(base, ...)                base(step) for prompts that need help, 1 for the rest (see its doc)

All take `begin_step` (λ holds at its start value before it) except Piecewise and Adaptive.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import ClassVar

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Exponential",
    "Piecewise",
    "Adaptive",
    "PromptRecord",
    "schedule_from_dict",
]

_REGISTRY: dict[str, type[Schedule]] = {}


def _check_lam(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class PromptRecord:
    """What the controller remembers of a prompt: its last group's λ and reward rate."""

    lam: float
    success_rate: float
    step: int


class Schedule:
    """Base class. Subclasses implement `value(step)`; `group_lambdas` applies it to each group."""

    kind: ClassVar[str]
    end_step: int | None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # abstract intermediates (no kind of their own) are not registered
            _REGISTRY[cls.kind] = cls

    def value(self, step: int) -> float:
        raise NotImplementedError

    def group_lambdas(self, step: int, records: list[PromptRecord | None]) -> list[float]:
        """λ for each group at `step`; `records` is each group's prompt history (unused here)."""
        return [self.value(step)] * len(records)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def _warn_if_never_plain(self) -> None:
        if self.end_step is None:
            warnings.warn(
                f"{type(self).__name__} schedule never reaches lam = 1: the policy keeps training on guided "
                "rollouts and never learns without the answer's help; set end_step",
                stacklevel=3,
            )


def schedule_from_dict(data: dict) -> Schedule:
    """Rebuild a schedule from `Schedule.to_dict()` output."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[kind].from_dict(data)


@dataclass(frozen=True)
class _Annealed(Schedule):
    """start at begin_step → 1 at end_step, shape from `_shape(progress)` (0 → 0, 1 → 1)."""

    start: float = 0.5
    end_step: int = 1000
    begin_step: int = 0

    def __post_init__(self):
        _check_lam(self.start, "start")
        if not 0 <= self.begin_step < self.end_step:
            raise ValueError(f"need 0 <= begin_step < end_step, got begin_step={self.begin_step}, end_step={self.end_step}")

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls(**data)

    def _shape(self, progress: float) -> float:
        raise NotImplementedError

    def value(self, step: int) -> float:
        progress = min(max((step - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)
        return 1.0 if progress >= 1.0 else self.start + (1.0 - self.start) * self._shape(progress)


@dataclass(frozen=True)
class Linear(_Annealed):
    kind: ClassVar[str] = "linear"

    def _shape(self, progress: float) -> float:
        return progress


@dataclass(frozen=True)
class Cosine(_Annealed):
    kind: ClassVar[str] = "cosine"

    def _shape(self, progress: float) -> float:
        return (1.0 - math.cos(math.pi * progress)) / 2.0


@dataclass(frozen=True)
class Exponential(_Annealed):
    kind: ClassVar[str] = "exponential"
    rate: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")

    def _shape(self, progress: float) -> float:
        return (1.0 - math.exp(-self.rate * progress)) / (1.0 - math.exp(-self.rate))


@dataclass(frozen=True)
class Constant(Schedule):
    kind: ClassVar[str] = "constant"
    lam: float = 0.5
    end_step: int | None = None

    def __post_init__(self):
        _check_lam(self.lam, "lam")
        if self.lam < 1.0:
            self._warn_if_never_plain()

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls(**data)

    def value(self, step: int) -> float:
        return 1.0 if self.end_step is not None and step >= self.end_step else self.lam


@dataclass(frozen=True)
class Piecewise(Schedule):
    """Linear interpolation between (step, λ) points (steps increasing); the last λ holds after them."""

    kind: ClassVar[str] = "piecewise"
    points: tuple[tuple[int, float], ...] = ((0, 0.5), (1000, 1.0))

    def __post_init__(self):
        points = tuple((int(step), float(lam)) for step, lam in self.points)
        object.__setattr__(self, "points", points)
        if not points:
            raise ValueError("points must not be empty")
        for _, lam in points:
            _check_lam(lam, "points' lam")
        steps = [step for step, _ in points]
        if steps != sorted(set(steps)):
            raise ValueError(f"points' steps must be strictly increasing, got {steps}")
        if points[-1][1] < 1.0:
            self._warn_if_never_plain()

    @property
    def end_step(self) -> int | None:
        return self.points[-1][0] if self.points[-1][1] == 1.0 else None

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls(points=tuple(tuple(point) for point in data["points"]))

    def value(self, step: int) -> float:
        (first_step, first_lam), *rest = self.points
        if step <= first_step:
            return first_lam
        previous_step, previous_lam = first_step, first_lam
        for point_step, point_lam in rest:
            if step <= point_step:
                fraction = (step - previous_step) / (point_step - previous_step)
                return previous_lam + fraction * (point_lam - previous_lam)
            previous_step, previous_lam = point_step, point_lam
        return previous_lam


@dataclass(frozen=True)
class Adaptive(Schedule):
    """Guide only the prompts that need it; the others get λ = 1.

    mode="history" (a fixed training set seen over several epochs): a prompt gets `base.value(step)` when
    it has no record yet, when its last plain group (λ = 1) had a success rate ≤ `solved_rate`, or when its
    last guided group had a success rate ≤ `release_rate`; otherwise λ = 1.

    mode="probe" (Guide-GRPO style): every group is first sampled plain (λ = 1); groups whose success rate is
    ≤ `solved_rate` are sampled again with `base.value(step)` (see `GuidanceController.followup_lambdas`).

    After `base.end_step` every group is plain.
    """

    kind: ClassVar[str] = "adaptive"
    base: Schedule = field(default_factory=lambda: Linear())
    mode: str = "history"
    solved_rate: float = 0.0
    release_rate: float = 0.5

    def __post_init__(self):
        if self.mode not in ("history", "probe"):
            raise ValueError(f"mode must be 'history' or 'probe', got {self.mode!r}")
        _check_lam(self.solved_rate, "solved_rate")
        _check_lam(self.release_rate, "release_rate")

    @property
    def end_step(self) -> int | None:
        return self.base.end_step

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "base": self.base.to_dict(),
            "mode": self.mode,
            "solved_rate": self.solved_rate,
            "release_rate": self.release_rate,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls(**{**data, "base": schedule_from_dict(data["base"])})

    def value(self, step: int) -> float:
        return self.base.value(step)

    def needs_guidance(self, record: PromptRecord | None) -> bool:
        if record is None:
            return True
        if record.lam >= 1.0:
            return record.success_rate <= self.solved_rate
        return record.success_rate <= self.release_rate

    def group_lambdas(self, step: int, records: list[PromptRecord | None]) -> list[float]:
        guided = self.base.value(step)
        if self.mode == "probe" or guided >= 1.0:
            return [1.0] * len(records)
        return [guided if self.needs_guidance(record) else 1.0 for record in records]
