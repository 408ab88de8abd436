"""Writes of many runs at once go out as atomic batches (``_append_batch``: by turn of the
loop for run histories, behind the sends in flight for the engine's run index and lifecycle
events): each write keeps its own expectation and lands where its caller is told; a batch
refused for one write's sake leaves the others to land alone; a stream without atomic
batches takes them one by one; a history batch never waits for the one before it; a
cancelled caller never stalls the queue."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest
from natflow import Client
from natflow_engine._append_batch import (
    MAX_IN_FLIGHT,
    MIN_BATCH,
    Batcher,
    QueueBatcher,
    TurnBatcher,
)
from natflow_engine._connection import ERR_WRONG_LAST_SEQUENCE, JetStreamError
from natflow_engine._reader import reader
from nats.js import api
from prometheus_client import REGISTRY

STREAM = "NATFLOW_TEST_BATCH"
# Both groupings; the anyio mark set here, since conftest's comes after parametrizing.
KINDS = pytest.mark.parametrize("kind", [TurnBatcher, QueueBatcher], ids=["turn", "queue"])


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
    kind: type[Batcher],
) -> None:
    await _stream(client)
    batcher = kind(client.connection, STREAM)
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
    client: Client, kind: type[Batcher]
) -> None:
    await _stream(client)
    batcher = kind(client.connection, STREAM)
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
    kind: type[Batcher],
) -> None:
    await _stream(client, atomic=False)  # as an older natflow created it
    batcher = kind(client.connection, STREAM)
    seqs = await asyncio.gather(*(_write(batcher, f"p{n}", 0) for n in range(10)))
    assert not batcher.enabled and batcher.batches == 0
    assert sorted(seqs) == list(range(1, 11))


async def test_a_caller_cancelled_holding_the_turn_passes_it_on(
    client: Client,
) -> None:
    await _stream(client)
    batcher = TurnBatcher(client.connection, STREAM)
    batcher._alone_this_turn = True  # as if a write went out alone in this turn already
    first = asyncio.ensure_future(_write(batcher, "turn-1", 0))
    second = asyncio.ensure_future(_write(batcher, "turn-2", 0))
    await asyncio.sleep(0)  # both queue; the first holds the turn, gathering the queue...
    assert batcher._turn_given and len(batcher._queue) == 2
    first.cancel()  # ... and is cancelled before it could send it
    with anyio.fail_after(10):
        assert await second > 0
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not batcher._turn_given and not batcher._queue


async def test_a_lone_write_goes_out_at_once_without_a_batch(client: Client) -> None:
    await _stream(client)
    batcher = TurnBatcher(client.connection, STREAM)
    assert await _write(batcher, "lone", 0) == 1
    await anyio.lowlevel.checkpoint()  # the loop turns
    assert await _write(batcher, "lone", 1) == 2
    assert batcher.batches == 0 and not batcher._alone_this_turn


async def test_a_batch_is_sent_while_the_one_before_it_waits_for_its_ack(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _stream(client)
    batcher = TurnBatcher(client.connection, STREAM)
    acked = anyio.Event()
    sent: list[list[str]] = []
    went = [anyio.Event(), anyio.Event()]
    atomic = batcher._atomic

    async def slow_first_ack(batch: list, timeout: float) -> list[int] | None:  # type: ignore[type-arg]
        sent.append([i.subject for i in batch])
        went[min(len(sent), 2) - 1].set()
        if len(sent) == 1:
            await acked.wait()  # the server is slow to acknowledge the first batch
        return await atomic(batch, timeout)

    monkeypatch.setattr(batcher, "_atomic", slow_first_ack)
    wave_1 = asyncio.gather(*(_write(batcher, f"a{n}", 0) for n in range(12)))
    with anyio.fail_after(10):
        await went[0].wait()
    wave_2 = asyncio.gather(*(_write(batcher, f"b{n}", 0) for n in range(12)))
    with anyio.fail_after(10):
        await went[1].wait()  # fails if the second batch waits for the first's ack
    acked.set()
    with anyio.fail_after(10):
        seqs = [*await wave_1, *await wave_2]
    assert sorted(seqs) == list(range(1, 25))
    assert sent[0] == [f"batchtest.a{n}" for n in range(1, 12)]  # a0 went alone, first
    assert sent[1] == [f"batchtest.b{n}" for n in range(1, 12)]


@pytest.mark.anyio
@KINDS
async def test_a_few_writes_at_once_go_alone(client: Client, kind: type[Batcher]) -> None:
    await _stream(client)
    batcher = kind(client.connection, STREAM)
    seqs = await asyncio.gather(*(_write(batcher, f"s{n}", 0) for n in range(MIN_BATCH)))
    assert sorted(seqs) == list(range(1, MIN_BATCH + 1))
    # The first (turn) or first two (queue) went alone; the rest were too few to batch.
    assert batcher.batches == 0


async def test_past_the_batches_in_flight_writes_go_alone(client: Client) -> None:
    await _stream(client)
    batcher = TurnBatcher(client.connection, STREAM)
    batcher._in_flight = MAX_IN_FLIGHT  # as if the server were that far behind
    seqs = await asyncio.gather(*(_write(batcher, f"f{n}", 0) for n in range(10)))
    assert sorted(seqs) == list(range(1, 11)) and batcher.batches == 0


async def test_behind_the_sends_in_flight_a_cancelled_holder_passes_the_queue_on(
    client: Client,
) -> None:
    await _stream(client)
    batcher = QueueBatcher(client.connection, STREAM)
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
