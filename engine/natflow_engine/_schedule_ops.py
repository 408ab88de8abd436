"""Operations on schedules, for the client and the command line: create, change, read, fire.

Everything here is a revision-checked change of the schedule's KV entry (see ``_schedules``),
except ``trigger`` and ``backfill``, which also start runs: a trigger's run id names the
moment to the millisecond and is unique (``<id>-<time>Zt<4 hex digits>``), a backfilled
fire's is the same id its fire would have had (``<id>-<fire time>``), so backfilling a range
that already ran starts nothing twice. Triggered and backfilled runs start at once, whatever
the overlap policy.
"""

from __future__ import annotations

import builtins
import logging
from datetime import datetime, timedelta
from typing import Final

import msgspec

from ._connection import Connection
from ._errors import InvalidInput, NatflowError
from ._flow_decls import start_declared
from ._kv import kv_get
from ._names import check_workflow_name
from ._runs import Runs
from ._schedules import (
    KEEP_RECENT,
    STATE_ROOM,
    Schedule,
    ScheduleFire,
    ScheduleInfo,
    ScheduleSpec,
    change_schedule,
    check_schedule_id,
    check_spec,
    create_schedule,
    delete_schedule,
    fire_run_id,
    get_schedule,
    info_of,
    list_schedules,
    trigger_run_id,
)
from ._sealing import MissingKey, open_sealed, seal, sealed_key
from ._streams import SCHEDULES_BUCKET, ensure_streams
from .events import Trigger, utcnow

log = logging.getLogger("natflow.schedules")

MAX_BACKFILL: Final = 1000


class Schedules:
    """Schedule operations over one connection (``client.schedules`` wraps this)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._runs = Runs(conn)

    def _check_input_size(self, schedule_id: str, input_json: bytes) -> None:
        # The entry holds the input beside what the schedule keeps of its fires: an input
        # that left no room for them was stored, and the schedule stopped at the first
        # pass whose entry outgrew the server's max payload.
        limit = self._conn.max_payload - STATE_ROOM
        if len(input_json) > limit:
            raise InvalidInput(
                f"the input of schedule {schedule_id!r} is {len(input_json)} bytes; a "
                f"schedule keeps its input with its recent fires in one entry, within the "
                f"server's max payload of {self._conn.max_payload} bytes, so at most {limit} "
                f"bytes of input: store large data elsewhere and pass a reference"
            )

    async def create(
        self,
        schedule_id: str,
        workflow: str,
        input_json: bytes,
        spec: ScheduleSpec,
        *,
        paused: bool = False,
        note: str | None = None,
    ) -> bool:
        """Store a new schedule; False (and nothing written) if the id is taken."""
        check_schedule_id(schedule_id)
        check_workflow_name(workflow)
        check_spec(spec)
        input_json = self._sealed(input_json)
        self._check_input_size(schedule_id, input_json)
        await ensure_streams(self._conn)
        now = utcnow()
        schedule = Schedule(
            schedule_id=schedule_id,
            workflow=workflow,
            input=msgspec.Raw(input_json),
            spec=spec,
            paused=paused,
            note=note,
            created_at=now,
            updated_at=now,
            cursor=now,
        )
        return await create_schedule(self._conn, schedule)

    async def update(
        self,
        schedule_id: str,
        *,
        workflow: str | None = None,
        input_json: bytes | None = None,
        spec: ScheduleSpec | None = None,
        note: str | None = None,
    ) -> ScheduleInfo:
        """Change what a schedule starts or when. A new timing counts from now on: fires
        the old timing left behind are not caught up under the new one."""
        if workflow is not None:
            check_workflow_name(workflow)
        if spec is not None:
            check_spec(spec)
        if input_json is not None:
            input_json = self._sealed(input_json)
            self._check_input_size(schedule_id, input_json)

        def change(s: Schedule) -> Schedule:
            now = utcnow()
            timing_changed = spec is not None and (
                (spec.cron, spec.every, spec.timezone)
                != (s.spec.cron, s.spec.every, s.spec.timezone)
            )
            return msgspec.structs.replace(
                s,
                workflow=workflow or s.workflow,
                input=s.input if input_json is None else msgspec.Raw(input_json),
                spec=spec or s.spec,
                note=s.note if note is None else note,
                updated_at=now,
                cursor=max(s.cursor, now) if timing_changed else s.cursor,
            )

        return await self._change(schedule_id, change)

    async def pause(self, schedule_id: str, note: str | None = None) -> ScheduleInfo:
        """No fire starts a run until :meth:`resume`; fires meanwhile are not caught up."""
        return await self._change(
            schedule_id,
            lambda s: msgspec.structs.replace(
                s, paused=True, note=s.note if note is None else note, updated_at=utcnow()
            ),
        )

    async def resume(self, schedule_id: str, note: str | None = None) -> ScheduleInfo:
        def change(s: Schedule) -> Schedule:
            now = utcnow()
            cursor = max(s.cursor, now) if s.paused else s.cursor
            return msgspec.structs.replace(
                s,
                paused=False,
                cursor=cursor,
                note=s.note if note is None else note,
                updated_at=now,
            )

        return await self._change(schedule_id, change)

    async def trigger(self, schedule_id: str) -> str:
        """Fire now, whatever the timing and the overlap policy; returns the run id."""
        now = utcnow()
        schedule = await self._get(schedule_id)
        run_id = trigger_run_id(schedule_id, now)
        await self._start(schedule, now, run_id)
        await self._record(
            schedule_id, [ScheduleFire(fire_time=now, action="triggered", at=now, run_id=run_id)]
        )
        return run_id

    async def backfill(
        self, schedule_id: str, start: datetime, end: datetime
    ) -> builtins.list[str]:
        """Start every fire time in ``[start, end]`` now, oldest first; returns the run ids.

        A fire that already has its run (it fired on time, or was backfilled before) starts
        nothing new.
        """
        if not isinstance(start, datetime) or not isinstance(end, datetime):
            raise InvalidInput(f"backfill takes two datetimes, not {start!r} and {end!r}")
        if start.tzinfo is None or end.tzinfo is None:
            raise InvalidInput("backfill takes aware datetimes (with a time zone)")
        if end < start:
            raise InvalidInput(f"backfill range ends ({end}) before it starts ({start})")
        schedule = await self._get(schedule_id)
        try:
            fires = schedule.spec.fire_times().between(
                start - timedelta(microseconds=1), end, MAX_BACKFILL
            )
        except OverflowError:  # at the edge of what a datetime holds (year 1, year 9999)
            raise InvalidInput(
                f"backfill range {start} to {end} reaches past the dates a schedule can fire"
            ) from None
        now = utcnow()
        done: builtins.list[ScheduleFire] = []
        for fire in fires:
            run_id = fire_run_id(schedule_id, fire)
            await self._start(schedule, fire, run_id)
            done.append(ScheduleFire(fire_time=fire, action="backfilled", at=now, run_id=run_id))
        if done:
            await self._record(schedule_id, done)
        return [f.run_id for f in done if f.run_id is not None]

    async def delete(self, schedule_id: str) -> None:
        """Remove the schedule (one natflow cannot read too); runs it started go on."""
        check_schedule_id(schedule_id)
        await ensure_streams(self._conn)
        if await kv_get(self._conn, SCHEDULES_BUCKET, schedule_id) is None:
            raise NatflowError(
                f"no schedule {schedule_id!r}; `natflow schedules list` shows the schedules"
            )
        await delete_schedule(self._conn, schedule_id)

    async def describe(self, schedule_id: str) -> ScheduleInfo:
        return self._info(await self._get(schedule_id), utcnow())

    async def list(self) -> list[ScheduleInfo]:
        await ensure_streams(self._conn)
        now = utcnow()
        return [self._info(s, now) for s, _ in await list_schedules(self._conn)]

    async def get(self, schedule_id: str) -> Schedule | None:
        check_schedule_id(schedule_id)
        await ensure_streams(self._conn)
        found = await get_schedule(self._conn, schedule_id)
        return None if found is None else found[0]

    # -- helpers -------------------------------------------------------------------------------

    async def _get(self, schedule_id: str) -> Schedule:
        schedule = await self.get(schedule_id)
        if schedule is None:
            raise NatflowError(
                f"no schedule {schedule_id!r}; `natflow schedules list` shows the schedules"
            )
        return schedule

    async def _change(self, schedule_id: str, change: object) -> ScheduleInfo:
        await self._get(schedule_id)
        changed = await change_schedule(self._conn, schedule_id, change)
        return self._info(changed, utcnow())

    def _sealed(self, input_json: bytes) -> bytes:
        """The input as stored: sealed when this connection has a codec (the engine, which
        holds no key, passes it on to each run's history as it is)."""
        codec = self._conn.codec
        return input_json if codec is None else seal(codec, input_json)

    def _info(self, schedule: Schedule, now: datetime) -> ScheduleInfo:
        """:func:`info_of`, its input opened when this connection holds the key (else it
        stays sealed: ``sealed_key(info.input)`` names the key)."""
        info = info_of(schedule, now)
        if sealed_key(info.input) is None or self._conn.codec is None:
            return info
        try:
            opened = open_sealed(self._conn.codec, bytes(schedule.input))
        except MissingKey:
            return info
        return msgspec.structs.replace(info, input=msgspec.json.decode(opened))

    async def _start(self, schedule: Schedule, fire: datetime, run_id: str) -> None:
        await start_declared(  # with the workflow's flow control
            self._runs,
            schedule.workflow,
            schedule.spec.queue,
            bytes(schedule.input),
            run_id,
            trigger=Trigger(kind="schedule", schedule=schedule.schedule_id, fire_time=fire),
        )

    async def _record(self, schedule_id: str, fires: builtins.list[ScheduleFire]) -> None:
        def change(s: Schedule) -> Schedule:
            recent = [*s.recent, *fires][-KEEP_RECENT:]
            runs = [f.run_id for f in fires if f.run_id is not None]
            if s.spec.overlap == "allow_all":
                runs = []
            return msgspec.structs.replace(s, recent=recent, open_runs=[*s.open_runs, *runs])

        try:
            await change_schedule(self._conn, schedule_id, change)
        except NatflowError as exc:  # the runs have started; only the record is missing
            log.warning("schedule %s: runs started but not recorded (%s)", schedule_id, exc)


def _timing(spec: ScheduleSpec) -> tuple[str | None, float | None, str]:
    return spec.cron, spec.every, spec.timezone
