"""``client.schedules``: create, change, pause, fire and read schedules.

A schedule starts a workflow at the times its ``cron`` expression (in ``timezone``) or its
``every`` interval names, served by the engine (any number of replicas, never a fire twice).
Each fire's run id is ``<schedule_id>-<fire time>``, e.g. ``nightly-20261126T000000Z``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

from natflow_engine import (
    Connection,
    InvalidInput,
    NatflowError,
    ScheduleInfo,
    Schedules,
    ScheduleSpec,
    check_spec,
    decode_value,
    encode_value,
    to_seconds,
)

from ._handle import RunHandle
from ._workflow import Workflow

_UNSET: Final[Any] = object()


def _target(workflow: Workflow | str) -> tuple[str, str | None, Workflow | None]:
    if isinstance(workflow, Workflow):
        return workflow.name, workflow.queue, workflow
    if isinstance(workflow, str):
        return workflow, None, None
    raise InvalidInput(f"a schedule takes a @workflow or its name, not {workflow!r}")


def _input(definition: Workflow | None, name: str, value: Any) -> bytes:
    data = encode_value(f"input of schedule for {name!r}", value)
    if definition is not None and definition.takes_input:
        decode_value(f"input of workflow {name!r}", data, definition.input_type)
    return data


def make_spec(
    *,
    cron: str | None,
    every: float | timedelta | None,
    timezone: str,
    queue: str,
    overlap: str,
    catchup_window: float | timedelta,
    jitter: float | timedelta | None,
) -> ScheduleSpec:
    """A checked :class:`ScheduleSpec` from the keyword arguments users pass."""
    return check_spec(
        ScheduleSpec(
            cron=cron,
            every=None if every is None else to_seconds("every", every),
            timezone=timezone,
            queue=queue,
            overlap=overlap,
            catchup_window=to_seconds("catchup_window", catchup_window),
            jitter=0.0 if jitter is None else to_seconds("jitter", jitter),
        )
    )


class ScheduleClient:
    """Schedules, as ``client.schedules``.

    Example::

        await client.schedules.create("nightly", report, {"full": True}, cron="0 2 * * *",
                                      timezone="Europe/Berlin", overlap="buffer_one")
        info = await client.schedules.describe("nightly")
        print(info.next_fire_times)
    """

    def __init__(self, conn: Connection, handle: Callable[[str], RunHandle]) -> None:
        """``handle`` makes the handle of a fired run from its id (``Client.handle``)."""
        self._handle = handle
        self._ops = Schedules(conn)

    async def create(
        self,
        schedule_id: str,
        workflow: Workflow | str,
        input: Any = None,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str = "UTC",
        queue: str | None = None,
        overlap: str = "skip",
        catchup_window: float | timedelta = timedelta(days=1),
        jitter: float | timedelta | None = None,
        paused: bool = False,
        note: str | None = None,
    ) -> ScheduleInfo:
        """Create a schedule that starts ``workflow`` with ``input`` at every fire time.

        Exactly one of ``cron`` (five fields, or an ``@daily``-style alias, read in
        ``timezone``) and ``every`` (whole seconds, at least 1) is given. ``overlap`` says
        what a fire does while the schedule's previous run is still open: ``"skip"``,
        ``"buffer_one"``, ``"buffer_all"``, ``"cancel_other"``, ``"terminate_other"`` or
        ``"allow_all"``. Fires missed while no engine ran start on recovery if they lie
        within ``catchup_window``, else they are recorded as missed. ``jitter`` delays each
        fire by up to that much. An existing id is :class:`NatflowError`.
        """
        name, default_queue, definition = _target(workflow)
        spec = make_spec(
            cron=cron,
            every=every,
            timezone=timezone,
            queue=queue or default_queue or "default",
            overlap=overlap,
            catchup_window=catchup_window,
            jitter=jitter,
        )
        data = _input(definition, name, input)
        if not await self._ops.create(schedule_id, name, data, spec, paused=paused, note=note):
            raise NatflowError(
                f"schedule {schedule_id!r} exists; change it with schedules.update or delete it"
            )
        return await self._ops.describe(schedule_id)

    async def update(
        self,
        schedule_id: str,
        workflow: Workflow | str | None = None,
        input: Any = _UNSET,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str | None = None,
        queue: str | None = None,
        overlap: str | None = None,
        catchup_window: float | timedelta | None = None,
        jitter: float | timedelta | None = None,
        note: str | None = None,
    ) -> ScheduleInfo:
        """Change the given parts of a schedule; the rest stays. Giving ``cron`` replaces
        ``every`` and the other way round. A new timing counts from now on."""
        current = await self.describe(schedule_id)
        old = current.spec
        name, default_queue, definition = (
            _target(workflow) if workflow is not None else (current.workflow, None, None)
        )
        spec = make_spec(
            cron=cron if cron is not None else (old.cron if every is None else None),
            every=every if every is not None else (old.every if cron is None else None),
            timezone=timezone or old.timezone,
            queue=queue or default_queue or old.queue,
            overlap=overlap or old.overlap,
            catchup_window=old.catchup_window if catchup_window is None else catchup_window,
            jitter=old.jitter if jitter is None else jitter,
        )
        data = None if input is _UNSET else _input(definition, name, input)
        return await self._ops.update(
            schedule_id, workflow=name, input_json=data, spec=spec, note=note
        )

    async def pause(self, schedule_id: str, note: str | None = None) -> ScheduleInfo:
        """Stop firing until :meth:`resume`; fires meanwhile are not caught up."""
        return await self._ops.pause(schedule_id, note)

    async def resume(self, schedule_id: str, note: str | None = None) -> ScheduleInfo:
        return await self._ops.resume(schedule_id, note)

    async def trigger(self, schedule_id: str) -> RunHandle:
        """Fire now (whatever the overlap policy); returns the new run's handle."""
        return self._handle(await self._ops.trigger(schedule_id))

    async def backfill(
        self, schedule_id: str, start: datetime, end: datetime
    ) -> builtins.list[RunHandle]:
        """Start every fire time in ``[start, end]`` now, oldest first (at most 1000).

        A fire that already ran starts nothing new: its run id is the same.
        """
        run_ids = await self._ops.backfill(schedule_id, start, end)
        return [self._handle(run_id) for run_id in run_ids]

    async def delete(self, schedule_id: str) -> None:
        """Remove the schedule; the runs it started go on."""
        await self._ops.delete(schedule_id)

    async def describe(self, schedule_id: str) -> ScheduleInfo:
        """The schedule's :class:`ScheduleInfo`: spec, next fire times, recent runs, missed."""
        return await self._ops.describe(schedule_id)

    async def list(self) -> builtins.list[ScheduleInfo]:
        """Every schedule, by id."""
        return await self._ops.list()
