"""Starts the dispatcher looks after once their grace has passed, not at once.

A client creates a run (``run_started``) and then enqueues its task; a client that dies in
between would lose the start, so the dispatcher makes sure a task exists. Doing that for every
start as it passes costs two round trips per run (read the run's last event, try the
enqueue) on the busiest path, and it races the worker: a run claimed, finished and its task
acknowledged between the read and the enqueue gets a second, useless task.

So the dispatcher holds each start's message unacknowledged for :data:`START_GRACE` seconds.
Any later event of the run in the dispatcher's stream (a claim, a step, its end) shows a
worker has it: the message is acknowledged then and nothing is read or enqueued. Only a start
still alone after its grace is checked as before. The grace is counted on the stream's
clock (the server's timestamps of the events the dispatcher has reached) so a dispatcher
that lags behind the stream does not check starts whose claim it simply has not read yet;
and on the wall clock only while it has caught up (nothing more to read), so a lone start on
an idle system is still checked. An engine that dies meanwhile leaves the
message unacknowledged, so it comes back (after the consumer's ack deadline) to a replica
that checks it: no start is lost.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from nats.aio.msg import Msg

from .events import RunStarted

# Seconds a start may wait for its worker before the engine looks: longer than a run usually
# waits in its queue under load (a start checked while its task is still queued costs a read
# and a refused enqueue), short beside the consumer's 30 s ack deadline.
START_GRACE: Final = 5.0
MAX_WATCHED: Final = 4096  # beyond this, the oldest is checked at once (ack-pending budget)
_REMEMBERED: Final = 100_000  # ids of runs recently seen starting at once


@dataclass
class WatchedStart:
    run_id: str
    start: RunStarted
    msg: Msg
    due: float  # time.monotonic()
    due_stored: float  # the server's clock (seconds since the epoch) of stored messages


class StartWatch:
    """Unacknowledged ``run_started`` messages, oldest first, until their run moves on."""

    def __init__(self, grace: float = START_GRACE, limit: int = MAX_WATCHED) -> None:
        self.grace = grace
        self.limit = limit
        self._waiting: OrderedDict[str, WatchedStart] = OrderedDict()
        self._immediate: OrderedDict[str, None] = OrderedDict()  # oldest first, bounded

    def started_now(self, run_id: str) -> bool:
        """Whether this engine saw the run start without a delay (so it has no start
        timer). False when it does not know (the start was read by another replica)."""
        return run_id in self._immediate

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, run_id: str, start: RunStarted, msg: Msg, stored: float) -> Msg | None:
        """Watch a start stored at ``stored`` (server time, seconds since the epoch);
        returns an earlier delivery of it (to acknowledge), if any."""
        earlier = self._waiting.pop(run_id, None)
        self._immediate[run_id] = None
        if len(self._immediate) > _REMEMBERED:
            self._immediate.popitem(last=False)
        self._waiting[run_id] = WatchedStart(
            run_id, start, msg, time.monotonic() + self.grace, stored + self.grace
        )
        return earlier.msg if earlier is not None else None

    def moved_on(self, run_id: str) -> Msg | None:
        """The run has an event after its start: stop watching; returns the message to ack."""
        if not self._waiting:
            return None
        watched = self._waiting.pop(run_id, None)
        return watched.msg if watched is not None else None

    def due(self, reached: float, caught_up: bool, now: float | None = None) -> list[WatchedStart]:
        """Starts whose grace has passed, removed: on the stream's clock (``reached``: when
        the newest message the dispatcher has read was stored), or on the wall clock if the
        dispatcher has ``caught_up``; and the oldest beyond the limit."""
        now = time.monotonic() if now is None else now
        out: list[WatchedStart] = []
        while self._waiting:
            watched = next(iter(self._waiting.values()))
            late = watched.due_stored <= reached or (caught_up and watched.due <= now)
            if not late and len(self._waiting) <= self.limit:
                break
            out.append(self._waiting.pop(watched.run_id))
        return out

    def drop(self) -> list[Msg]:
        """Forget every watched start (they come back unacknowledged to some replica)."""
        msgs = [w.msg for w in self._waiting.values()]
        self._waiting.clear()
        return msgs
