"""Items taken from a memory stream without a loop turn each (``_handoff``): buffered items at
once, an empty stream waited on as before, a long backlog still yielding to other tasks."""

from __future__ import annotations

import anyio
from natflow_engine._handoff import YIELD_EVERY, Drained, receive_soon, send_soon


class LoopTurns:
    """Counts the event loop's turns while it runs: a task that checkpoints forever."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            await anyio.lowlevel.checkpoint()
            self.count += 1


async def test_buffered_items_are_taken_without_a_loop_turn_each() -> None:
    send, receive = anyio.create_memory_object_stream[int](YIELD_EVERY * 2)
    turns = LoopTurns()
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        await anyio.lowlevel.checkpoint()
        for i in range(YIELD_EVERY * 2):
            send.send_nowait(i)
        send.close()
        before = turns.count
        taken, turns_seen = [], []
        async for item in Drained(receive):
            taken.append(item)
            turns_seen.append(turns.count - before)
        tg.cancel_scope.cancel()
    assert taken == list(range(YIELD_EVERY * 2))  # all of them, in order, then the end
    # The first YIELD_EVERY came at once; the next went through receive(), which yields.
    assert turns_seen[YIELD_EVERY - 1] == 0
    assert turns_seen[-1] >= 1


async def test_a_drained_stream_waits_for_items_and_ends_when_closed() -> None:
    send, receive = anyio.create_memory_object_stream[str](4)
    taken: list[str] = []

    async def consume() -> None:
        async for item in Drained(receive):
            taken.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for item in ("a", "b", "c"):
            await anyio.wait_all_tasks_blocked()  # the consumer waits on an empty stream
            await send_soon(send, item)
        await anyio.wait_all_tasks_blocked()
        send.close()
    assert taken == ["a", "b", "c"]


async def test_receive_soon_takes_a_buffered_item_at_once_and_waits_for_one_otherwise() -> None:
    send, receive = anyio.create_memory_object_stream[int](2)
    turns = LoopTurns()
    async with anyio.create_task_group() as tg:
        tg.start_soon(turns.run)
        await anyio.lowlevel.checkpoint()
        send.send_nowait(1)
        before = turns.count
        assert await receive_soon(receive) == 1
        assert turns.count == before
        tg.cancel_scope.cancel()

    async def later() -> None:
        await anyio.wait_all_tasks_blocked()  # the receiver waits on the empty stream
        send.send_nowait(2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        assert await receive_soon(receive) == 2


async def test_send_soon_waits_for_room_in_a_full_stream() -> None:
    send, receive = anyio.create_memory_object_stream[int](1)
    await send_soon(send, 1)  # room: at once
    sent = anyio.Event()

    async def second() -> None:
        await send_soon(send, 2)
        sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert not sent.is_set()  # full: it waits
        assert receive.receive_nowait() == 1
        await sent.wait()
    assert receive.receive_nowait() == 2
