"""Writes of many runs at once go out as atomic batches (``_append_batch``: behind one send
in flight for run histories, two for the engine's run index and lifecycle events): each
write keeps its own expectation and lands where its caller is told; a batch refused for one
write's sake leaves the others to land alone; a stream without atomic batches takes them
one by one; an idle writer's write goes out at once; what queues behind a send goes as one
batch; a cancelled caller never stalls the queue."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from natflow import Client
from natflow_engine._append_batch import (
    HISTORY_SENDING,
    MAX_BATCH,
    MAX_SENDING,
    MIN_BATCH,
    Batcher,
)
from natflow_engine._connection import ERR_WRONG_LAST_SEQUENCE, JetStreamError
from natflow_engine._reader import reader
from nats.js import api
from prometheus_client import REGISTRY

from tests.helpers import wait_for

STREAM = "NATFLOW_TEST_BATCH"
# Both uses: run histories and the engine's writes.
KINDS = pytest.mark.parametrize(
    "sending", [HISTORY_SENDING, MAX_SENDING], ids=["history", "engine"]
)


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


def _counted() -> tuple[float, float]:
    """This process's natflow_append_batches and natflow_appends_batched for the stream."""
    labels = {"stream": STREAM}
    batches = REGISTRY.get_sample_value("natflow_append_batches_total", labels) or 0.0
    appends = REGISTRY.get_sample_value("natflow_appends_batched_total", labels) or 0.0
    return batches, appends


async def _write(batcher: Batcher, key: str, expected: int) -> int:
    headers = {"Nats-Expected-Last-Subject-Sequence": str(expected)}
    ack = await batcher.publish(f"batchtest.{key}", key.encode(), headers)
    return ack.seq


@pytest.mark.anyio
@KINDS
async def test_writes_of_many_keys_at_once_land_in_batches_where_each_caller_is_told(
    client: Client,
    sending: int,
) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=sending)
    counted = _counted()
    keys = [f"k{n}" for n in range(60)]
    firsts = await asyncio.gather(*(_write(batcher, k, 0) for k in keys))
    seconds = await asyncio.gather(
        *(_write(batcher, k, seq) for k, seq in zip(keys, firsts, strict=True))
    )
    assert batcher.batches >= 2 and batcher.batched >= 50  # most went out grouped
    before_batches, before_appends = counted
    after_batches, after_appends = _counted()
    assert after_batches - before_batches == batcher.batches  # as the metrics tell it
    assert after_appends - before_appends == batcher.batched
    get = reader(client.connection)
    for key, seq in zip(keys, seconds, strict=True):
        msg = await get.get(STREAM, seq)
        assert msg is not None and msg.data == key.encode()
        assert (msg.headers or {})["Nats-Subject"] == f"batchtest.{key}"


@pytest.mark.anyio
@KINDS
async def test_a_batch_refused_for_one_write_lands_the_others_alone(
    client: Client, sending: int
) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=sending)
    keys = [f"r{n}" for n in range(20)]
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
    assert batcher.batches == 1  # the first wave's; the second's was refused whole


@pytest.mark.anyio
@KINDS
async def test_a_stream_without_atomic_batches_takes_the_writes_one_by_one(
    client: Client,
    sending: int,
) -> None:
    await _stream(client, atomic=False)  # as an older natflow created it
    batcher = Batcher(client.connection, STREAM, sending=sending)
    seqs = await asyncio.gather(*(_write(batcher, f"p{n}", 0) for n in range(10)))
    assert not batcher.enabled and batcher.batches == 0
    assert sorted(seqs) == list(range(1, 11))


async def test_an_idle_writers_write_goes_out_at_once_without_a_batch(client: Client) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=HISTORY_SENDING)
    assert batcher.next_alone()
    assert await _write(batcher, "lone", 0) == 1
    assert await _write(batcher, "lone", 1) == 2
    assert batcher.batches == 0 and batcher._in_flight == 0
    batcher._in_flight = HISTORY_SENDING  # as if a write were in flight: the next one queues
    assert not batcher.next_alone()
    batcher.pays = False  # a relaxed server: every write goes alone
    assert batcher.next_alone()


async def test_writes_made_behind_a_send_in_flight_go_as_one_batch_when_it_is_done(
    client: Client,
) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=HISTORY_SENDING)
    batcher._in_flight = 1  # as if a write were in flight
    writes = asyncio.gather(*(_write(batcher, f"q{n}", 0) for n in range(20)))
    await anyio.wait_all_tasks_blocked()
    assert len(batcher._queue) == 20  # nothing went out beside the send in flight
    batcher._release()  # it is done: the first queued caller takes the queue out
    with anyio.fail_after(10):
        seqs = await writes
    assert sorted(seqs) == list(range(1, 21))
    assert batcher.batches == 1 and batcher.batched == 20
    assert batcher._in_flight == 0 and not batcher._queue


async def test_a_whole_batch_goes_beside_the_send_in_flight(client: Client) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=HISTORY_SENDING)
    batcher._in_flight = 1  # as if a write were in flight (and stayed so)
    writes = asyncio.gather(*(_write(batcher, f"w{n}", 0) for n in range(MAX_BATCH + 10)))

    async def one_batch() -> bool:
        return batcher.batches == 1

    # The first MAX_BATCH go without waiting for the send in flight...
    await wait_for(one_batch, timeout=10, what="a whole batch")
    assert batcher.batched == MAX_BATCH and len(batcher._queue) == 10  # ...the rest wait
    batcher._release()
    with anyio.fail_after(10):
        seqs = await writes
    assert sorted(seqs) == list(range(1, MAX_BATCH + 11))
    assert batcher._in_flight == 0 and not batcher._queue


@pytest.mark.anyio
@KINDS
async def test_a_few_writes_at_once_go_alone(client: Client, sending: int) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=sending)
    seqs = await asyncio.gather(*(_write(batcher, f"s{n}", 0) for n in range(MIN_BATCH)))
    assert sorted(seqs) == list(range(1, MIN_BATCH + 1))
    # The first one or two went alone; the rest were too few to batch.
    assert batcher.batches == 0


async def test_behind_the_sends_in_flight_a_cancelled_holder_passes_the_queue_on(
    client: Client,
) -> None:
    await _stream(client)
    batcher = Batcher(client.connection, STREAM, sending=MAX_SENDING)
    batcher._in_flight = 2  # as if two writes were in flight
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
    assert batcher._in_flight == 0 and not batcher._queue
