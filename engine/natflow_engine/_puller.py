"""Pulling from a durable consumer with raw ``CONSUMER.MSG.NEXT`` requests.

Each pull request asks for as many messages as the caller can take and lingers until they
arrive or it expires; every message is handed over the moment it arrives. (nats-py's
``fetch(n)`` instead waits for all ``n`` or for its timeout, which would hold a lone message
for seconds on an idle consumer.) Requests the server forgot (a restart, an expiry it
reported) are re-issued.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ._connection import Connection
from ._errors import NatflowError

log = logging.getLogger("natflow.pull")

_encoder = msgspec.json.Encoder()


def engine_consumer(name: str, description: str, subjects: str | list[str]) -> api.ConsumerConfig:
    """A durable consumer an engine service reads everything through, from the start.

    Shared by every engine replica; a message a replica took and did not acknowledge (it
    died) comes back after 30 s. ``subjects``: one filter, or several.
    """
    one = subjects if isinstance(subjects, str) else None
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        description=description,
        filter_subject=one,
        filter_subjects=None if one is not None else list(subjects),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=20_000,
    )


def queue_consumer_config(
    name: str,
    description: str,
    subjects: str,
    ack_wait: float,
    deliver_policy: api.DeliverPolicy = api.DeliverPolicy.ALL,
) -> api.ConsumerConfig:
    """A durable pull consumer that the workers of one queue and workflow share (their tasks,
    their new runs' starts): explicit acks within ``ack_wait``, redelivered without limit."""
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        description=description,
        filter_subject=subjects,
        deliver_policy=deliver_policy,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
        max_waiting=4096,
    )


async def ensure_durable(
    conn: Connection, stream: str, config: api.ConsumerConfig, what: str
) -> None:
    """Create the durable consumer ``config`` names on ``stream`` if missing."""
    await conn.admin(what, lambda: conn.jsm.add_consumer(stream, config=config))


async def durable_info(
    conn: Connection, stream: str, name: str, what: str, *, budget: float = 30.0
) -> api.ConsumerInfo | None:
    """The durable consumer ``name`` on ``stream``; None if there is none."""
    try:
        return await conn.admin(what, lambda: conn.jsm.consumer_info(stream, name), budget=budget)
    except nats.js.errors.NotFoundError:
        return None


class Puller:
    def __init__(
        self, conn: Connection, stream: str, consumer: str, *, expires: float = 5.0
    ) -> None:
        self._conn = conn
        self.consumer = consumer
        self._expires = expires
        self._subject = f"{conn.api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = conn.nc.new_inbox()
        self._send, self.messages = anyio.create_memory_object_stream[Msg](math.inf)
        self._sub: Any = None
        self.pending = 0  # messages asked for and not yet delivered
        self._requested_at = 0.0
        self.refused = False  # the server turned a request down: back off, re-check consumer
        self.changed = anyio.Event()
        # What keep_asking keeps asked for; until it runs, every change wakes it.
        self._capacity: Callable[[], int] | None = None
        self._at_least = 1
        conn.on_reconnect.append(self._forget_requests)

    async def start(self) -> None:
        self._sub = await self._conn.nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        """Withdraw interest: the server drops this puller's requests, delivering nothing
        more to it (a message delivered to a dead inbox would wait out its ack deadline)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        self._send.close()

    async def request(self, count: int) -> None:
        if count <= 0 or self._sub is None:
            return
        body = _encoder.encode({"batch": count, "expires": int(self._expires * 1e9)})
        await self._conn.send(self._subject, body, reply=self._inbox)
        self.pending += count
        self._requested_at = time.monotonic()

    async def keep_asking(
        self,
        capacity: Callable[[], int],
        on_refused: Callable[[], Any] | None = None,
        *,
        at_least: int = 1,
    ) -> None:
        """Forever keep ``capacity()`` messages asked for (less those still pending), in
        requests of ``at_least`` messages while others are still pending (fewer, larger pull
        requests for a consumer that takes many)."""
        self._capacity, self._at_least = capacity, at_least
        while True:
            if self.refused:
                self.refused = False
                await anyio.sleep(1.0)
                if on_refused is not None:
                    with contextlib.suppress(NatflowError, Exception):
                        await on_refused()
            if self.stale():
                self.pending = 0
            if self.changed.is_set():  # a fresh one only when the last was used (see _notify)
                self.changed = anyio.Event()
            changed = self.changed
            try:
                await self.request(self._to_ask())
            except Exception as exc:  # disconnected: the reconnect hook resets, retry soon
                log.debug("pull request on %s failed: %s", self.consumer, exc)
            with anyio.move_on_after(1.0):
                await changed.wait()

    def stale(self) -> bool:
        """True when outstanding requests should have expired long ago (none reported)."""
        return self.pending > 0 and time.monotonic() - self._requested_at > self._expires + 2

    def _forget_requests(self) -> None:
        self.pending = 0
        self._notify()

    def wake(self) -> None:
        """Something changed (capacity freed): re-check how many messages to ask for. A
        message or a freed slot that would not make keep_asking ask does not wake it: a
        wake-up that asked for nothing was a turn of its task for every message and, per
        run, for every puller (an idle worker's CPU from a new run's delivery to its first
        step fell by ~25 us without them)."""
        if self._capacity is None or self._to_ask() > 0:
            self._notify()

    def _to_ask(self) -> int:
        """How many messages keep_asking asks for now (0: none): the capacity not asked for,
        once it reaches ``at_least`` or nothing at all is asked for."""
        assert self._capacity is not None
        want = self._capacity() - self.pending
        return want if want >= self._at_least or self.pending <= 0 else 0

    def _notify(self) -> None:
        # Set only: keep_asking replaces it before it next looks (a new event on every
        # notify cost ~2 us on the per-run path).
        self.changed.set()

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self.pending = max(0, self.pending - 1)
            self._send.send_nowait(msg)
            self.wake()
            return
        if status == "100":
            return  # idle heartbeat
        # 408 expired / 409 refused / 404 none: the request's undelivered rest is void
        left = int(headers.get("Nats-Pending-Messages", "0")) if headers else 0
        if status != "408" and not left:
            description = headers.get("Description", "") if headers else ""
            # A stream's leader being elected (at start, after a node died) refuses pulls for
            # a moment, as expected: said without alarm; the pull is asked again.
            electing = status == "503" or "Leadership Change" in description
            log.log(
                logging.INFO if electing else logging.WARNING,
                "pull request on %s refused: %s %s",
                self.consumer,
                status,
                description,
            )
            left = self.pending
            self.refused = True
        self.pending = max(0, self.pending - left)
        self._notify()


class QueuePuller(Puller):
    """A pull consumer of one workflow's runs on one queue (see :func:`queue_consumer_config`)."""

    def __init__(
        self,
        conn: Connection,
        stream: str,
        consumer: str,
        queue: str,
        workflow: str,
        expires: float = 5.0,
    ) -> None:
        super().__init__(conn, stream, consumer, expires=expires)
        self.queue = queue
        self.workflow = workflow
