"""What a worker declares at start: the schedules and event triggers of its workflows."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgspec
from natflow_engine import (
    Connection,
    NatflowError,
    Schedules,
    TriggerDeclaration,
    declare,
)
from natflow_engine.events import utcnow

from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


def input_schema(wf: Workflow) -> Any:
    """The JSON Schema of the workflow's input (None: anything, or none could be made)."""
    if not wf.takes_input:
        return None
    try:
        return msgspec.json.schema(wf.input_type)
    except (TypeError, ValueError) as exc:
        log.warning("workflow %r: no input schema (%s); events are not checked", wf.name, exc)
        return None


async def declare_triggers(conn: Connection, workflows: Iterable[Workflow], identity: str) -> None:
    """Write each workflow's event triggers and create or update its schedule."""
    schedules = Schedules(conn)
    for wf in workflows:
        for event in wf.on_event:
            await declare(
                conn,
                TriggerDeclaration(
                    event=event,
                    workflow=wf.name,
                    queue=wf.queue,
                    takes_input=wf.takes_input,
                    input_schema=input_schema(wf),
                    declared_by=identity,
                    declared_at=utcnow(),
                ),
            )
        if wf.schedule is not None:
            await _keep_schedule(schedules, wf)


async def _keep_schedule(schedules: Schedules, wf: Workflow) -> None:
    assert wf.schedule is not None
    sid = wf.schedule_id
    if await schedules.create(sid, wf.name, b"null", wf.schedule):
        log.info("created schedule %s for workflow %r", sid, wf.name)
        return
    current = await schedules.get(sid)
    if current is None:
        raise NatflowError(f"schedule {sid!r} vanished while it was being created; restart")
    old = current.spec
    new = msgspec.structs.replace(
        old,
        cron=wf.schedule.cron,
        every=wf.schedule.every,
        timezone=wf.schedule.timezone,
        queue=wf.schedule.queue,
    )
    if new != old or current.workflow != wf.name:
        await schedules.update(sid, workflow=wf.name, spec=new)
        log.info("updated schedule %s for workflow %r", sid, wf.name)
