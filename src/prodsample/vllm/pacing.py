"""Pacing: the driver that keeps the two requests of each guided pair in step on an engine stepped from outside.

An engine without multi-context decoding runs a guided rollout as two requests (`prodsample.vllm.pairing`), and
the pair stays in step only if both requests enter the same step whole and neither is preempted before the
end. An engine built by others (TRL's colocate `vllm.LLM`, say) takes no custom scheduler, so `PacedDriver`
does this from outside: it steps the engine itself and, between steps, admits a rollout's requests only
while the next step can prefill all of them and the KV cache can hold every admitted request at full
length. A pair that falls out of step anyway is flagged by the pairing, never silent: `settle` reads the
flags back into `RolloutOutcome`s, `GenerationStats` counts them.

Nothing here imports an engine. A driver reaches the engine through `SteppedEngine`, which an adapter
implements (`prodsample.vllm` over `vllm.LLM.llm_engine`; the tests over a fake engine):

  limits()                   `EngineLimits`: requests and prefill tokens per step, KV-cache blocks, block size
  add_request(request)       queue one `EngineRequest` (prompt token ids, max new tokens, `GuidanceTag`) for the
                             next step; the engine stops a request at max_new_tokens or at the tag's release token
  step()                     run one scheduler step; returns the requests that finished in it, as
                             `FinishedRequest`s (others the engine also runs may be among them)
  abort(request_ids)         drop requests; ids the engine does not hold are ignored
  has_unfinished_requests()  whether the engine still holds any request

A driver is anything with `PacedDriver.run`'s signature (`RolloutDriver`). An engine that keeps pairs
together by itself (vLLM with `prodsample.vllm.scheduler.PairedScheduler`) gets `AdmitAll`, which adds every
rollout at once and leaves the pacing to the engine's scheduler.
"""

from __future__ import annotations

import warnings
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

from ..settings import check_integer
from .pairing import DesyncCause, GuidanceTag, Role, RolloutRecord

__all__ = [
    "EngineLimits",
    "EngineRequest",
    "RolloutRequests",
    "FinishedRequest",
    "SteppedEngine",
    "DriveResult",
    "RolloutDriver",
    "PacedDriver",
    "AdmitAll",
    "check_pairs_fit",
    "RolloutOutcome",
    "settle",
    "RECORD_LOSS_HELP",
    "warn_record_losses",
    "GenerationStats",
]


@dataclass(frozen=True)
class EngineLimits:
    """What one engine step can take: requests, prefill tokens, and KV-cache blocks."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks: int
    block_size: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size"):
            check_integer(getattr(self, name), f"EngineLimits.{name}", low=1)

    def blocks(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV-cache blocks one request holds at full length."""
        return -(-(prompt_len + max_new_tokens) // self.block_size)


@dataclass(frozen=True)
class EngineRequest:
    """One request of a guided rollout, as a driver hands it to the engine."""

    prompt_token_ids: list[int]
    max_new_tokens: int
    tag: GuidanceTag

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: prompt_token_ids is empty")
        check_integer(self.max_new_tokens, "max_new_tokens", low=1)

    @property
    def request_id(self) -> str:
        return f"prodsample-{self.tag.rollout}-{self.tag.role.value}"


@dataclass(frozen=True)
class RolloutRequests:
    """The requests of one rollout, admitted together: (guide, plain) when its λ < 1, (plain,) when λ = 1.

    Guide first: under a first-come-first-served scheduler a prefill can only be cut at the end of the
    step's budget, so if either is cut it is the later one, and the plain row never keeps a token drawn
    with a half-prefilled guide context.
    """

    requests: tuple[EngineRequest, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        roles = [request.tag.role for request in self.requests]
        expected = [Role.GUIDE, Role.PLAIN] if self.plain.tag.paired else [Role.PLAIN]
        if roles != expected:
            raise ValueError(
                f"rollout {self.name!r} with lam = {self.plain.tag.settings.lam} needs requests with roles "
                f"{[role.value for role in expected]} in this order, got {[role.value for role in roles]}"
            )
        if self.paired:
            guide, plain = self.requests
            if replace(guide.tag, role=Role.PLAIN) != plain.tag or guide.max_new_tokens != plain.max_new_tokens:
                raise ValueError(
                    f"rollout {self.name!r}: the guide and plain requests differ in more than role and prompt"
                )

    @property
    def plain(self) -> EngineRequest:
        if not self.requests:
            raise ValueError("a rollout needs at least its plain request, got no requests")
        return self.requests[-1]

    @property
    def guide(self) -> EngineRequest | None:
        return self.requests[0] if self.paired else None

    @property
    def name(self) -> str:
        return self.plain.tag.rollout

    @property
    def paired(self) -> bool:
        return len(self.requests) == 2

    @property
    def prompt_tokens(self) -> int:
        return sum(len(request.prompt_token_ids) for request in self.requests)

    def blocks(self, limits: EngineLimits) -> int:
        return sum(limits.blocks(len(r.prompt_token_ids), r.max_new_tokens) for r in self.requests)


class FinishedRequest(NamedTuple):
    request_id: str
    token_ids: Sequence[int]  # the completion: every token the request kept, the stop token included


class SteppedEngine(Protocol):
    """An engine driven step by step from outside (the table in this module's docstring)."""

    def limits(self) -> EngineLimits: ...

    def add_request(self, request: EngineRequest) -> None: ...

    def step(self) -> Iterable[FinishedRequest]: ...

    def abort(self, request_ids: Sequence[str]) -> None: ...

    def has_unfinished_requests(self) -> bool: ...


class DriveResult(NamedTuple):
    completions: dict[str, list[int]]  # request id → the tokens it returned, for every request of every rollout
    engine_steps: int


class RolloutDriver(Protocol):
    def run(self, engine: SteppedEngine, rollouts: Sequence[RolloutRequests]) -> DriveResult: ...


class PacedDriver:
    """Steps an engine until every request of every rollout has finished, admitting rollouts in order
    between steps only while the next step can take all of their requests whole:

    - running + new requests ≤ `max_num_seqs`;
    - one decode token per running request + the new prompts' tokens ≤ `max_num_batched_tokens` (no prompt
      is chunked);
    - KV blocks of every admitted rollout at full length (prompt + max_new_tokens) ≤ `kv_blocks` (nothing
      is preempted); a rollout holds its blocks until its last request finishes.

    Rollouts that do not fit wait for running ones to finish; one too big for an empty engine runs alone
    (and may be flagged). A subclass changes the admission by overriding `admit`.
    """

    def run(self, engine: SteppedEngine, rollouts: Sequence[RolloutRequests]) -> DriveResult:
        """Completions by request id. On any error, and on an interrupt, aborts the requests in flight."""
        repeated = sorted(name for name, count in Counter(r.name for r in rollouts).items() if count > 1)
        if repeated:
            raise ValueError(f"rollouts must have distinct names (their tags' rollout), got {repeated[:3]} repeated")
        limits = engine.limits()
        waiting = deque(rollouts)
        in_flight: dict[str, RolloutRequests] = {}  # request id → its rollout
        completions: dict[str, list[int]] = {}
        steps = 0
        try:
            while waiting or in_flight:
                self._add(engine, self._admitted(waiting, in_flight, limits), in_flight)
                for finished in engine.step():
                    if in_flight.pop(finished.request_id, None) is not None:
                        completions[finished.request_id] = list(finished.token_ids)
                steps += 1
                if in_flight and not engine.has_unfinished_requests():
                    raise RuntimeError(
                        f"the engine dropped {sorted(in_flight)[:4]} without finishing them (aborted from outside "
                        "the driver?)"
                    )
        except BaseException:
            engine.abort(list(in_flight))
            raise
        return DriveResult(completions, steps)

    def _admitted(self, waiting: deque, in_flight: dict[str, RolloutRequests], limits) -> list[RolloutRequests]:
        count = self.admit(waiting, in_flight, limits)
        if not 0 <= count <= len(waiting) or (count == 0 and not in_flight):
            raise RuntimeError(
                f"{type(self).__name__}.admit chose {count} of {len(waiting)} waiting rollouts with "
                f"{len(in_flight)} requests running: it must choose at most those waiting, and at least one "
                "when nothing runs"
            )
        return [waiting.popleft() for _ in range(count)]

    @staticmethod
    def _add(engine: SteppedEngine, rollouts: list[RolloutRequests], in_flight: dict[str, RolloutRequests]) -> None:
        for rollout in rollouts:
            for request in rollout.requests:
                in_flight[request.request_id] = rollout  # first, so that a failed add still aborts the pair
                engine.add_request(request)

    def admit(
        self, waiting: Sequence[RolloutRequests], running: Mapping[str, RolloutRequests], limits: EngineLimits
    ) -> int:
        """How many rollouts from the front of `waiting` to add before the next step. `running`: request id →
        rollout, for every request in the engine that has not finished."""
        seqs = len(running)
        step_tokens = seqs  # each running request decodes one token next step
        blocks = sum(rollout.blocks(limits) for rollout in {r.name: r for r in running.values()}.values())
        admitted = 0
        for rollout in waiting:
            fits = (
                seqs + len(rollout.requests) <= limits.max_num_seqs
                and step_tokens + rollout.prompt_tokens <= limits.max_num_batched_tokens
                and blocks + rollout.blocks(limits) <= limits.kv_blocks
            )
            if not fits and seqs > 0:
                break  # wait for running rollouts to finish (a rollout too big for an empty engine goes alone)
            admitted += 1
            seqs += len(rollout.requests)
            step_tokens += rollout.prompt_tokens
            blocks += rollout.blocks(limits)
        return admitted


class AdmitAll(PacedDriver):
    """Adds every rollout before the first step, for an engine whose scheduler admits the two requests of a
    pair together by itself. Such a scheduler cannot keep in step a pair whose prompts exceed one step's
    prefill budget, so those are refused here, before anything reaches the engine."""

    def run(self, engine: SteppedEngine, rollouts: Sequence[RolloutRequests]) -> DriveResult:
        check_pairs_fit(rollouts, engine.limits().max_num_batched_tokens)
        return super().run(engine, rollouts)

    def admit(
        self, waiting: Sequence[RolloutRequests], running: Mapping[str, RolloutRequests], limits: EngineLimits
    ) -> int:
        return len(waiting)


def check_pairs_fit(rollouts: Sequence[RolloutRequests], max_num_batched_tokens: int) -> None:
    """Raise ValueError if the two prompts of a pair exceed what one engine step prefills: no scheduler keeps
    such a pair in step (prodsample's refuses it)."""
    too_long = [rollout for rollout in rollouts if rollout.paired and rollout.prompt_tokens > max_num_batched_tokens]
    if too_long:
        raise ValueError(
            f"the prompts of rollout {too_long[0].name!r} (guide + plain) hold {too_long[0].prompt_tokens} tokens, "
            f"more than one engine step prefills (max_num_batched_tokens = {max_num_batched_tokens}), so the pair "
            f"could not be kept in step ({len(too_long)} such rollouts); raise max_num_batched_tokens or shorten "
            "the prompts"
        )


class RolloutOutcome(NamedTuple):
    """What became of one rollout."""

    completion: list[int]  # the plain request's tokens: the rollout's completion
    record: RolloutRecord
    paired: bool  # λ < 1: ran as two requests
    cause: str | None  # why the pair lost step (a DesyncCause value); None if it never did

    @property
    def desynced(self) -> bool:
        return self.cause is not None

    @property
    def records_lost(self) -> bool:
        """Its records are lost (`RECORD_LOSS_HELP`): its log q is unknown, so none of its tokens may enter a
        loss; a trainer masks it like padding (`GuidedRollout.masked`, verl's response mask)."""
        return self.cause in RECORD_LOSS_HELP


# What a rollout whose records are lost (`RECORD_LOSSES`) means for a trainer, for warnings and errors.
RECORD_LOSS_HELP = {
    DesyncCause.RECORD_EVICTED.value: "the engine forgot its records after record_ttl_s while the rollout was still "
    "running (preempted longer than that): raise record_ttl_s",
    DesyncCause.RECORD_MISSING.value: "the engine returned no records for it (forgotten after record_ttl_s before "
    "they were read, or its requests never reached prodsample's logits processor)",
    DesyncCause.RECORD_MISMATCH.value: "its records hold other tokens than the engine returned (something after "
    "prodsample's logits processor changed the logits of tagged requests)",
}


def settle(
    rollouts: Sequence[RolloutRequests], completions: Mapping[str, list[int]], records: Mapping[str, RolloutRecord]
) -> list[RolloutOutcome]:
    """Each rollout's outcome, from the tokens the engine returned (`completions`, by request id) and the
    pairing's records (by rollout name). A pair with no recorded cause whose two requests returned different
    tokens is `outputs_differ`. A rollout whose records are lost (no record, one the TTL evicted, or one with
    other tokens than the completion) keeps its completion and is flagged with that cause (`RECORD_LOSS_HELP`,
    `RolloutOutcome.records_lost`), with log-probs 0 as at padding, never NaN: its log q is unknown, so every
    trainer masks it out of the loss; the other rollouts are untouched."""
    outcomes = []
    for rollout in rollouts:
        completion = _completion(completions, rollout.plain)
        record = records.get(rollout.name)
        if record is None:
            lost = DesyncCause.RECORD_MISSING.value
        elif record.cause == DesyncCause.RECORD_EVICTED.value:
            lost = record.cause
        elif record.tokens[: len(completion)] != completion:
            lost = DesyncCause.RECORD_MISMATCH.value
        else:
            lost = None
        if lost is not None:
            padding = [0.0] * len(completion)  # unknown: masked like padding, never NaN (NaN · 0 is NaN in a loss)
            outcomes.append(RolloutOutcome(completion, RolloutRecord(completion, padding, padding, padding, 0, lost),
                                           rollout.paired, lost))
            continue
        cause = record.cause
        if rollout.paired and cause is None and _completion(completions, rollout.guide) != completion:
            cause = DesyncCause.OUTPUTS_DIFFER.value
        outcomes.append(RolloutOutcome(completion, record, rollout.paired, cause))
    return outcomes


def warn_record_losses(outcomes: Sequence[RolloutOutcome], stacklevel: int = 3) -> None:
    """A warning naming the cause of each kind of lost records among `outcomes` (none if there are none)."""
    lost = Counter(o.cause for o in outcomes if o.cause in RECORD_LOSS_HELP)
    if lost:
        causes = "; ".join(f"{count} {cause}: {RECORD_LOSS_HELP[cause]}" for cause, count in sorted(lost.items()))
        warnings.warn(f"prodsample: {sum(lost.values())} of {len(outcomes)} rollouts came back without their records, "
                      f"kept for their tokens, flagged desynced and masked out of the loss (log-probs 0 as at "
                      f"padding): {causes}",
                      stacklevel=stacklevel)


def _completion(completions: Mapping[str, list[int]], request: EngineRequest) -> list[int]:
    if request.request_id not in completions:
        raise RuntimeError(f"the driver returned no completion for request {request.request_id!r}")
    return completions[request.request_id]


@dataclass
class GenerationStats:
    """What one guided generation did."""

    rollouts: int = 0
    paired: int = 0  # rollouts with λ < 1 (two requests)
    desynced: int = 0
    causes: Counter = field(default_factory=Counter)  # DesyncCause value → rollouts
    engine_steps: int = 0

    @classmethod
    def of(cls, outcomes: Sequence[RolloutOutcome], engine_steps: int) -> GenerationStats:
        causes = Counter(outcome.cause for outcome in outcomes if outcome.desynced)
        return cls(
            rollouts=len(outcomes),
            paired=sum(outcome.paired for outcome in outcomes),
            desynced=sum(causes.values()),
            causes=causes,
            engine_steps=engine_steps,
        )

    @property
    def desync_rate(self) -> float:
        return self.desynced / self.paired if self.paired else 0.0
