"""A run's start folded before its later events, though two consumers read them.

The dispatcher reads run-level events and starts stored on start subjects through two
consumers (``_engine.dispatcher_configs``), each in stream order but not in step with the
other. A claim folded before its run's start costs a read: the index rebuilds the run from
its history (``RunIndex.apply``), and the start, folded later, is not counted or announced
as a status of its own. So the run-level reader, before it hands on an event of a run whose
start it has not seen, waits while the starts' reader is still reading starts stored before
that event (a lagging starts' consumer catches up first). It does not wait for a reader with
nothing to read: an idle one, or one whose starts stay behind because another replica takes
them (as with one consumer, replicas fold a run's events in no set order).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import anyio

_REMEMBERED: Final = 65_536  # runs whose start was read (the oldest forgotten first)
IDLE_AFTER: Final = 0.05  # seconds without a start read: the starts' reader is idle
WAIT_AT_MOST: Final = 1.0  # seconds an event waits for starts before it goes on regardless


class StartOrder:
    """How far the starts' reader is, and which runs' starts were read. ``unread``: starts
    delivered to this replica and not yet taken by its reader."""

    def __init__(self, unread: Callable[[], int]) -> None:
        self._unread = unread
        self._read = 0  # the highest stream sequence of a start read
        self._read_at = 0.0  # when a start was last read (monotonic)
        self._runs: OrderedDict[str, None] = OrderedDict()
        self._moved = anyio.Event()
        self._waiting = False  # the run-level reader waits on ``_moved``

    def taking(self) -> None:
        """The starts' reader took a start and is handing it on."""
        self._read_at = time.monotonic()

    def read(self, run_id: str, seq: int) -> None:
        """The starts' reader handed on the start of ``run_id`` (stream sequence ``seq``)."""
        self.seen(run_id)
        self._read_at = time.monotonic()
        if seq > self._read:
            self._read = seq
            if self._waiting:  # a new event each time costs every start ~2 us
                self._moved.set()
                self._moved = anyio.Event()

    def seen(self, run_id: str) -> None:
        """``run_id``'s start was read (by either reader): its later events need not wait."""
        self._runs[run_id] = None
        self._runs.move_to_end(run_id)
        if len(self._runs) > _REMEMBERED:
            self._runs.popitem(last=False)

    def ahead(self, run_id: str, seq: int) -> bool:
        """Whether an event of ``run_id`` at ``seq`` may have to wait (:meth:`before`)."""
        return seq > self._read and run_id not in self._runs

    async def before(self, run_id: str, seq: int) -> None:
        """Return once a start of ``run_id`` stored before ``seq`` would have been read, or
        once the starts' reader has nothing more to read, or after :data:`WAIT_AT_MOST`."""
        with anyio.move_on_after(WAIT_AT_MOST):
            while self.ahead(run_id, seq):
                if not self._unread() and time.monotonic() - self._read_at > IDLE_AFTER:
                    return
                self._waiting = True
                try:
                    with anyio.move_on_after(IDLE_AFTER):
                        await self._moved.wait()
                finally:
                    self._waiting = False
