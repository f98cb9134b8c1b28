"""Pairing: the two requests of one guided rollout, found among an engine's logits rows and kept in step.

An engine with no multi-context decoding runs a guided rollout as two requests, one on the plain prompt
and one on the prompt with the hint, each tagged with a `GuidanceTag`. At every step a batch-level logits
processor hands this module the tagged rows (`RowView`s) and the logits; `PairedSampler.step`

1. settles what the previous step's forced tokens became (`_observe`): kept, or discarded because the row
   was still mid-prefill (an engine samples such a row and throws the token away);
2. plans each row (`_plan`): a *joint* draw when both rows of a pair sit at the pair's next position, from
   q ∝ π(·|prompt)^λ · π(·|prompt ⊕ hint)^(1−λ); otherwise the plain row draws *solo* from π(·|prompt)
   (λ = 1, on-policy) and a guide row is *released* (forced to its stop token, ending it);
3. draws every planned token with the core sampler (`prodsample.product_sample`, keyed noise, so a
   rollout draws the tokens that `prodsample.hf.guided_generate` draws under the same key);
4. records per position the token, log q, log π(o|prompt) and log π(o|prompt ⊕ hint), and forces the drawn
   token in every row that drew it (all other logits −inf), so the engine's own sampler can only pick it.

A pair is *lost* at the first position whose kept plain token was not a joint draw that both rows kept;
from there the rollout is on-policy, its records say what was actually drawn (log q = log π at λ = 1, guide
log-prob NaN), and `take` reports the position and the cause. One draw is neither q nor π: a loss found the
step after (`GUIDE_MID_PREFILL`) means the plain row kept a joint draw whose guide logits came from a
half-prefilled hinted prompt. Its log q is that of the distribution the token really came from (what an
importance weight needs), which no teacher-forced scoring reproduces; the cause says so. Nothing here
imports an engine: adapters (`prodsample.vllm`) translate a runner's batch state into `RowView`s.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import torch

from ..fused import ProductSample
from ..sampling import product_sample
from ..settings import DRAW_FIELDS, SamplingSettings, check_integer, check_sampling_values, is_guided

__all__ = [
    "EXTRA_ARGS_KEY",
    "RECORDS_KEY",
    "Role",
    "GuidanceTag",
    "RequestKey",
    "RowView",
    "RolloutRecord",
    "PairedSampler",
    "DesyncCause",
    "records_from_workers",
]

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "prodsample"  # a tag's keys in extra_args are "prodsample.<field>"
# Where a server that returns a rollout's record with a request's output puts it (prodsample.verl.server: verl's
# TokenOutput.extra_fields), as a RolloutRecord turned into a list.
RECORDS_KEY = "prodsample.record"
MAX_ROLLOUT_NAME = 256  # characters: a name is a key of the engine's state, not a payload
MAX_EVICTED = 100_000  # names of rollouts forgotten by record_ttl_s that a sampler remembers, newest kept
_REQUEST_FIELDS = ("rollout", "role", "rollout_index", "seed", "release_token")  # a tag's fields beside its settings


class Role(str, Enum):
    PLAIN = "plain"  # the rollout itself: its tokens are the completion
    GUIDE = "guide"  # the same completion under the prompt with the hint


class DesyncCause(str, Enum):
    """Why a pair lost guidance (the first cause found, at the earliest lost position)."""

    PARTNER_ABSENT = "partner_absent"  # a row drew while its partner was not in the batch (admission, preemption)
    PARTNER_MID_PREFILL = "partner_mid_prefill"  # the partner was in the batch, still prefilling (known in advance)
    OUT_OF_STEP = "out_of_step"  # both in the batch, at different positions
    GUIDE_MID_PREFILL = "guide_mid_prefill"  # found after the fact: the guide row discarded a joint draw the plain row kept
    PLAIN_MID_PREFILL = "plain_mid_prefill"  # found after the fact: the plain row discarded a joint draw the guide row kept
    TOKEN_OVERRIDDEN = "token_overridden"  # the engine kept another token than the forced one
    OUTPUTS_DIFFER = "outputs_differ"  # found at read-out: the two requests returned different tokens
    # The rollout's records are lost, so its log q is unknown (the trainer must mask it):
    RECORD_EVICTED = "record_evicted"  # the engine forgot them after record_ttl_s while the rollout still ran (preempted)
    RECORD_MISSING = "record_missing"  # none came back: evicted after it finished, or the processor never saw it
    RECORD_MISMATCH = "record_mismatch"  # they hold other tokens than the engine returned


@dataclass(frozen=True)
class GuidanceTag:
    """What one request of a guided rollout carries in `SamplingParams.extra_args`, checked when built.

    `rollout` names the rollout uniquely among everything the engine runs; `rollout_index` is its noise
    key r = i·G + g. `settings` holds the rollout's one λ, its temperature and filters. A rollout with λ = 1
    has no guide request. In `extra_args` the tag is flat (`to_extra_args`): one "prodsample.<field>" key per
    field, each a str, int, float or list, as vLLM's HTTP server (`vllm_xargs`) passes them through.
    """

    rollout: str
    role: Role
    rollout_index: int
    seed: int
    release_token: int
    settings: SamplingSettings

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise ValueError(f"prodsample role must be 'plain' or 'guide', got {self.role!r}") from None
        if not isinstance(self.rollout, str) or not 0 < len(self.rollout) <= MAX_ROLLOUT_NAME:
            raise ValueError(f"prodsample rollout must be a string of 1 to {MAX_ROLLOUT_NAME} characters, got "
                             f"{self.rollout[:40] + '...' if isinstance(self.rollout, str) else self.rollout!r}")
        check_integer(self.rollout_index, "prodsample rollout_index", 0, 2**63)
        check_integer(self.seed, "prodsample seed", -(2**63), 2**63)
        check_integer(self.release_token, "prodsample release_token", 0, 2**63)
        if not isinstance(self.settings, SamplingSettings):
            raise ValueError(f"prodsample settings must be a SamplingSettings, got {type(self.settings).__name__}")
        if not isinstance(self.settings.lam, float):
            raise ValueError(f"a prodsample tag holds the λ of one rollout, got lam={list(self.settings.lam)}")
        _check_as_float32(self.settings)
        if self.role is Role.GUIDE and not self.paired:
            raise ValueError("a guide request needs lam < 1 (a rollout with lam = 1 has no guide request)")

    @property
    def paired(self) -> bool:
        return is_guided(self.settings.lam)

    def check_fits(self, vocab_size: int) -> None:
        """Raise ValueError naming the field if a value of this tag lies outside the engine (its vocabulary of
        `vocab_size` tokens): what the tag alone cannot check. The release token indexes the logits."""
        if self.release_token >= vocab_size:
            raise ValueError(f"prodsample.release_token must be a token id of the served model, in [0, {vocab_size}), "
                             f"got {self.release_token}")

    def to_extra_args(self) -> dict[str, str | int | float | list]:
        request = {name: getattr(self, name) for name in _REQUEST_FIELDS} | {"role": self.role.value}
        return {f"{EXTRA_ARGS_KEY}.{name}": value for name, value in (request | self.settings.to_flat()).items()}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> GuidanceTag | None:
        """The tag in `extra_args`, None for an untagged request; a malformed tag raises ValueError."""
        prefix = f"{EXTRA_ARGS_KEY}."
        raw = {key.removeprefix(prefix): value for key, value in (extra_args or {}).items() if key.startswith(prefix)}
        if not raw:
            if extra_args and EXTRA_ARGS_KEY in extra_args:
                raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: a prodsample tag is flat, one '{prefix}<field>' key per field")
            return None
        missing = {*_REQUEST_FIELDS, "lam"} - raw.keys()
        if missing:
            raise ValueError(f"the prodsample tag in extra_args lacks {sorted(prefix + name for name in missing)}")
        unknown = raw.keys() - {*_REQUEST_FIELDS, *DRAW_FIELDS}
        if unknown:
            raise ValueError(f"the prodsample tag in extra_args has unknown fields {sorted(prefix + name for name in unknown)}")
        try:
            settings = SamplingSettings.from_flat({name: value for name, value in raw.items() if name not in _REQUEST_FIELDS})
        except ValueError as error:  # named as the tag's field: vLLM's own top_p and the like are other fields
            raise ValueError(f"the prodsample tag in extra_args ('{prefix}<field>'): {error}") from None
        return cls(**{name: raw[name] for name in _REQUEST_FIELDS}, settings=settings)


def _check_as_float32(settings: SamplingSettings) -> None:
    """The engine's draw holds a tag's λ, temperature, top_p and min_p as float32 (`_sample`): a value that
    leaves its range there (top_p = 1e-50 becomes 0, temperature = 1e39 becomes inf) would raise inside the
    engine's step and kill it, so it is refused with the tag."""
    values = {name: float(torch.tensor(getattr(settings, name), dtype=torch.float32))
              for name in ("lam", "temperature", "top_p", "min_p")}
    try:
        check_sampling_values(**values)
    except ValueError as error:
        raise ValueError(f"prodsample tag: {error} once held as float32, as the engine holds it") from None
    if not math.isfinite(values["temperature"]):
        raise ValueError(f"prodsample temperature must be finite as float32 (below 3.4e38), got {settings.temperature!r}")


class RequestKey(NamedTuple):
    rollout: str
    role: Role


class RowView(NamedTuple):
    """One tagged logits row of the current step, as the adapter sees it."""

    row: int  # index into this step's logits
    request: RequestKey
    position: int  # completion index of the token this row samples (= tokens the request has kept)
    produces: bool | None  # whether the engine keeps this row's token: False mid-prefill, None if unknown
    last_token: int | None  # the request's last kept completion token (None at position 0 or if unknown)


class _Pending(NamedTuple):
    """A token forced into a row, until the row is seen again (or the rollout is read out)."""

    position: int
    token: int
    joint: bool
    cause: DesyncCause | None  # for a row that drew alone while its pair was still in step: why


class _Draw(NamedTuple):
    plain: RowView
    guide: RowView | None  # the partner of a joint draw; None for a solo (on-policy) draw
    cause: DesyncCause | None  # why a solo draw of a pair still in step is not joint


class _Release(NamedTuple):
    guide: RowView
    cause: DesyncCause | None


class _Token(NamedTuple):
    token: int
    logprob: float
    plain_logprob: float
    guide_logprob: float  # NaN for a solo draw of a pair


@dataclass
class _Rollout:
    paired: bool
    tokens: dict[int, _Token] = field(default_factory=dict)  # by position; a re-draw overwrites
    joint_kept: dict[int, dict[Role, bool]] = field(default_factory=dict)  # per joint position, per role
    in_step_through: int = 0  # positions below this were drawn jointly and kept by both rows
    lost_at: int | None = None
    cause: DesyncCause | None = None

    def lose(self, position: int, cause: DesyncCause) -> None:
        if self.paired and (self.lost_at is None or position < self.lost_at):
            self.lost_at, self.cause = position, cause

    def settle(self, role: Role, pending: _Pending, *, kept: bool) -> None:
        """Account for what became of a forced token: kept, or discarded by a row still mid-prefill."""
        if not pending.joint:
            if kept and pending.cause is not None:
                self.lose(pending.position, pending.cause)
            return
        kept_by = self.joint_kept.setdefault(pending.position, {})
        kept_by[role] = kept
        if len(kept_by) < 2:
            return
        del self.joint_kept[pending.position]
        if kept_by[Role.PLAIN] and kept_by[Role.GUIDE]:
            self.in_step_through = pending.position + 1
        elif kept_by[Role.PLAIN]:
            self.lose(pending.position, DesyncCause.GUIDE_MID_PREFILL)
        elif kept_by[Role.GUIDE]:
            self.lose(pending.position, DesyncCause.PLAIN_MID_PREFILL)

    def out_of_step_cause(self, plain: RowView | None, guide: RowView | None) -> DesyncCause | None:
        """Why this pair, still in step, cannot draw jointly now (None: it can). Needs the pair in step."""
        if plain is None or guide is None:
            return DesyncCause.PARTNER_ABSENT
        if plain.produces is False or guide.produces is False:
            return DesyncCause.PARTNER_MID_PREFILL
        if not plain.position == guide.position == self.in_step_through:
            return DesyncCause.OUT_OF_STEP
        return None

    @property
    def in_step(self) -> bool:
        return self.paired and self.lost_at is None


class RolloutRecord(NamedTuple):
    """What one rollout drew, per completion position, as plain lists (they cross process boundaries)."""

    tokens: list[int]
    logprobs: list[float]  # log q of the distribution each token was drawn from
    plain_logprobs: list[float]
    guide_logprobs: list[float]  # NaN from `lost_at` on
    lost_at: int | None  # first position not drawn jointly by both contexts; None if in step throughout
    cause: str | None  # a DesyncCause value


class PairedSampler:
    """Per-engine pairing state and the per-step draw. Adapters call `admit`, `step` and `take`.

    Args:
        backend: the `product_sample` backend.
        record_ttl_s: forget a rollout that no step has seen for this long (None: keep it until `take`). A
            server whose clients do not take their records (they failed before reading) would otherwise
            keep every rollout it ever ran. A rollout forgotten while still running (preempted for longer than this) draws
            on-policy when it resumes, and its record says `record_evicted`: it comes back flagged, never guided.
            Adapters call `sweep` every engine step, so the TTL holds whether or not tagged rows run.
        vocab_size: the engine's vocabulary; a tag whose release token lies outside it is not admitted (the
            frontend refuses such requests; this guards engines fed directly). None: not checked.
        clock: seconds, monotonic (the tests' fake clock).
    """

    def __init__(
        self, backend: str = "auto", *, record_ttl_s: float | None = None, vocab_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.record_ttl_s = record_ttl_s
        self.vocab_size = vocab_size
        self._clock = clock
        self._tags: dict[RequestKey, GuidanceTag] = {}
        self._pending: dict[RequestKey, _Pending] = {}
        self._rollouts: dict[str, _Rollout] = {}
        self._last_seen: dict[str, float] = {}  # rollout → when a request of it was last admitted or stepped
        self._evicted: OrderedDict[str, None] = OrderedDict()  # rollouts forgotten by the TTL
        self._next_sweep = -math.inf

    def admit(self, tag: GuidanceTag) -> RequestKey | None:
        """Register a request entering the batch (again, after a preemption: its state is kept). None: the tag
        does not fit this engine (logged); the row is left alone and its rollout gets no record."""
        if self.vocab_size is not None:
            try:
                tag.check_fits(self.vocab_size)
            except ValueError as error:
                logger.error("prodsample: rollout %r not admitted: %s", tag.rollout, error)
                return None
        now = self._clock()
        self._forget_idle(now)
        key = RequestKey(tag.rollout, tag.role)
        self._tags[key] = tag
        if tag.rollout not in self._rollouts:
            rollout = self._rollouts[tag.rollout] = _Rollout(paired=tag.paired)
            if tag.rollout in self._evicted:  # resumed after the TTL forgot it: on-policy from here, flagged
                del self._evicted[tag.rollout]
                rollout.lost_at, rollout.cause = 0, DesyncCause.RECORD_EVICTED
        self._last_seen[tag.rollout] = now
        return key

    def sweep(self) -> None:
        """Forget the rollouts no step has seen for `record_ttl_s` (at most one pass a second)."""
        self._forget_idle(self._clock())

    def step(self, logits: torch.Tensor, rows: Sequence[RowView]) -> torch.Tensor:
        """Draw and force the tokens of the tagged `rows` in `logits` `[num_rows, V]` (in place). Rows of a
        rollout already read out (`take`; e.g. requests being aborted) are left alone."""
        now = self._clock()
        self._forget_idle(now)
        rows = [view for view in rows if view.request.rollout in self._rollouts]
        for view in rows:
            self._last_seen[view.request.rollout] = now
            self._observe(view)
        draws, releases = self._plan(rows)
        tokens = self._draw(logits, draws) if draws else []
        self._force(logits, draws, tokens, releases)
        return logits

    def _observe(self, view: RowView) -> None:
        """Settle the request's previous forced token from where the request now stands."""
        pending = self._pending.pop(view.request, None)
        if pending is None:
            return
        rollout = self._rollouts[view.request.rollout]
        if view.position == pending.position:
            rollout.settle(view.request.role, pending, kept=False)
            return
        rollout.settle(view.request.role, pending, kept=True)
        if view.position != pending.position + 1 or view.last_token not in (None, pending.token):
            rollout.lose(pending.position, DesyncCause.TOKEN_OVERRIDDEN)

    def _plan(self, rows: Sequence[RowView]) -> tuple[list[_Draw], list[_Release]]:
        """A joint draw for each pair in step, a solo draw for every other plain row, a release for every
        other guide row. Rows mid-prefill (produces False) are left alone: their token is thrown away."""
        seen = {view.request: view for view in rows}
        draws, releases = [], []
        for view in rows:
            if view.produces is False:
                continue
            rollout = self._rollouts[view.request.rollout]
            plain = seen.get(RequestKey(view.request.rollout, Role.PLAIN))
            guide = seen.get(RequestKey(view.request.rollout, Role.GUIDE))
            cause = rollout.out_of_step_cause(plain, guide) if rollout.in_step else None
            joint = rollout.in_step and cause is None
            if view.request.role is Role.PLAIN:
                draws.append(_Draw(view, guide if joint else None, cause))
            elif not joint:
                releases.append(_Release(view, cause))
        return draws, releases

    def _draw(self, logits: torch.Tensor, draws: list[_Draw]) -> list[_Token]:
        sample = _sample(logits, draws, [self._tags[d.plain.request] for d in draws], self.backend)
        columns = (sample.token_ids, sample.logprobs, sample.plain_logprobs, sample.guide_logprobs)
        tokens = []
        for draw, (token, logprob, plain_logprob, guide_logprob) in zip(draws, zip(*(c.tolist() for c in columns))):
            joint = draw.guide is not None
            rollout = self._rollouts[draw.plain.request.rollout]
            # λ = 1 has no guide context: its guide log-prob repeats the plain one, as in prodsample.hf; a pair
            # drawing alone has lost its guide context, whose log-prob is then unknown.
            record = _Token(token, logprob, plain_logprob, guide_logprob if joint or not rollout.paired else math.nan)
            rollout.tokens[draw.plain.position] = record
            self._pending[draw.plain.request] = _Pending(draw.plain.position, token, joint, draw.cause)
            if joint:
                self._pending[draw.guide.request] = _Pending(draw.guide.position, token, True, None)
            tokens.append(record)
        return tokens

    def _force(self, logits: torch.Tensor, draws: list[_Draw], tokens: list[_Token], releases: list[_Release]) -> None:
        """Every logit but the forced token's to −inf, so whatever the engine samples next is that token."""
        rows, forced = [], []
        for draw, record in zip(draws, tokens):
            for view in (draw.plain, draw.guide):
                if view is not None:
                    rows.append(view.row)
                    forced.append(record.token)
        for release in releases:
            token = self._tags[release.guide.request].release_token
            rows.append(release.guide.row)
            forced.append(token)
            self._pending[release.guide.request] = _Pending(release.guide.position, token, False, release.cause)
        if rows:
            row_index = torch.tensor(rows, device=logits.device)
            logits.index_fill_(0, row_index, -math.inf)
            logits[row_index, torch.tensor(forced, device=logits.device)] = 0.0

    def take(self, rollouts: Iterable[str]) -> dict[str, RolloutRecord]:
        """The records of finished rollouts, forgetting them; rollouts this sampler never saw are left out.
        A request's last forced token counts as kept: a request only finishes on a kept token."""
        records = {}
        for name in rollouts:
            rollout = self._forget(name)
            if rollout is not None:
                records[name] = _record(rollout)
        return records

    def _forget(self, name: str) -> _Rollout | None:
        """Drop a rollout's state; returns it with its last forced tokens settled as kept."""
        self._last_seen.pop(name, None)
        rollout = self._rollouts.pop(name, None)
        if rollout is None:
            return None
        for role in Role:
            self._tags.pop(RequestKey(name, role), None)
            pending = self._pending.pop(RequestKey(name, role), None)
            if pending is not None:
                rollout.settle(role, pending, kept=True)
        return rollout

    def _forget_idle(self, now: float) -> None:
        if self.record_ttl_s is None or now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.record_ttl_s)  # a sweep at most every second
        for name, seen in list(self._last_seen.items()):
            if now - seen > self.record_ttl_s:
                self._forget(name)
                self._evicted[name] = None
                if len(self._evicted) > MAX_EVICTED:
                    self._evicted.popitem(last=False)

    def __len__(self) -> int:
        """Rollouts with state held (admitted and not yet taken)."""
        return len(self._rollouts)


def records_from_workers(results: Iterable[str | Mapping[str, Sequence]]) -> dict[str, RolloutRecord]:
    """The records every engine worker returned, {rollout: record as a sequence} per worker (a JSON string of it
    where they crossed a process boundary, `prodsample.vllm.processor.RecordsExtension`), merged: a rollout's record
    comes from a worker that holds its tokens (every worker of a tensor-parallel engine runs the processor; one
    whose record is empty loses to one whose is not)."""
    records: dict[str, RolloutRecord] = {}
    for worker_records in results:
        if isinstance(worker_records, str):
            worker_records = json.loads(worker_records)
        for name, raw in worker_records.items():
            if name not in records or (raw[0] and not records[name].tokens):
                records[name] = RolloutRecord(*raw)
    return records


def _sample(logits: torch.Tensor, draws: list[_Draw], tags: list[GuidanceTag], backend: str) -> ProductSample:
    """One batched `product_sample` call for every planned draw: joint draws at the rollout's λ at that position
    (0 in its guided prefix), solo draws at λ = 1 (the plain row stands in for the missing guide row), each with its own settings and noise key."""
    settings = [tag.settings for tag in tags]

    def per_row(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=logits.device)

    return product_sample(
        logits.index_select(0, per_row([d.plain.row for d in draws])),
        logits.index_select(0, per_row([(d.guide or d.plain).row for d in draws])),
        per_row([float(s.lam_at(s.lam, d.plain.position)) if d.guide is not None else 1.0
                 for s, d in zip(settings, draws)], torch.float32),
        temperature=per_row([s.temperature for s in settings], torch.float32),
        top_k=per_row([s.top_k for s in settings]),
        top_p=per_row([s.top_p for s in settings], torch.float32),
        min_p=per_row([s.min_p for s in settings], torch.float32),
        seed=per_row([t.seed for t in tags]),
        rollout_ids=per_row([t.rollout_index for t in tags]),
        positions=per_row([d.plain.position for d in draws]),
        backend=backend,
    )


def _record(rollout: _Rollout) -> RolloutRecord:
    length = 0
    while length in rollout.tokens:
        length += 1
    tokens = [rollout.tokens[t] for t in range(length)]
    lost_at = rollout.lost_at
    guide = [math.nan if lost_at is not None and t >= lost_at else tok.guide_logprob for t, tok in enumerate(tokens)]
    return RolloutRecord(
        tokens=[tok.token for tok in tokens],
        logprobs=[tok.logprob for tok in tokens],
        plain_logprobs=[tok.plain_logprob for tok in tokens],
        guide_logprobs=guide,
        lost_at=lost_at,
        cause=None if rollout.cause is None else rollout.cause.value,
    )
