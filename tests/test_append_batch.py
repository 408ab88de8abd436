"""Writes of many runs at once go out as atomic batches (``_append_batch``, used by the
engine's run index and lifecycle events): each write keeps its own expectation and lands
where its caller is told; a batch refused for one write's sake leaves the others to land
alone; a stream without atomic batches takes them one by one; a cancelled caller never
stalls the queue."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from natflow import Client
from natflow_engine._append_batch import AppendBatcher
from natflow_engine._connection import ERR_WRONG_LAST_SEQUENCE, JetStreamError
from natflow_engine._reader import reader
from nats.js import api

STREAM = "NATFLOW_TEST_BATCH"


async def _stream(client: Client, *, atomic: bool = True) -> None:
    await client.connection.jsm.add_stream(
        api.StreamConfig(
            name=STREAM,
            subjects=["batchtest.>"],
            allow_direct=True,
            allow_atomic=atomic,
            max_msgs_per_subject=1,
        )
    )


async def _write(batcher: AppendBatcher, key: str, expected: int) -> int:
    headers = {"Nats-Expected-Last-Subject-Sequence": str(expected)}
    ack = await batcher.publish(f"batchtest.{key}", key.encode(), headers)
    return ack.seq


async def test_writes_of_many_keys_at_once_land_in_batches_where_each_caller_is_told(
    client: Client,
) -> None:
    await _stream(client)
    batcher = AppendBatcher(client.connection)
    keys = [f"k{n}" for n in range(60)]
    firsts = await asyncio.gather(*(_write(batcher, k, 0) for k in keys))
    seconds = await asyncio.gather(
        *(_write(batcher, k, seq) for k, seq in zip(keys, firsts, strict=True))
    )
    assert batcher.batches >= 2 and batcher.batched >= 50  # most went out grouped
    get = reader(client.connection)
    for key, seq in zip(keys, seconds, strict=True):
        msg = await get.get(STREAM, seq)
        assert msg is not None and msg.data == key.encode()
        assert (msg.headers or {})["Nats-Subject"] == f"batchtest.{key}"


async def test_a_batch_refused_for_one_write_lands_the_others_alone(client: Client) -> None:
    await _stream(client)
    batcher = AppendBatcher(client.connection)
    keys = [f"r{n}" for n in range(8)]
    firsts = await asyncio.gather(*(_write(batcher, k, 0) for k in keys))
    expected = list(firsts)
    expected[5] -= 1  # this writer read an older state: it must not write
    results = await asyncio.gather(
        *(_write(batcher, k, e) for k, e in zip(keys, expected, strict=True)),
        return_exceptions=True,
    )
    refused = results[5]
    assert isinstance(refused, JetStreamError) and refused.err_code == ERR_WRONG_LAST_SEQUENCE
    assert all(isinstance(r, int) and r > max(firsts) for n, r in enumerate(results) if n != 5)
    assert batcher.enabled


async def test_a_stream_without_atomic_batches_takes_the_writes_one_by_one(
    client: Client,
) -> None:
    await _stream(client, atomic=False)  # as an older natflow created it
    batcher = AppendBatcher(client.connection)
    seqs = await asyncio.gather(*(_write(batcher, f"p{n}", 0) for n in range(10)))
    assert not batcher.enabled and batcher.batches == 0
    assert sorted(seqs) == list(range(1, 11))


async def test_a_caller_cancelled_after_being_handed_the_queue_passes_it_on(
    client: Client,
) -> None:
    await _stream(client)
    batcher = AppendBatcher(client.connection)
    batcher._sending = 2  # as if two writes were in flight
    first = asyncio.ensure_future(_write(batcher, "turn-1", 0))
    second = asyncio.ensure_future(_write(batcher, "turn-2", 0))
    await anyio.wait_all_tasks_blocked()
    batcher._release()  # a write in flight is done: the queue goes to the first caller
    first.cancel()  # ... which is cancelled before it could send it
    with anyio.fail_after(10):
        assert await second > 0
    with pytest.raises(asyncio.CancelledError):
        await first
    batcher._release()  # the other one too
    assert batcher._sending == 0 and not batcher._queue
