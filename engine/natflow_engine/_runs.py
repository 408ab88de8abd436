"""Operations on runs that need no workflow code: start, describe, steps, history."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import msgspec

from ._connection import Connection
from ._errors import RunNotFound
from ._history import AppendConflict, HistoryStore
from ._names import check_queue, check_run_id, check_workflow_name
from ._state import RunInfo, StepInfo, fold_run, fold_steps
from ._streams import ensure_streams
from ._tasks import Task, enqueue
from .events import Event, RunStarted, encode_event, utcnow

log = logging.getLogger("natflow.runs")

_INLINE_START = 16 * 1024  # a larger start event is read from history instead


def new_run_id() -> str:
    return uuid.uuid4().hex


class Runs:
    """Starts and reads runs over one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.history = HistoryStore(conn)

    async def start(
        self,
        workflow: str,
        queue: str,
        input_json: bytes,
        run_id: str | None = None,
        *,
        parent: str | None = None,
        not_before: datetime | None = None,
        on_complete: tuple[str, str] | None = None,
        retention: float | None = None,
    ) -> tuple[str, bool]:
        """Create the run unless ``run_id`` exists; returns ``(run_id, created)``.

        The run is created by a conditional append that expects the run to have no history,
        so two starts of one id make one run. Then its task is enqueued; if this process dies
        in between, the engine's dispatcher enqueues it (a start is never lost).
        ``on_complete`` is ``(workflow, queue)`` of the run to start when this one closes;
        ``retention`` the seconds this run is kept once closed (None: the engine's setting).
        """
        run_id = check_run_id(run_id if run_id is not None else new_run_id())
        check_workflow_name(workflow)
        check_queue(queue)
        if on_complete is not None:
            check_workflow_name(on_complete[0])
            check_queue(on_complete[1])
        self.conn.check_size(f"input of run {run_id!r}", len(input_json))
        await ensure_streams(self.conn)
        event = RunStarted(
            id=f"{run_id}:1",
            at=utcnow(),
            workflow=workflow,
            queue=queue,
            input=msgspec.Raw(input_json),
            parent=parent,
            not_before=not_before,
            on_complete=on_complete[0] if on_complete else None,
            on_complete_queue=on_complete[1] if on_complete else None,
            retention=retention,
        )
        try:
            seq = await self.history.append(run_id, event, 0)
        except AppendConflict:
            info = await self.describe(run_id)
            if info.status == "pending" and not_before is None:
                # the first starter may have died before enqueueing
                await enqueue(self.conn, info.queue, Task(run_id=run_id, workflow=info.workflow))
            return run_id, False
        if not_before is None:  # a delayed start is woken by the engine's timer
            encoded = encode_event(event)
            inline = len(encoded) <= _INLINE_START
            task = Task(
                run_id=run_id,
                workflow=workflow,
                reason="start",
                start_seq=seq if inline else 0,
                start=msgspec.Raw(encoded if inline else b"null"),
            )
            await enqueue(self.conn, queue, task)
        return run_id, True

    async def events(self, run_id: str) -> list[Event]:
        check_run_id(run_id)
        await ensure_streams(self.conn)
        history = await self.history.read(run_id)
        if not history.events:
            raise RunNotFound(run_id)
        return history.events

    async def describe(self, run_id: str) -> RunInfo:
        info = fold_run(run_id, await self.events(run_id))
        if info is None:
            raise RunNotFound(run_id)
        return info

    async def steps(self, run_id: str) -> list[StepInfo]:
        return fold_steps(await self.events(run_id))
