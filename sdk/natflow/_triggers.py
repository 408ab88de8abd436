"""What a worker declares at start: the schedules and event triggers of its workflows."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgspec
from natflow_engine import (
    Connection,
    NatflowError,
    PermissionDenied,
    Schedules,
    TriggerDeclaration,
    declare,
    legacy_schedule_id,
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
        await _drop_legacy_schedule(schedules, wf)
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


async def _drop_legacy_schedule(schedules: Schedules, wf: Workflow) -> None:
    """The schedule an older natflow declared for ``wf`` under its unhashed id (a name that
    is no token): left in place, it fired beside the new one."""
    assert wf.schedule is not None
    legacy = legacy_schedule_id(wf.name)
    if legacy == wf.schedule_id:
        return
    old = await schedules.get(legacy)
    declared = wf.schedule
    if old is None or old.workflow != wf.name:
        return
    if (old.spec.cron, old.spec.every, old.spec.timezone) != (
        declared.cron,
        declared.every,
        declared.timezone,
    ):
        return  # not the one this workflow declared: someone's own schedule of it
    try:
        await schedules.delete(legacy)
    except PermissionDenied as exc:  # a worker limited to its workflows' own schedule ids
        log.warning(
            "workflow %r: its schedule is now %s; delete the one an older natflow declared "
            "under %s (natflow schedules delete %s): %s",
            wf.name,
            wf.schedule_id,
            legacy,
            legacy,
            exc,
        )
        return
    log.info("workflow %r: schedule %s replaces %s", wf.name, wf.schedule_id, legacy)
