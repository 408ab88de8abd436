"""The dispatcher's lanes: events of different runs processed at once, each run's in order.

Processing one history event costs the dispatcher a few round trips (the run index write,
a lifecycle publish, timers, limits). One event at a time, the engine spends its time waiting
and falls behind a busy system while using a fraction of a core. So events are spread over a
fixed number of lanes by a stable hash of their run id: every lane is a bounded memory stream
consumed by its own task, so the events of one run are processed one after the other, in the
order the reader took them (the stream's), and the events of runs in different lanes overlap.

The lanes know nothing of what processing means; they also keep what the dispatcher needs to
know of the events it has taken and not yet finished: how many (its pull window counts them,
so nothing it asked for outlives its ack deadline), the oldest one's stored time (the clock
its start watch counts a grace on) and their messages (given back at once on shutdown).
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Final

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg

from ._handoff import Drained, send_soon

LANES: Final = 128  # runs processed at once (at most)

# The token of the event a lane's task is processing (each lane is a task of its own).
_processing: ContextVar[int] = ContextVar("natflow_lane_event")
_Queued = tuple[int, str, Msg]  # (token, run id, message): what the reader hands a lane
Process = Callable[[str, Msg], Awaitable[None]]


def lane_of(run_id: str, count: int) -> int:
    """The lane of a run: the same in every process and on every call (crc32, not hash())."""
    return zlib.crc32(run_id.encode()) % count


class Lanes:
    """Processes taken events with ``process(run_id, msg)``, at most one per run at a time
    (once :meth:`run` has started: it makes the lanes).

    ``process`` acknowledges (or NAKs) the message itself; it should not raise (an exception
    ends the dispatcher). ``on_done`` is called after each event, for the pull window.
    """

    def __init__(
        self,
        process: Process,
        *,
        count: int = LANES,
        depth: int = 256,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._process = process
        self._on_done = on_done
        self._count = count
        self._depth = depth
        self._sends: list[MemoryObjectSendStream[_Queued]] = []  # while running
        self._next = 0
        # token -> (message, when the server stored it); oldest taken first.
        self._taken: OrderedDict[int, tuple[Msg, float]] = OrderedDict()
        self._finished = anyio.Event()  # set (and replaced) as an event finishes...
        self._waiters = 0  # ...while someone waits in earlier_done (an Event costs ~µs)

    def __len__(self) -> int:
        """Events taken and not yet finished (queued in a lane or being processed)."""
        return len(self._taken)

    def oldest_stored(self) -> float:
        """When the server stored the oldest unfinished event (seconds since the epoch);
        ``math.inf`` when none is unfinished: everything taken before it is processed."""
        for _, stored in self._taken.values():
            return stored
        return math.inf

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The lanes' tasks, until cancelled; ready for :meth:`put` once started."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._count):
                send, receive = anyio.create_memory_object_stream[_Queued](self._depth)
                self._sends.append(send)
                tg.start_soon(self._lane, send, receive)
            task_status.started()

    async def put(self, run_id: str, msg: Msg, stored: float) -> None:
        """Hand the event to its run's lane (waits while that lane is full)."""
        token = self._next
        self._next += 1
        self._taken[token] = (msg, stored)
        await send_soon(self._sends[lane_of(run_id, self._count)], (token, run_id, msg))

    async def earlier_done(self) -> None:
        """Called while processing an event: wait until every event taken before it (of any
        run) is finished, for a step that must see what those did, as one at a time would."""
        token = _processing.get()
        while self._taken:
            first = next(iter(self._taken))
            if first >= token:
                return
            self._waiters += 1
            try:
                await self._finished.wait()
            finally:
                self._waiters -= 1

    def unfinished(self) -> list[Msg]:
        """Forget every taken, unfinished event; returns their messages (to NAK on shutdown)."""
        msgs = [msg for msg, _ in self._taken.values()]
        self._taken.clear()
        return msgs

    async def _lane(
        self, send: MemoryObjectSendStream[_Queued], receive: MemoryObjectReceiveStream[_Queued]
    ) -> None:
        with send, receive:  # closed with the lane
            await self._consume(receive)

    async def _consume(self, receive: MemoryObjectReceiveStream[_Queued]) -> None:
        async for token, run_id, msg in Drained(receive):
            _processing.set(token)
            await self._process(run_id, msg)
            # Not when cancelled: an event cut off mid-way stays unfinished (NAKed on shutdown).
            self._taken.pop(token, None)
            if self._waiters:
                self._finished.set()
                self._finished = anyio.Event()
            if self._on_done is not None:
                self._on_done()
