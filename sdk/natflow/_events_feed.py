"""``client.events()``: follow the engine's lifecycle events (one per run status change)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from natflow_engine import (
    LIFECYCLE_STREAM,
    RUN_STATUSES,
    Connection,
    InvalidInput,
    LifecycleEvent,
    NatflowError,
    check_cancelled,
    check_token,
    check_workflow_name,
    decode_lifecycle,
    ensure_streams,
    lifecycle_filter,
    quietly,
)
from nats.js import api

log = logging.getLogger("natflow.client")

# One at a time: nats-py's fetch(n) holds the first message of a lingering pull until all n
# arrive or the pull expires, which would delay a lone event by seconds.
_FETCH = 1


async def follow(
    conn: Connection,
    workflow: str | None,
    status: str | None,
    *,
    durable: str | None,
    from_start: bool,
) -> AsyncIterator[LifecycleEvent]:
    """Lifecycle events matching the filters; see :meth:`natflow.Client.events`."""
    if status is not None and status not in RUN_STATUSES:  # would match nothing, for good
        raise InvalidInput(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    if workflow is not None:
        check_workflow_name(workflow)
    await ensure_streams(conn)
    subject = lifecycle_filter(workflow, status)
    if durable is None:
        async for event in _ephemeral(conn, subject, from_start):
            yield event
        return
    check_token("durable name", durable)
    async for event in _durable(conn, subject, durable, from_start):
        yield event


async def _ephemeral(
    conn: Connection, subject: str, from_start: bool
) -> AsyncIterator[LifecycleEvent]:
    policy = api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW
    try:
        sub = await conn.js.subscribe(
            subject,
            stream=LIFECYCLE_STREAM,
            ordered_consumer=True,
            deliver_policy=policy,
            idle_heartbeat=0.4,  # a server restart is noticed within a second (Client.watch)
        )
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise NatflowError(f"cannot follow lifecycle events on {subject!r}: {exc}") from exc
    try:
        check_cancelled()  # one lost in the subscribe (3.11): the feed waited for good
        async for msg in sub.messages:
            yield decode_lifecycle(msg.data)
    finally:
        await quietly(sub.unsubscribe(), "leaving the lifecycle subscription")


async def _durable(
    conn: Connection, subject: str, durable: str, from_start: bool
) -> AsyncIterator[LifecycleEvent]:
    """A durable pull consumer: the server remembers what was acknowledged, so the next
    call with the same name goes on where this one stopped (an event is acknowledged once
    the caller asks for the next, or leaves its loop)."""
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW,
        ack_wait=30.0,
    )
    try:
        sub = await conn.js.pull_subscribe(
            subject, durable=durable, stream=LIFECYCLE_STREAM, config=config
        )
        # nats-py binds to an existing durable whatever its filter: the loop got the events
        # of the filter the name was first used with, not the ones asked for.
        kept = (await sub.consumer_info()).config.filter_subject
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise NatflowError(
            f"cannot follow lifecycle events as {durable!r} on {subject!r}: {exc} (a durable "
            f"name keeps the filter it was first used with)"
        ) from exc
    if kept != subject:
        await quietly(sub.unsubscribe(), "leaving the lifecycle subscription")
        raise NatflowError(
            f"the durable name {durable!r} follows {kept!r}, not {subject!r}: a durable name "
            f"keeps the workflow and status it was first used with; use another name"
        )
    try:
        while True:
            check_cancelled()  # one lost in a fetch (3.11): it fetched on for good
            try:
                msgs = await sub.fetch(batch=_FETCH, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                try:
                    yield decode_lifecycle(msg.data)
                finally:  # seen once the caller asks for the next event, or leaves the loop
                    await quietly(msg.ack())
    finally:
        await quietly(sub.unsubscribe(), "leaving the lifecycle subscription")
