"""Pausing a whole queue: its workers are handed no task until it is resumed.

A queue's tasks reach its workers through one durable consumer (``natflow-queue-<queue>``);
pausing the queue pauses that consumer on the server (``pause_until`` far ahead), so no run
of the queue is taken and none starts a step, whichever worker or how many. The pause lives
in JetStream: it survives restarts of workers, engines and the server, and a worker starting
up leaves it alone. Workers look at their queues' pause state on every heartbeat: a run a
worker holds of a paused queue starts no further step and, once its running steps are
recorded, goes back to the queue (as a draining worker's runs do) to wait for the resume.
"""

from __future__ import annotations

from typing import Final

from ._connection import Connection
from ._names import check_queue
from ._streams import TASK_STREAM, ensure_streams, queue_consumer
from ._tasks import ensure_consumer

FOREVER: Final = "2999-12-31T00:00:00Z"


async def pause_queue(conn: Connection, queue: str) -> None:
    check_queue(queue)
    await ensure_streams(conn)
    await ensure_consumer(conn, queue)
    name = queue_consumer(queue)
    await conn.admin(
        f"pausing queue {queue}", lambda: conn.jsm.pause_consumer(TASK_STREAM, name, FOREVER)
    )


async def resume_queue(conn: Connection, queue: str) -> None:
    check_queue(queue)
    await ensure_streams(conn)
    await ensure_consumer(conn, queue)
    name = queue_consumer(queue)
    await conn.admin(f"resuming queue {queue}", lambda: conn.jsm.resume_consumer(TASK_STREAM, name))


async def queue_paused(conn: Connection, queue: str, *, budget: float = 30.0) -> bool:
    """Whether the queue is paused (``budget``: seconds to ride out a server restart)."""
    check_queue(queue)
    name = queue_consumer(queue)
    info = await conn.admin(
        f"queue {queue}", lambda: conn.jsm.consumer_info(TASK_STREAM, name), budget=budget
    )
    return bool(info.paused)
