"""New runs handed to their workers straight from history: no task is written for a start.

A run that starts now stores its ``run_started`` on
``natflow.history.<run_id>.start.<queue>.<workflow>`` (``start_subject``), and the workers of
that queue and workflow read those subjects through one durable consumer on the history stream
(``start_consumer``), as they read their tasks. So a new run costs one fsynced write where it
cost three (the start, its task, and the task's removal when acknowledged), and a worker is
handed the run one write after its start, not two.

A start delivered this way is the run's task in all but name: held unacknowledged while its run
is in hand, redelivered if its worker dies, handed back (NAK) or set aside like a task. What a
task stood for beyond that, the client and the engine check:

* The client writes the start on the run-level subject and a task, as before, wherever no
  start consumer exists for the run's queue and workflow (no worker has served it yet, or one
  of an older natflow): :func:`starts_taken`, looked up before the start is written, once
  per connection and queue and workflow (a "no" again after a few seconds, a "yes" after a
  minute). So a start either goes to a consumer that existed before it, or is a task: never
  both. A start sent to a consumer deleted since the "yes" waits for the engine's start
  watch, below.
* The engine's start watch (``_start_watch``) enqueues the task of a start still alone after its
  grace unless a start consumer still holds it (:func:`held_starts`): one that existed when the
  start was stored and has not acknowledged past it. A start stored before its consumer was
  created (it delivers new starts only; a clustered consumer lost in a leader change and
  created again starts over) is not held, so it is enqueued, as a start whose client died
  before writing its task.

While a new run's first activation holds no task, a wake-up (a signal, a cancel) finds no task
in flight and enqueues one, and nudges the holder the run's lease names (``_wake``). The holder
that takes that task takes it as a nudge; another worker leaves it while the run is held; and
the holder reads the run's history again when it lets the run go, so nothing is missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from ._connection import Connection
from ._errors import NatflowError
from ._puller import QueuePuller, durable_info, ensure_durable, queue_consumer_config
from ._streams import (
    HISTORY_STREAM,
    is_start_subject,
    run_id_of,
    start_consumer,
    start_filter,
)
from ._tasks import DEFAULT_ACK_WAIT, Task
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.starts")

# Seconds a "no start consumer" answer is trusted: a worker that starts serving the queue is
# handed new starts this long after, at the latest (tasks take them meanwhile).
NONE_TRUSTED_FOR: Final = 5.0
# Seconds a "yes" is trusted: a start consumer deleted meanwhile (by an operator) costs the
# starts of this connection the engine's start grace each, for this long at most.
SOME_TRUSTED_FOR: Final = 60.0
# A start stored this close after its consumer's creation (or before it) may not be one the
# consumer delivers (it takes new starts only, and a clustered consumer re-created in a
# leader change starts over): the engine's start watch enqueues its task instead, at worst
# a second hand on the run, which its fenced claim settles.
CREATED_MARGIN: Final = 1.0
_TAKEN: Final = "start consumers"  # conn.extras: (queue, workflow) -> (exists, when looked)
_LOOKING: Final = "start consumer lookups"  # conn.extras: (queue, workflow) -> its answer


def start_consumer_config(
    queue: str, workflow: str, ack_wait: float = DEFAULT_ACK_WAIT
) -> api.ConsumerConfig:
    return queue_consumer_config(
        start_consumer(queue, workflow),
        f"natflow workers of queue {queue!r} taking new runs of {workflow!r}",
        start_filter(queue, workflow),
        ack_wait,
        # The history holds every start ever made: a consumer created now takes the starts
        # made from now on (older ones alone are enqueued by the engine's start watch).
        deliver_policy=api.DeliverPolicy.NEW,
    )


async def ensure_start_consumer(
    conn: Connection, queue: str, workflow: str, ack_wait: float = DEFAULT_ACK_WAIT
) -> None:
    """Create the durable consumer of the workflow's new runs on the queue if missing."""
    config = start_consumer_config(queue, workflow, ack_wait)
    what = f"start consumer for workflow {workflow!r} on queue {queue}"
    await ensure_durable(conn, HISTORY_STREAM, config, what)


class StartPuller(QueuePuller):
    """One workflow's new runs on a queue as they are stored (see
    :class:`~natflow_engine._puller.Puller`)."""

    def __init__(self, conn: Connection, queue: str, workflow: str, expires: float = 5.0) -> None:
        consumer = start_consumer(queue, workflow)
        super().__init__(conn, HISTORY_STREAM, consumer, queue, workflow, expires=expires)


class _StartFields(msgspec.Struct, kw_only=True):
    """What a start delivery must show to be taken as its run's task."""

    type: str = ""
    id: str = ""
    workflow: str = ""
    queue: str = ""


_fields_decoder = msgspec.json.Decoder(_StartFields)


def start_task(msg: Msg) -> Task | str:
    """The task a start delivered from history stands for, or why it cannot be one (a
    message on a start subject that is not a start of the run its subject names)."""
    if not is_start_subject(msg.subject):
        return f"{msg.subject!r} is not a start subject"
    run_id = run_id_of(msg.subject)
    try:
        fields = _fields_decoder.decode(msg.data)
    except UNDECODABLE as exc:
        return f"the start does not decode: {exc}"
    if fields.type != "run_started" or fields.id != f"{run_id}:1":
        return f"the message on {msg.subject!r} is not the start of run {run_id!r}"
    return Task(
        run_id=run_id,
        workflow=fields.workflow,
        reason="start",
        start_seq=msg.metadata.sequence.stream,
        start=msgspec.Raw(msg.data),
    )


async def starts_taken(conn: Connection, queue: str, workflow: str) -> bool:
    """Whether the workers of ``queue`` and ``workflow`` take new runs from history (a start
    consumer exists), as last looked up on this connection (:data:`SOME_TRUSTED_FOR`,
    :data:`NONE_TRUSTED_FOR`). Any failure to look says no: the task is written, as before.
    Starts made while a lookup is in flight wait for it (a burst of starts on a new
    connection asks once, not once each)."""
    known = conn.extras.setdefault(_TAKEN, {})
    looking = conn.extras.setdefault(_LOOKING, {})
    assert isinstance(known, dict) and isinstance(looking, dict)
    key = (queue, workflow)
    cached: tuple[bool, float] | None = known.get(key)
    now = time.monotonic()
    if cached is not None and now - cached[1] < (
        SOME_TRUSTED_FOR if cached[0] else NONE_TRUSTED_FOR
    ):
        return cached[0]
    pending: asyncio.Future[bool] | None = looking.get(key)
    if pending is not None:
        return await asyncio.shield(pending)
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    looking[key] = future
    exists = False  # if this caller is cancelled, those waiting write tasks: always safe
    try:
        exists = await _consumer_exists(conn, queue, workflow)
        known[key] = (exists, now)
    finally:
        del looking[key]
        future.set_result(exists)
    return exists


async def _consumer_info(
    conn: Connection, queue: str, workflow: str, budget: float = 30.0
) -> api.ConsumerInfo | None:
    """The start consumer of ``queue`` and ``workflow``; None if there is none."""
    return await durable_info(
        conn,
        HISTORY_STREAM,
        start_consumer(queue, workflow),
        f"start consumer of workflow {workflow!r} on queue {queue}",
        budget=budget,
    )


async def _consumer_exists(conn: Connection, queue: str, workflow: str) -> bool:
    try:
        return await _consumer_info(conn, queue, workflow, budget=0.0) is not None
    except (NatflowError, nats.errors.Error) as exc:
        log.debug("could not look up the start consumer (%s): writing tasks", exc)
        return False


async def held_starts(conn: Connection, starts: Iterable[tuple[str, str, int, float]]) -> set[int]:
    """The stream sequences among ``starts`` (queue, workflow, stream sequence and storage
    time of a start stored on its start subject) that a start consumer still holds: one
    that existed when the start was stored (by :data:`CREATED_MARGIN`) and has not
    acknowledged past it. One lookup per queue and workflow."""
    consumers: dict[tuple[str, str], tuple[int, float] | None] = {}
    held: set[int] = set()
    for queue, workflow, seq, stored in starts:
        key = (queue, workflow)
        if key not in consumers:
            consumers[key] = await _floor_and_birth(conn, queue, workflow)
        found = consumers[key]
        if found is not None and seq > found[0] and stored > found[1] + CREATED_MARGIN:
            held.add(seq)
    return held


async def _floor_and_birth(conn: Connection, queue: str, workflow: str) -> tuple[int, float] | None:
    """The stream sequence the start consumer has acknowledged everything up to, and when
    it was created (seconds since the epoch); None when there is no such consumer."""
    info = await _consumer_info(conn, queue, workflow)
    if info is None:
        return None
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    return floor, _seconds(info.created)


def _seconds(created: datetime | None) -> float:
    """A consumer's creation time in seconds since the epoch; the distant future where the
    server did not say (then nothing is held)."""
    return created.timestamp() if created is not None else float("inf")
