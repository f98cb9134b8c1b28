"""Reading the records of finished rollouts from an engine, many per read: each read is one call into the
engine (an RPC the engine serves between two steps), so the rollouts that finish while a read is in flight
are read together by the next one. Used by the server client (`prodsample.vllm.client`), the server's records
endpoint (`prodsample.vllm.middleware`) and verl's rollout server (`prodsample.verl.server`). Imports no vLLM: the
engine client is duck-typed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from .pairing import RolloutRecord, records_from_workers

__all__ = ["RecordReader", "TakeRecords", "every_worker", "take_records_from"]

TakeRecords = Callable[[list[str]], Awaitable[dict[str, RolloutRecord]]]


class RecordReader:
    """Coalesces `take(rollout)` calls into reads of `take_records(names)` (which returns the records the engine
    holds among `names`, forgetting them there), one read in flight at a time."""

    def __init__(self, take_records: TakeRecords) -> None:
        self.take_records = take_records
        self.waiting: dict[str, asyncio.Future] = {}
        self.reading = asyncio.Lock()
        self.reads = 0  # calls of take_records so far

    async def take(self, rollout: str) -> dict[str, RolloutRecord]:
        """{rollout: its record}, or {} if the engine has none for it."""
        mine = asyncio.get_running_loop().create_future()
        self.waiting[rollout] = mine
        async with self.reading:
            if not mine.done():  # no earlier read took it along
                batch, self.waiting = self.waiting, {}
                self.reads += 1
                try:
                    records = await self.take_records(list(batch))
                except BaseException as error:
                    for waiter in batch.values():
                        if waiter is mine:
                            continue  # raised here
                        if isinstance(error, Exception):
                            waiter.set_exception(error)
                        else:
                            waiter.cancel()
                    raise
                for name, waiter in batch.items():
                    waiter.set_result({name: records[name]} if name in records else {})
        return await mine


async def every_worker(engine, method: str, *args) -> list:
    """`method` of the worker extension on every worker of every data-parallel engine of `engine` (vLLM's
    `AsyncLLM`), one result per worker. Not `engine.collective_rpc`: under data-parallel balancing it runs on
    every engine but returns engine 0's results only (vllm/v1/engine/core_client.py,
    `DPLBAsyncMPClient.call_utility_async`), and would delete the other engines' records unread."""
    per_engine = await engine.engine_core.call_utility_all_async("collective_rpc", method, None, args, None)
    return [result for workers in per_engine for result in workers]


async def take_records_from(engine, rollouts: list[str]) -> dict[str, RolloutRecord]:
    """The records `engine`'s workers hold among `rollouts`, forgetting them there
    (`prodsample.vllm.processor.RecordsExtension.prodsample_take_records`)."""
    return records_from_workers(await every_worker(engine, "prodsample_take_records", json.dumps(rollouts)))
