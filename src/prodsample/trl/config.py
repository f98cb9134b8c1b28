"""`GuidedGRPOConfig`: TRL's `GRPOConfig` with the guidance settings, saved, printed and parsed like the rest.

The schedule and the self-distillation coefficient are stored as mappings (a `Schedule` or
`DistillCoefficient` given in Python is turned into one), so that the config stays what TRL saves to JSON and
reads from the command line or YAML (`trl.TrlParser`):

    --guidance_schedule '{"kind": "linear", "start": 0.5, "end_step": 200}' --off_policy token_truncate
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import GRPOConfig

from ..grpo import DEFAULT_DISTILL_CLIP, DistillCoefficient
from ..prompts import DEFAULT_HINT_TEMPLATE, check_hint_template
from ..schedules import Adaptive, Schedule, schedule_from_dict
from ..settings import SamplingSettings, check_integer
from .backends import ROLLOUT_BACKENDS
from .off_policy import DEFAULT_OFF_POLICY_MODE, OFF_POLICY_MODES

__all__ = ["GuidedGRPOConfig"]


def _mapping(value, name: str) -> dict | None:
    """A JSON string (the command line's form) or a mapping, as a dict; None stays None."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} must be a mapping or its JSON, got {value!r} ({error})") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"{name} must be a mapping or its JSON, got {value!r}")


@dataclass
class GuidedGRPOConfig(GRPOConfig):
    """`GRPOConfig` for `GuidedGRPOTrainer`: every GRPO setting, and how rollouts are guided and trained on.

    The sampling settings (temperature, top_k, top_p, min_p, max_completion_length, num_generations) are
    GRPOConfig's own. docs/trl.md gives each off-policy mode's math and the self-distillation signal.
    """

    guidance_schedule: dict | str | None = field(
        default=None,
        metadata={"help": "The λ schedule as a mapping (`prodsample.schedules.Schedule.to_dict`), e.g. "
                  '{"kind": "linear", "start": 0.5, "end_step": 200}: λ per group at each step; required.'},
    )
    answer_column: str = field(
        default="answer", metadata={"help": "The dataset column holding each prompt's answer (the hint)."}
    )
    guidance_backend: str = field(
        default="hf",
        metadata={"help": "Who samples the rollouts: 'hf' (the trained model), 'vllm' (TRL's colocated engine) "
                  "or 'server' (a vLLM server running prodsample, TRL's server mode)."},
    )
    hint_template: str = field(
        default=DEFAULT_HINT_TEMPLATE,
        metadata={"help": "How the answer joins the prompt: a template with {prompt} and {answer}."},
    )
    guided_per_group: int | None = field(
        default=None,
        metadata={"help": "None: every rollout of a group shares its λ. k: only the first k rollouts of each "
                  "group are guided, the rest plain (LUFFY-style mixing)."},
    )
    guide_prefix_tokens: int = field(
        default=0,
        metadata={"help": "k: the first k tokens of every guided rollout are drawn at λ = 0 (from the hinted "
                  "context), the rest at the schedule's λ; log q and log π are recorded for every token."},
    )
    mask_guide_prefix: bool = field(
        default=True,
        metadata={"help": "Keep the guided prefix out of the policy loss (True, as POPE masks its oracle prefix "
                  "and QuestA never trains on the given part), or train on it with its off-policy weights."},
    )
    off_policy: str = field(
        default=DEFAULT_OFF_POLICY_MODE,
        metadata={"help": f"The off-policy mode, one of {sorted(OFF_POLICY_MODES)} (docs/trl.md)."},
    )
    luffy_gamma: float = field(default=0.1, metadata={"help": "γ of the 'luffy_shaping' mode."})
    baseline_keeping_truncate: float | None = field(
        default=None,
        metadata={"help": "c ≥ 1 of the 'baseline_keeping' mode (w̃ cut at c/G and renormalised), or None."},
    )
    self_distill: dict | str | None = field(
        default=None,
        metadata={"help": "The self-distillation coefficient β(step) as a mapping {start: β₀, shape: schedule "
                  "mapping} (`prodsample.grpo.DistillCoefficient`); it must reach 0 by max_steps. None: off."},
    )
    distill_clip: float | None = field(
        default=None,
        metadata={"help": "The bound on the self-distillation advantage |a_t| (default "
                  f"{DEFAULT_DISTILL_CLIP}); with self_distill only."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.guidance_schedule, Schedule):
            self.guidance_schedule = self.guidance_schedule.to_dict()
        if isinstance(self.self_distill, DistillCoefficient):
            self.self_distill = {"start": self.self_distill.start, "shape": self.self_distill.shape}
        self.guidance_schedule = _mapping(self.guidance_schedule, "guidance_schedule")
        self.self_distill = _mapping(self.self_distill, "self_distill")
        if self.guidance_schedule is None:
            raise ValueError(
                "guidance_schedule is required: the λ schedule as a mapping, e.g. "
                '{"kind": "linear", "start": 0.5, "end_step": 200}, or a prodsample.schedules.Schedule'
            )
        self.guidance_schedule = self.schedule().to_dict()  # checked, and in the form the schedule saves
        if isinstance(self.schedule(), Adaptive) and self.schedule().mode == "probe":
            raise ValueError(
                "Adaptive(mode='probe') resamples groups after scoring them, which TRL's rollout_func contract (one "
                "completion per prompt entry, scored afterwards) cannot express; use Adaptive(mode='history')"
            )
        if self.guidance_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"guidance_backend must be one of {sorted(ROLLOUT_BACKENDS)}, got {self.guidance_backend!r}")
        if not self.answer_column:
            raise ValueError("answer_column must name the dataset column that holds the answers")
        check_hint_template(self.hint_template)
        check_integer(self.guide_prefix_tokens, "guide_prefix_tokens", low=0)
        if self.guided_per_group is not None:
            check_integer(self.guided_per_group, "guided_per_group", low=1)
        if self.off_policy not in OFF_POLICY_MODES:
            raise ValueError(f"off_policy must be one of {tuple(OFF_POLICY_MODES)}, got {self.off_policy!r}")
        if not self.luffy_gamma > 0:
            raise ValueError(f"luffy_gamma must be > 0, got {self.luffy_gamma}")
        if self.baseline_keeping_truncate is not None and self.off_policy != "baseline_keeping":
            raise ValueError(
                "baseline_keeping_truncate applies to off_policy='baseline_keeping' only, got "
                f"off_policy={self.off_policy!r}"
            )
        if self.baseline_keeping_truncate is not None and not self.baseline_keeping_truncate >= 1.0:
            raise ValueError(
                f"baseline_keeping_truncate must be >= 1 (w̃ is cut at c/G), got {self.baseline_keeping_truncate}"
            )
        coefficient = self.distill_coefficient()  # raises on a malformed mapping
        if coefficient is not None:
            self.self_distill = {"start": coefficient.start, "shape": coefficient.shape.to_dict()}
        if self.distill_clip is not None and self.self_distill is None:
            raise ValueError("distill_clip bounds the self-distillation advantage: it needs self_distill")
        if self.distill_clip is not None and not self.distill_clip > 0:
            raise ValueError(f"distill_clip must be > 0, got {self.distill_clip}")

    def sampling_settings(self, **per_call) -> SamplingSettings:
        """The `SamplingSettings` of one rollout call: this config's length, temperature, filters and hint
        template, with `per_call`'s fields (λ, G, seed)."""
        return SamplingSettings(
            max_new_tokens=self.max_completion_length, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, min_p=self.min_p, hint_template=self.hint_template,
            guide_prefix_tokens=self.guide_prefix_tokens, **per_call,
        )

    def schedule(self) -> Schedule:
        """`guidance_schedule` as a `prodsample.schedules.Schedule`."""
        return schedule_from_dict(dict(self.guidance_schedule))

    def distill_coefficient(self) -> DistillCoefficient | None:
        """`self_distill` as a `prodsample.grpo.DistillCoefficient`, or None."""
        if self.self_distill is None:
            return None
        unknown = set(self.self_distill) - {"start", "shape"}
        if unknown or "shape" not in self.self_distill:
            raise ValueError(f"self_distill must be a mapping {{start, shape}}, got {self.self_distill!r}")
        shape = self.self_distill["shape"]
        return DistillCoefficient(
            start=float(self.self_distill.get("start", 0.0)),
            shape=shape if isinstance(shape, Schedule) else schedule_from_dict(dict(shape)),
        )

    def distill_bound(self) -> float:
        """The bound on |a_t| of the self-distillation advantage."""
        return DEFAULT_DISTILL_CLIP if self.distill_clip is None else self.distill_clip
