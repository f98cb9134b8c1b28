"""`RecordReader`: the rollouts that finish while a read is in flight are read together by the next read, each
waiter gets its own record (or {}), and a failed read fails every rollout it carried."""

import asyncio

import pytest

from prodsample.vllm.record_reader import RecordReader


class Engine:
    """`take_records` of an engine whose first read waits for `release`, holding every rollout but "gone"."""

    def __init__(self, error: Exception | None = None) -> None:
        self.reads: list[list[str]] = []
        self.release = asyncio.Event()
        self.error = error

    async def take_records(self, names: list[str]) -> dict:
        self.reads.append(sorted(names))
        if len(self.reads) == 1:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return {name: f"record of {name}" for name in names if name != "gone"}


async def finish(engine: Engine, reader: RecordReader, names: list[str]):
    first = asyncio.create_task(reader.take("first"))
    await asyncio.sleep(0)  # its read is in flight
    rest = [asyncio.create_task(reader.take(name)) for name in names]
    await asyncio.sleep(0)  # they finished during it
    engine.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_rollouts_finishing_during_a_read_are_read_together_by_the_next():
    engine = Engine()
    reader = RecordReader(engine.take_records)
    got = asyncio.run(finish(engine, reader, ["b", "c", "gone"]))
    assert got == [{"first": "record of first"}, {"b": "record of b"}, {"c": "record of c"}, {}]
    assert engine.reads == [["first"], ["b", "c", "gone"]] and reader.reads == 2  # 4 rollouts, 2 reads


def test_a_failed_read_fails_every_rollout_it_carried():
    engine = Engine(error=ConnectionError("engine gone"))
    reader = RecordReader(engine.take_records)
    got = asyncio.run(finish(engine, reader, ["b", "c"]))
    assert all(isinstance(result, ConnectionError) for result in got) and len(engine.reads) == 2
