"""Pausing a whole queue: its workers are handed no task until it is resumed.

A queue's tasks reach its workers through one durable consumer per workflow served there
(``queue_consumer(queue, workflow)``), and its new runs through one more on the history stream
(``start_consumer(queue, workflow)``); pausing the queue pauses each of those consumers on the
server (``pause_until`` far ahead), so no run of the queue is taken and none starts a step,
whichever worker or how many. The pause lives in JetStream: it survives restarts of workers,
engines and the server, and a worker starting up leaves it alone. Workers look at their
consumers' pause state on every heartbeat: a run a worker holds of a paused queue starts no
further step and, once its running steps are recorded, goes back to the queue (as a draining
worker's runs do) to wait for the resume.

A queue's consumers exist once a worker has served it: pausing a queue no worker ever served
is refused (nothing would hold the pause), and a workflow first served on a paused queue gets
a consumer of its own that is not paused (pause the queue again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ._connection import Connection
from ._errors import NatflowError
from ._names import check_queue
from ._streams import HISTORY_STREAM, TASK_STREAM, ensure_streams, queue_consumer, start_consumer

FOREVER: Final = "2999-12-31T00:00:00Z"


async def queue_consumers(conn: Connection, queue: str) -> list[str]:
    """The names of the queue's task consumers (one per workflow a worker served there)."""
    check_queue(queue)
    return await _named(conn, TASK_STREAM, queue_consumer(queue, "x")[:-1])


async def _named(conn: Connection, stream: str, prefix: str) -> list[str]:
    """The names of ``stream``'s consumers that begin with ``prefix`` (``natflow-queue-<q>~``,
    ``natflow-start-<q>~``)."""
    infos = await conn.admin(f"consumers {prefix}*", lambda: conn.jsm.consumers_info(stream))
    return sorted(i.name for i in infos if i.name and i.name.startswith(prefix))


async def _set_paused(conn: Connection, queue: str, tasks: list[str], paused: bool) -> None:
    """Pause (or resume) the queue's start consumers, then its task consumers ``tasks``: a run
    started meanwhile waits in its consumer, not in a worker."""
    starts = await _named(conn, HISTORY_STREAM, start_consumer(queue, "x")[:-1])
    what = f"{'pausing' if paused else 'resuming'} queue {queue}"
    for stream, name in [
        *((HISTORY_STREAM, n) for n in starts),
        *((TASK_STREAM, n) for n in tasks),
    ]:
        if paused:
            await conn.admin(what, lambda s=stream, n=name: conn.jsm.pause_consumer(s, n, FOREVER))  # type: ignore[misc]
        else:
            await conn.admin(what, lambda s=stream, n=name: conn.jsm.resume_consumer(s, n))  # type: ignore[misc]


async def pause_queue(conn: Connection, queue: str) -> list[str]:
    """Pause every task and start consumer of the queue; returns the task consumers' names."""
    await ensure_streams(conn)
    names = await queue_consumers(conn, queue)
    if not names:
        raise NatflowError(
            f"queue {queue!r} has no task consumer to pause: no worker has served it yet. "
            "Start the queue's workers first (a paused queue keeps them from taking runs)"
        )
    await _set_paused(conn, queue, names, True)
    return names


async def resume_queue(conn: Connection, queue: str) -> list[str]:
    """Resume every task and start consumer of the queue; returns the task consumers' names."""
    await ensure_streams(conn)
    names = await queue_consumers(conn, queue)
    if not names:  # a mistyped name "resumed" nothing and said so with exit 0
        raise NatflowError(
            f"queue {queue!r} has no task consumer: no worker has served it yet, so nothing "
            "of it is paused. Check the queue's name (`natflow workers` lists the queues served)"
        )
    await _set_paused(conn, queue, names, False)
    return names


async def queue_paused(
    conn: Connection,
    queue: str,
    workflows: Sequence[str] | None = None,
    *,
    budget: float = 30.0,
) -> bool:
    """Whether the queue is paused: any of its consumers (of ``workflows``, else all of them).

    ``budget``: seconds to ride out a server restart.
    """
    check_queue(queue)
    if workflows is None:
        names = await queue_consumers(conn, queue)
    else:
        names = [queue_consumer(queue, w) for w in workflows]
    for name in names:
        info = await conn.admin(
            f"queue {queue}",
            lambda name=name: conn.jsm.consumer_info(TASK_STREAM, name),  # type: ignore[misc]
            budget=budget,
        )
        if info.paused:
            return True
    return False
