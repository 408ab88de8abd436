"""The task queue: "this run has something to do", one pending task per run.

A task is a message on ``natflow.task.<queue>.<run_id>`` in the ``NATFLOW_TASKS`` work-queue
stream. The stream keeps at most one message per subject, so a wake-up that finds a task
pending or in flight is refused (error 10077) and costs nothing: the holder re-checks the
run's history after it acknowledges, which closes the lost-wake-up race (NATS.md §8).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Final

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js import api

from ._connection import ERR_MAX_MSGS_PER_SUBJECT, Connection, JetStreamError
from ._streams import TASK_PREFIX, TASK_STREAM, queue_consumer, task_subject

log = logging.getLogger("natflow.tasks")

DEFAULT_ACK_WAIT: Final = 15.0


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a task message. Only ``run_id`` matters; history holds the truth."""

    v: int = 1
    run_id: str
    workflow: str = ""
    reason: str = ""


_task_encoder = msgspec.json.Encoder()
_task_decoder = msgspec.json.Decoder(Task)


def decode_task(data: bytes) -> Task:
    return _task_decoder.decode(data)


async def enqueue(conn: Connection, queue: str, task: Task) -> bool:
    """Make the run runnable. False if a task for it is already pending or in flight."""
    try:
        await conn.publish(task_subject(queue, task.run_id), _task_encoder.encode(task))
        return True
    except JetStreamError as exc:
        if exc.err_code == ERR_MAX_MSGS_PER_SUBJECT:
            return False
        raise


def consumer_config(queue: str, ack_wait: float = DEFAULT_ACK_WAIT) -> api.ConsumerConfig:
    name = queue_consumer(queue)
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"natflow workers of queue {queue!r}",
        filter_subject=f"{TASK_PREFIX}.{queue}.*",
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
        max_waiting=4096,
    )


async def ensure_consumer(conn: Connection, queue: str, ack_wait: float = DEFAULT_ACK_WAIT) -> None:
    """Create the queue's durable consumer if missing (shared by every worker of the queue)."""
    config = consumer_config(queue, ack_wait)
    await conn.admin(
        f"consumer for queue {queue}", lambda: conn.jsm.add_consumer(TASK_STREAM, config=config)
    )


class TaskPuller:
    """A queue's tasks as they arrive, pulled with raw ``CONSUMER.MSG.NEXT`` requests.

    Each pull request asks for as many tasks as the worker has free slots and lingers until
    they arrive or it expires; every task is handed over the moment it arrives. (nats-py's
    ``fetch(n)`` instead waits for all ``n`` or for its timeout, which would hold a lone
    task for seconds on an idle queue.) Requests the server forgot (a restart, an expiry
    it reported) are re-issued.
    """

    def __init__(self, conn: Connection, queue: str, expires: float = 5.0) -> None:
        self._conn = conn
        self.queue = queue
        self._expires = expires
        self._subject = f"{conn.api}.CONSUMER.MSG.NEXT.{TASK_STREAM}.{queue_consumer(queue)}"
        self._inbox = conn.nc.new_inbox()
        self._send, self.tasks = anyio.create_memory_object_stream[Msg](math.inf)
        self._sub: Any = None
        self.pending = 0  # tasks asked for and not yet delivered
        self._requested_at = 0.0
        self.refused = False  # the server turned a request down: back off, re-check consumer
        self.changed = anyio.Event()
        conn.on_reconnect.append(self._forget_requests)

    async def start(self) -> None:
        self._sub = await self._conn.nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        """Withdraw interest: the server drops this puller's requests, delivering nothing
        more to it (a task delivered to a dead inbox would wait out its ack deadline)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        self._send.close()

    async def request(self, count: int) -> None:
        if count <= 0 or self._sub is None:
            return
        body = _pull_encoder.encode({"batch": count, "expires": int(self._expires * 1e9)})
        await self._conn.nc.publish(self._subject, body, reply=self._inbox)
        self.pending += count
        self._requested_at = time.monotonic()

    def stale(self) -> bool:
        """True when outstanding requests should have expired long ago (none reported)."""
        return self.pending > 0 and time.monotonic() - self._requested_at > self._expires + 2

    def _forget_requests(self) -> None:
        self.pending = 0
        self._notify()

    def wake(self) -> None:
        """Something changed (a run slot freed): re-check how many tasks to ask for."""
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self.pending = max(0, self.pending - 1)
            self._send.send_nowait(msg)
        elif status == "100":
            return  # idle heartbeat
        else:  # 408 expired / 409 refused / 404 none: the request's undelivered rest is void
            left = int(headers.get("Nats-Pending-Messages", "0")) if headers else 0
            if status != "408" and not left:
                log.warning(
                    "pull request on queue %s refused: %s %s",
                    self.queue,
                    status,
                    headers.get("Description", "") if headers else "",
                )
                left = self.pending
                self.refused = True
            self.pending = max(0, self.pending - left)
        self._notify()


_pull_encoder = msgspec.json.Encoder()
