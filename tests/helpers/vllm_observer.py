"""A read-only V1 logits processor that logs, step by step, where every tagged request stands: the ground
truth the desync tests compare prodsample's flags with, built without prodsample's pairing logic.

Loaded into a test engine with `logits_processors=["tests.helpers.vllm_observer:StepObserver"]`; the engine runs
in-process, so the log is this module's `LOG`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from prodsample.vllm.pairing import EXTRA_ARGS_KEY


@dataclass
class Log:
    # (rollout, role) → one (step, position) per step the request was scheduled in
    sightings: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    outputs: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # live output lists
    steps: int = 0

    def kept_at(self, request: tuple[str, str]) -> dict[int, int]:
        """Position → the step whose token the request kept there: its last sighting at that position (an
        earlier one was a prefill chunk, whose token the engine threw away)."""
        return {position: step for step, position in self.sightings[request] if position < len(self.outputs[request])}

    def in_step(self, rollout: str) -> bool:
        """Both requests kept every token of the completion in the same engine step, and the same tokens."""
        plain, guide = (rollout, "plain"), (rollout, "guide")
        if self.outputs[plain] != self.outputs[guide]:
            return False
        return self.kept_at(plain) == self.kept_at(guide)

    def repeated_positions(self) -> int:
        """Sightings of a request at a position it was already seen at: prefill chunks (or a recompute)."""
        return sum(len(s) - len({p for _, p in s}) for s in self.sightings.values())


LOG = Log()


class StepObserver(V1LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, tuple[tuple[str, str], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            extra = params.extra_args or {}
            if f"{EXTRA_ARGS_KEY}.rollout" not in extra:
                self.rows.pop(index, None)
                continue
            request = (extra[f"{EXTRA_ARGS_KEY}.rollout"], extra[f"{EXTRA_ARGS_KEY}.role"])
            LOG.outputs[request] = output
            self.rows[index] = (request, output)
        for source, target, direction in batch_update.moved:
            moving = self.rows.pop(source, None)
            if direction is MoveDirectionality.SWAP and target in self.rows:
                self.rows[source] = self.rows.pop(target)
            if moving is None:
                self.rows.pop(target, None)
            else:
                self.rows[target] = moving

    def apply(self, logits):
        LOG.steps += 1
        for request, output in self.rows.values():
            LOG.sightings[request].append((LOG.steps, len(output)))
        return logits
