"""Pairs kept by the engine: a vLLM V1 scheduler that admits, preempts and finishes the two requests of a
guided rollout together.

A guided rollout runs as two requests (`prodsample.vllm.pairing`), and stays in step only if both enter the same
engine step whole and neither runs a step without the other. vLLM's scheduler knows nothing of pairs: it
admits requests one at a time as they arrive, cuts a prompt where the step's token budget ends, and preempts
one request at a time. `PairedScheduler` keeps vLLM's `schedule()` and decides, before each call, which
requests it may see:

- admission: the first request of a pair waits in the queue until its partner arrives; a pair enters only
  when the step can prefill both whole (tokens, request slots, KV blocks), and nothing queued between the
  two may take what the second needs. After a pair that must wait, everything queued later waits too
  (first come, first served, as vLLM's own queue);
- preemption: when the running requests need more KV blocks than are free, it preempts whole pairs from
  the back of the running queue before vLLM would preempt single requests;
- decoding: a running pair is scheduled only if the step's token budget covers both of its requests;
- finishing: aborting one request of a pair aborts the other (its client gets an `abort` finish).

The requests held back stay in vLLM's queues between steps (counted, abortable), and are taken out only for
the duration of `schedule()`.

Two cases it cannot keep in step, and what it does:
- a lone request waits for its partner as long as its client waits (a client that gives up aborts it); only
  with a `pair_timeout_s` set does it run alone after that long, and the pairing records its rollout as
  desynced (cause `partner_absent`, or `out_of_step` if the partner arrives later). No timeout by default:
  on a loaded machine a partner can reach the engine long after the first request (the frontend and the
  engine's input thread are slow), and a late partner is still a partner;
- a pair whose prompts together exceed what one step prefills (`max_num_batched_tokens`, or a prompt
  longer than `long_prefill_token_threshold`) or whose KV blocks exceed the cache is refused: both requests
  finish with an error and the server log says why. A preempted pair that has grown past that limit runs
  as two single requests (chunked by vLLM, flagged by the pairing).

Desync detection in `prodsample.vllm.pairing` stays the safety net: anything this scheduler fails to prevent is
flagged, never silent.

Use: `vllm serve MODEL --scheduler-cls prodsample.vllm.scheduler.PairedScheduler`, or
`scheduler_cls=SCHEDULER_CLS` in engine arguments (`prodsample.vllm.build_engine` sets it). Settings go in
vLLM's additional config (`EngineSettings`). Requires the
"fcfs" policy and no KV connector. Under data parallelism each engine runs its own scheduler: both requests of
a pair must name one engine (`data_parallel_rank`; `prodsample.vllm.middleware` refuses tagged HTTP requests
without it), since vLLM's balancer routes each request on its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from .pairing import GuidanceTag, Role

__all__ = [
    "PairedScheduler",
    "PairedAsyncScheduler",
    "PairStats",
    "keeps_pairs",
    "EngineSettings",
    "SCHEDULER_CLS",
    "DEFAULT_PAIR_TIMEOUT_S",
]

SCHEDULER_CLS = "prodsample.vllm.scheduler.PairedScheduler"
CONFIG_KEY = "prodsample"  # vllm_config.additional_config[CONFIG_KEY]: this scheduler's settings
DEFAULT_PAIR_TIMEOUT_S = None  # a lone request waits for its partner as long as its client waits
DEFAULT_RECORD_TTL_S = 600.0

logger = logging.getLogger(__name__)


@dataclass
class PairStats:
    """What the scheduler did with pairs since it started."""

    pairs: int = 0  # pairs whose two requests both arrived
    released_alone: int = 0  # requests run alone: partner missing after the timeout, or arrived after that
    refused: int = 0  # pairs refused: one step cannot prefill them whole
    split_after_preemption: int = 0  # preempted pairs grown past one step's prefill, resumed as two singles
    preempted: int = 0  # pairs preempted whole
    partner_aborts: int = 0  # requests aborted because their partner was


@dataclass
class _Share:
    """Tokens, request slots and KV blocks: what a step has left, or what requests take of it."""

    tokens: int = 0
    seats: int = 0
    blocks: int = 0

    def __add__(self, other: _Share) -> _Share:
        return _Share(self.tokens + other.tokens, self.seats + other.seats, self.blocks + other.blocks)

    def __sub__(self, other: _Share) -> _Share:
        return _Share(self.tokens - other.tokens, self.seats - other.seats, self.blocks - other.blocks)

    def covers(self, other: _Share) -> bool:
        return self.tokens >= other.tokens and self.seats >= other.seats and self.blocks >= other.blocks


@dataclass(frozen=True)
class EngineSettings:
    """prodsample's settings for an engine, in vLLM's additional config:
    `--additional-config '{"prodsample": {"pair_timeout_s": 10, "record_ttl_s": 600}}'`.

    pair_timeout_s: how long the scheduler holds the first request of a pair for its partner before it runs
        alone (flagged); None (the default): as long as its client waits.
    record_ttl_s: how long the logits processor keeps the records of a rollout no step has seen (finished,
        and not taken by a client); see `prodsample.vllm.pairing.PairedSampler`. None: until taken.
    """

    pair_timeout_s: float | None = DEFAULT_PAIR_TIMEOUT_S
    record_ttl_s: float | None = DEFAULT_RECORD_TTL_S

    @classmethod
    def of(cls, vllm_config) -> EngineSettings:
        settings = (vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        known = [f.name for f in fields(cls)]
        unknown = set(settings) - set(known)
        if unknown:
            raise ValueError(f"additional_config[{CONFIG_KEY!r}] has unknown keys {sorted(unknown)}; known: {known}")
        for name, value in settings.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(
                    f"additional_config[{CONFIG_KEY!r}][{name!r}] must be a number >= 0 or null (no limit), got {value!r}"
                )
        return cls(**{name: None if value is None else float(value) for name, value in settings.items()})


def _check_supported(vllm_config) -> None:
    # data_parallel_size > 1 runs one scheduler per rank: a pair stays whole only if both of its requests name
    # one rank (vLLM's data_parallel_rank; prodsample.vllm.middleware refuses tagged HTTP requests without it)
    scheduler = vllm_config.scheduler_config
    if scheduler.policy != "fcfs":
        raise ValueError(f"PairedScheduler supports the 'fcfs' scheduling policy only, got {scheduler.policy!r}")
    if scheduler.max_num_seqs < 2:
        raise ValueError(
            f"PairedScheduler needs max_num_seqs >= 2 (a pair is two requests), got {scheduler.max_num_seqs}"
        )
    if vllm_config.kv_transfer_config is not None:
        raise ValueError(
            "PairedScheduler does not support KV connectors (kv_transfer_config): they load KV asynchronously"
        )


class _PairBook:
    """Which requests are the two of a pair, which one waits for its partner (and until when), and which run as
    single requests. Keyed by rollout (the tag), since a server names requests itself."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._members: dict[str, dict[Role, Request]] = {}  # rollout → its requests that arrived
        self._rollout_of: dict[str, str] = {}  # request id → rollout
        self._deadlines: dict[str, float] = {}  # rollout → when its lone request runs alone (inf: never)
        self._alone: set[str] = set()  # request ids that run as single requests (flagged by the pairing)

    def add(self, request: Request, tag: GuidanceTag) -> tuple[str, Request | None]:
        """Book a request of a pair (λ < 1): ("lone", None) for the first of its rollout, ("pair", partner),
        ("late", partner) when the partner already runs alone (so does this one), or ("duplicate", other)
        when its role is taken."""
        members = self._members.setdefault(tag.rollout, {})
        if tag.role in members:
            return "duplicate", members[tag.role]
        members[tag.role] = request
        self._rollout_of[request.request_id] = tag.rollout
        if len(members) == 1:
            self._deadlines[tag.rollout] = math.inf if self.timeout_s is None else time.monotonic() + self.timeout_s
            return "lone", None
        self._deadlines.pop(tag.rollout, None)
        partner = members[Role.GUIDE if tag.role is Role.PLAIN else Role.PLAIN]
        if partner.request_id in self._alone:
            self._alone.add(request.request_id)
            return "late", partner
        return "pair", partner

    def partner(self, request: Request) -> Request | None:
        """The other request of `request`'s pair, if both arrived and they still run as a pair."""
        rollout = self._rollout_of.get(request.request_id)
        if rollout is None or request.request_id in self._alone or len(self._members[rollout]) < 2:
            return None
        members = self._members[rollout]
        return members[Role.GUIDE] if members[Role.PLAIN] is request else members[Role.PLAIN]

    def waits(self, request: Request) -> bool:
        """Whether `request` is the first of a pair, waiting for its partner."""
        rollout = self._rollout_of.get(request.request_id)
        return rollout is not None and rollout in self._deadlines and request.request_id not in self._alone

    def overdue(self, now: float) -> list[Request]:
        """The lone requests whose partner is later than the timeout, from now on single."""
        late = [rollout for rollout, deadline in self._deadlines.items() if now >= deadline]
        released = []
        for rollout in late:
            del self._deadlines[rollout]
            released.extend(self._members[rollout].values())
        self.run_alone(*released)
        return released

    def run_alone(self, *requests: Request) -> None:
        self._alone.update(request.request_id for request in requests)

    def forget(self, request: Request) -> None:
        self._alone.discard(request.request_id)
        rollout = self._rollout_of.pop(request.request_id, None)
        if rollout is None:
            return
        members = self._members[rollout]
        for role in [role for role, member in members.items() if member is request]:
            del members[role]
        if not members:
            del self._members[rollout]
            self._deadlines.pop(rollout, None)

    def __len__(self) -> int:
        """Rollouts with a request booked."""
        return len(self._members)


class _StepMeasure:
    """What vLLM's scheduler gives a request in one step, counted as it counts: tokens, a request slot, KV
    blocks (from the live `KVCacheManager`, no prefix-cache hit assumed, so upper bounds)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.kv = scheduler.kv_cache_manager
        self.max_model_len = scheduler.max_model_len
        self.lookahead = scheduler.num_lookahead_tokens
        self.sampled_per_step = scheduler.num_sampled_tokens_per_step
        self.long_prefill_threshold = scheduler.scheduler_config.long_prefill_token_threshold
        tokens = min(scheduler.max_num_scheduled_tokens, scheduler.scheduler_config.max_num_batched_tokens)
        blocks = self.kv.block_pool.num_gpu_blocks - 1  # one null block
        self.capacity = _Share(tokens, scheduler.max_num_active_reqs, blocks - self.kv.watermark_blocks)

    def free_blocks(self) -> int:
        """Free KV blocks, less the watermark vLLM keeps back when it admits requests."""
        return self.kv.block_pool.get_num_free_blocks() - self.kv.watermark_blocks

    def tokens(self, request: Request) -> int:
        """An upper bound on the tokens vLLM schedules for `request` in the next step."""
        if request.status == RequestStatus.RUNNING:
            if (
                request.num_output_placeholders > 0
                and request.num_computed_tokens + 2 - request.num_output_placeholders
                >= request.num_prompt_tokens + request.max_tokens
            ):
                return 0  # async scheduling: its last token is already in flight
            tokens = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        else:
            tokens = request.num_tokens - request.num_computed_tokens
        room = self.max_model_len - request.num_computed_tokens - self.sampled_per_step
        return max(0, min(tokens, room))

    def blocks(self, request: Request, tokens: int) -> int:
        """KV blocks vLLM allocates for `tokens` more tokens of `request` (`KVCacheManager.allocate_slots`)."""
        if tokens == 0:
            return 0
        computed = request.num_computed_tokens
        return self.kv.coordinator.get_num_blocks_to_allocate(
            request_id=request.request_id,
            num_tokens=min(computed + tokens + self.lookahead, self.max_model_len),
            new_computed_blocks=self.kv.empty_kv_cache_blocks.blocks,
            num_encoder_tokens=0,
            total_computed_tokens=computed,
            num_local_computed_tokens=computed,
            num_tokens_main_model=computed + tokens,
            prefill_end=max(request.num_prompt_tokens, request.num_tokens - 1),
        )

    def share(self, request: Request, tokens: int, *, admitting: bool) -> _Share:
        """What `request` takes of a step: a slot and KV blocks count when it is admitted (a running
        request's blocks are seen to by the preemption)."""
        return _Share(tokens, 1, self.blocks(request, tokens)) if admitting else _Share(tokens)

    def never_fits(self, *pair: Request) -> str | None:
        """Why `pair` cannot be prefilled whole in one step even on an empty engine (None: it can)."""
        tokens = [request.num_tokens for request in pair]
        threshold = self.long_prefill_threshold
        if threshold > 0 and max(tokens) > threshold:
            return f"a prompt of {max(tokens)} tokens exceeds long_prefill_token_threshold = {threshold}"
        if sum(tokens) > self.capacity.tokens:
            return (f"its prompts hold {sum(tokens)} tokens together, more than one step prefills "
                    f"(max_num_batched_tokens = {self.capacity.tokens}); raise --max-num-batched-tokens")
        blocks = sum(self.blocks(request, request.num_tokens) for request in pair)
        if blocks > self.capacity.blocks:
            return f"its prompts need {blocks} KV-cache blocks, the cache holds {self.capacity.blocks}"
        return None


def _ready(request: Request) -> bool:
    """Whether vLLM would consider a waiting request at all this step (it skips, and goes on past, one that
    is blocked or still has output of a preempted step in flight)."""
    if request.status == RequestStatus.RUNNING:
        return True
    if Scheduler._is_blocked_waiting_status(request.status):
        return False
    return not (request.num_stale_output_tokens and not request.drop_stale_output)


def _walk(
    queue: Sequence[Request], left: _Share, book: _PairBook, measure: _StepMeasure, *, admitting: bool
) -> tuple[_Share, list[Request]]:
    """Walk `queue` in vLLM's order, taking from `left` what vLLM would give each request. Returns what is left
    and the requests to hold out of this step so that no pair is split: a pair goes only whole, and a request
    between the two of a pair may not take what the second needs. `admitting`: `queue` is the waiting queue
    (slots and KV blocks count, lone requests wait, and after a pair that has to wait everything later waits,
    first come, first served); otherwise the running queue (tokens only)."""
    in_queue = {request.request_id for request in queue}
    held: list[Request] = []
    held_ids: set[str] = set()
    reserved = _Share()  # set aside for the second requests of pairs whose first was taken
    second_of_taken: dict[str, _Share] = {}
    blocked = False

    def hold(*requests: Request) -> None:
        held.extend(requests)
        held_ids.update(request.request_id for request in requests)

    for index, request in enumerate(queue):
        if blocked and not second_of_taken:
            hold(*(r for r in queue[index:] if r.request_id not in held_ids))
            break
        if request.request_id in held_ids:
            continue
        if request.request_id in second_of_taken:
            reserved -= second_of_taken.pop(request.request_id)
            continue
        partner = book.partner(request)
        if partner is not None and partner.request_id in in_queue:
            shares = [measure.share(r, measure.tokens(r), admitting=admitting) for r in (request, partner)]
            if blocked or not (_ready(request) and _ready(partner)):
                hold(request, partner)
            elif left.covers(shares[0] + shares[1]):
                left -= shares[0] + shares[1]
                reserved += shares[1]
                second_of_taken[partner.request_id] = shares[1]
            else:
                hold(request, partner)
                blocked = admitting
            continue
        if admitting and (blocked or book.waits(request) or left.seats < 1):
            hold(request)
            continue
        tokens = min(measure.tokens(request), left.tokens + reserved.tokens)
        share = measure.share(request, tokens, admitting=admitting)
        if tokens > left.tokens or share.blocks > left.blocks:
            hold(request)  # it would take what a pair's second request needs, or vLLM stops at it
            blocked = admitting
            continue
        left -= share
    return left, held


class _PairLifecycle:
    """Pairs arriving and leaving, mixed into vLLM's `Scheduler` or `AsyncScheduler`: books the requests of
    pairs, refuses a pair one step cannot prefill, aborts a request with its partner, and reports the finishes
    it makes itself. Holds the state `_PairStepping` plans each step with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_supported(self.vllm_config)
        self.pair_book = _PairBook(EngineSettings.of(self.vllm_config).pair_timeout_s)
        self.pair_stats = PairStats()
        self.step_measure = _StepMeasure(self)
        self._unreported: list[Request] = []  # finished here, not by a step: their clients still wait

    def add_request(self, request: Request) -> None:
        known = request.request_id in self.requests
        super().add_request(request)
        if known:
            return  # a streaming update of a request already here
        try:
            tag = GuidanceTag.from_extra_args(request.sampling_params.extra_args if request.sampling_params else None)
            if tag is not None:
                tag.check_fits(self.vllm_config.model_config.get_vocab_size())
        except ValueError as error:  # the frontend validates tags; this only catches engines fed directly
            logger.error("prodsample: request %s has a malformed tag, refused: %s", request.request_id, error)
            self._finish_here([request], RequestStatus.FINISHED_ERROR)
            return
        if tag is None or not tag.paired:
            return
        outcome, partner = self.pair_book.add(request, tag)
        if outcome == "duplicate":
            logger.error("prodsample: two requests claim the %s role of rollout %r; refused %s",
                         tag.role.value, tag.rollout, request.request_id)
            self._finish_here([request], RequestStatus.FINISHED_ERROR)
        elif outcome == "late":
            self.pair_stats.released_alone += 1
        elif outcome == "pair":
            self.pair_stats.pairs += 1
            reason = self.step_measure.never_fits(partner, request)
            if reason is not None:
                logger.warning("prodsample: refused the pair of rollout %r: %s", tag.rollout, reason)
                self.pair_stats.refused += 1
                self._finish_here([partner, request], RequestStatus.FINISHED_ERROR)

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus) -> list[Request]:
        """vLLM's finish, and the partner of each finished request of a pair aborted with it."""
        if request_ids is None:
            return super().finish_requests(None, finished_status)
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        partners = []
        for request_id in ids:
            request = self.requests.get(request_id)
            partner = None if request is None or request.is_finished() else self.pair_book.partner(request)
            if partner is not None and partner.request_id not in ids and not partner.is_finished():
                partners.append(partner)
        finished = super().finish_requests(ids, finished_status)
        if partners:
            self.pair_stats.partner_aborts += len(partners)
            self._finish_here(partners, RequestStatus.FINISHED_ABORTED)
        return finished

    def _finish_here(self, requests: Sequence[Request], status: RequestStatus) -> None:
        """Finish requests no client asked to finish; their finish reaches the clients with the next step."""
        self._unreported.extend(super().finish_requests([r.request_id for r in requests], status))

    def _free_request(self, request: Request, *args, **kwargs):
        self.pair_book.forget(request)
        return super()._free_request(request, *args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in self._unreported:
            finish = EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                events=request.take_events(), trace_headers=request.trace_headers,
            )
            if request.client_index in outputs:
                outputs[request.client_index].outputs.append(finish)
            else:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[finish])
        self._unreported.clear()
        return outputs


class _PairStepping:
    """Each step, mixed in with `_PairLifecycle`: which requests vLLM's `schedule()` may see (module docstring),
    and whole-pair preemption."""

    def schedule(self, *args, **kwargs):
        self._release_overdue()
        self._split_grown_pairs()
        preempted = self._preempt_whole_pairs()
        left, held_running = _walk(self.running, self._running_budget(), self.pair_book, self.step_measure,
                                   admitting=False)
        left.tokens -= sum(self.step_measure.tokens(request) for request in self.kv_holding_waiting)
        if preempted:
            held_waiting = list(self.waiting)  # as vLLM: no admission in a step that preempts
        else:
            left.blocks = self.step_measure.free_blocks() - sum(self._running_blocks(held_running))
            left.seats = self.max_num_active_reqs - len(self.running) - self.num_waiting_for_streaming_input
            _, held_waiting = _walk(list(self.waiting), left, self.pair_book, self.step_measure, admitting=True)
        running, waiting = list(self.running), list(self.waiting)
        held_ids = {request.request_id for request in held_running}
        self.running = [request for request in running if request.request_id not in held_ids]
        if held_waiting:
            self.waiting.remove_requests(held_waiting)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # vLLM appends what it admits to the running queue and puts what it preempts first in the waiting one
            self.running = _restored(running, self.running, held_running, fresh_first=False)
            restored = _restored(waiting, list(self.waiting), held_waiting, fresh_first=True)
            self.waiting.clear()
            self.waiting.extend(restored)

    def _release_overdue(self) -> None:
        for request in self.pair_book.overdue(time.monotonic()):
            self.pair_stats.released_alone += 1
            logger.warning(
                "prodsample: request %s runs alone: its partner did not arrive within %.3g s (its rollout is "
                "flagged desynced)", request.request_id, self.pair_book.timeout_s,
            )

    def _split_grown_pairs(self) -> None:
        """A preempted pair that has grown past one step's prefill runs on as two single requests (vLLM cuts
        their prefills; the pairing flags the rollout)."""
        for request in self.waiting:
            partner = self.pair_book.partner(request)
            if request.status != RequestStatus.PREEMPTED or partner is None:
                continue
            reason = self.step_measure.never_fits(request, partner)
            if reason is not None:
                logger.warning("prodsample: the preempted pair of requests %s and %s runs on as two single "
                               "requests: %s", request.request_id, partner.request_id, reason)
                self.pair_book.run_alone(request, partner)
                self.pair_stats.split_after_preemption += 1

    def _running_budget(self) -> _Share:
        return _Share(tokens=self.step_measure.capacity.tokens)

    def _running_blocks(self, held: Sequence[Request]) -> list[int]:
        """KV blocks each running request the step takes (all but `held`) allocates."""
        held_ids = {request.request_id for request in held}
        measure = self.step_measure
        return [measure.blocks(r, measure.tokens(r)) for r in self.running if r.request_id not in held_ids]

    def _preempt_whole_pairs(self) -> bool:
        """Preempt from the back of the running queue, a pair at a time, until the running requests this step
        takes have their KV blocks. Returns whether anything was preempted."""
        preempted = False
        while self.running:
            _, held = _walk(self.running, self._running_budget(), self.pair_book, self.step_measure, admitting=False)
            if sum(self._running_blocks(held)) <= self.kv_cache_manager.block_pool.get_num_free_blocks():
                return preempted
            victim = self.running[-1]
            partner = self.pair_book.partner(victim)
            victims = [victim] + ([partner] if partner is not None and partner in self.running else [])
            victims.sort(key=self.running.index, reverse=True)  # each goes first in the queue: earlier one last
            self.running = [request for request in self.running if request not in victims]
            now = time.monotonic()
            for request in victims:
                self._preempt_request(request, now, drop_stale_output=self.requires_kv_delivery)
            if len(victims) == 2:
                self.pair_stats.preempted += 1
            preempted = True
        return preempted


def _restored(
    before: Sequence[Request], after: Sequence[Request], held: Sequence[Request], *, fresh_first: bool
) -> list[Request]:
    """A queue after `schedule()` with the held requests back in their places: those of `before` still
    queued or held, in their order, and the requests the step put in (`fresh`) before or after them."""
    before_ids = {request.request_id for request in before}
    kept = {request.request_id for request in after} | {request.request_id for request in held}
    fresh = [request for request in after if request.request_id not in before_ids]
    old = [request for request in before if request.request_id in kept]
    return fresh + old if fresh_first else old + fresh


def keeps_pairs(vllm_config) -> bool:
    """Whether an engine of this config runs a scheduler that keeps pairs together (this module's)."""
    return issubclass(vllm_config.scheduler_config.get_scheduler_cls(), _PairStepping)


class PairedScheduler(_PairLifecycle, _PairStepping, Scheduler):
    """vLLM's synchronous `Scheduler` keeping pairs together (module docstring). The name to give vLLM
    (`SCHEDULER_CLS`): under async scheduling, constructing it yields a `PairedAsyncScheduler`."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        if cls is PairedScheduler and vllm_config.scheduler_config.async_scheduling:
            return PairedAsyncScheduler(*args, **kwargs)
        return super().__new__(cls)


class PairedAsyncScheduler(_PairLifecycle, _PairStepping, AsyncScheduler):
    """vLLM's `AsyncScheduler` keeping pairs together (module docstring)."""
