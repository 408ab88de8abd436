"""``Client``: start runs and read them. Needs no workflow code, only a NATS connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio
import msgspec
from natflow_engine import (
    CANCEL,
    HISTORY_STREAM,
    PAUSE,
    RESUME,
    TERMINATE,
    Addressee,
    Connection,
    InvalidInput,
    LifecycleEvent,
    MissingKey,
    NatflowError,
    PayloadCodec,
    RequestTimeout,
    RunIndex,
    RunInfo,
    RunNotFound,
    Runs,
    ServerUnavailable,
    StepInfo,
    UnreadableValue,
    announced_schema,
    check_cancelled,
    check_event_id,
    check_event_name,
    check_input,
    check_portable,
    check_run_id,
    check_token,
    check_value_size,
    connect,
    decode_value,
    delete_run,
    emit,
    encode_value,
    ensure_streams,
    history_subject,
    load_value,
    new_run_id,
    one_error,
    open_sealed,
    request_start,
    restart_run,
    seal,
    sealed_key,
    start_declared,
    store_value,
    to_seconds,
    value_ref,
    wrap,
)
from natflow_engine import send as send_signal
from natflow_engine.events import (
    Event,
    decode_event,
    unpacked,
    utcnow,
)
from nats.aio.client import Client as NATS

from . import _tracing as tracing
from ._events_feed import follow
from ._flow import check_flow_start, declaration_of, flow_start
from ._handle import RunHandle
from ._schedules import ScheduleClient
from ._sites import SiteClient
from ._workflow import DEFAULT_QUEUE, Workflow, check_priority


def _target(what: str, workflow: Workflow | str | None) -> tuple[str, str] | None:
    """``(name, queue)`` of a workflow given as a definition or a name."""
    if workflow is None:
        return None
    if isinstance(workflow, Workflow):
        return workflow.name, workflow.queue
    if isinstance(workflow, str):
        return workflow, DEFAULT_QUEUE
    raise InvalidInput(f"{what} takes a @workflow or its name, not {workflow!r}")


class Client:
    """Starts, reads and watches runs.

    Example::

        async with await Client.connect("nats://127.0.0.1:4222") as client:
            handle = await client.start(greet, {"name": "Ada"}, run_id="greet-ada")
            print(await handle.result(timeout=30))
    """

    def __init__(
        self,
        nc: NATS | Connection,
        *,
        codec: PayloadCodec | None = None,
        start_via_engine: bool = False,
        max_value_bytes: int | None = None,
    ) -> None:
        self._conn = nc if isinstance(nc, Connection) else wrap(nc)
        if codec is not None:
            self._conn.codec = codec
        if max_value_bytes is not None:
            if max_value_bytes < 1:
                raise InvalidInput(f"max_value_bytes must be positive, not {max_value_bytes}")
            self._conn.max_value_bytes = max_value_bytes
        self._start_via_engine = start_via_engine
        self._runs = Runs(self._conn)
        self._index = RunIndex(self._conn)
        self.schedules = ScheduleClient(self._conn, self.handle)
        """Create, change and read schedules (see :class:`ScheduleClient`)."""

    @classmethod
    async def connect(
        cls,
        url: str | list[str] | None = None,
        *,
        connect_timeout: float | timedelta = 5.0,
        codec: PayloadCodec | None = None,
        start_via_engine: bool = False,
        max_value_bytes: int | None = None,
        **nats_options: Any,
    ) -> Client:
        """Connect to NATS (``NATFLOW_URL`` or ``nats://127.0.0.1:4222`` by default).

        Fails with :class:`NatflowError` within ``connect_timeout`` when no server answers.
        With ``codec`` (e.g. :class:`AesGcmCodec`), inputs, results, signal payloads and
        errors are encrypted before they reach JetStream (docs/security.md). With
        ``start_via_engine``, :meth:`start` asks the engine to create runs instead of writing
        history itself: what a ``frontend`` user, which may not write history, needs.
        A value (input, result, signal payload) over 64 KiB is kept in the ``natflow_values``
        object store, history holding a reference; one over ``max_value_bytes`` (default
        64 MiB) is refused with :class:`InvalidInput` naming it.
        """
        conn = await connect(url, connect_timeout=connect_timeout, **nats_options)
        return cls(
            conn,
            codec=codec,
            start_via_engine=start_via_engine,
            max_value_bytes=max_value_bytes,
        )

    @property
    def connection(self) -> Connection:
        return self._conn

    def site(self, name: str) -> SiteClient:
        """Starts, signals and cancels for runs homed at site ``name``, from the hub: stored
        at the hub at once, applied at the site exactly once (see :class:`SiteClient`)."""
        return SiteClient(self._conn, name)

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(
        self,
        workflow: Workflow | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
        start_delay: float | timedelta | None = None,
        on_complete: Workflow | str | None = None,
        priority: int | None = None,
    ) -> RunHandle:
        """Start a run and return its handle.

        ``run_id`` is an idempotency key: starting an id that exists returns that run's
        handle and makes no second run. Input that does not fit the workflow's annotation
        raises :class:`InvalidInput` naming the field, and nothing is written.
        ``on_complete`` (a workflow or its name) is started exactly once when this run
        closes, however it closes, with a :class:`RunOutcome` as its input; its run id is
        this run's id plus ``-oncomplete``. ``priority`` (a whole number, higher first;
        default: the workflow's ``priority=``) orders the run among runs waiting for a slot
        of a concurrency limit. The workflow's ``rate_limit``, ``singleton`` and
        ``debounce`` apply whether it is given as a definition or by name (by name: as its
        workers declared them; README "Flow control"): a singleton or debounced start may
        return the handle of a run that was open already.
        """
        with _retry_needs_an_id(run_id):
            return await self._start(
                workflow, input, run_id, queue, start_delay, on_complete, priority
            )

    async def _start(
        self,
        workflow: Workflow | str,
        input: Any,
        run_id: str | None,
        queue: str | None,
        start_delay: float | timedelta | None,
        on_complete: Workflow | str | None,
        priority: int | None,
    ) -> RunHandle:
        if priority is not None:
            check_priority(priority)
        delay = 0.0 if start_delay is None else to_seconds("start_delay", start_delay)
        definition = workflow if isinstance(workflow, Workflow) else None
        if definition is not None:
            name, default_queue = definition.name, definition.queue
        elif isinstance(workflow, str):
            name, default_queue = workflow, "default"
        else:
            raise InvalidInput(f"start takes a @workflow or its name, not {workflow!r}")
        if run_id is not None:
            check_run_id(run_id)
        data = encode_value("workflow input", input)
        if definition is None:  # by name: against the schema its workers announce, if any
            check_input(name, data, await announced_schema(self._conn, name))
        if definition is not None and definition.takes_input:
            value = decode_value(f"input of workflow {name!r}", data, definition.input_type)
            for bound in definition.limits:  # a missing key fails here, before any write
                bound.key_value(value)
        not_before = utcnow() + timedelta(seconds=delay) if delay > 0 else None
        target = _target("on_complete", on_complete)
        with tracing.starting(name, queue or default_queue) as traced:
            if self._start_via_engine:
                declaration = None
                if definition is not None and definition.flow_controlled:
                    check_flow_start(definition, run_id)
                    declaration = declaration_of(definition)  # the engine applies it
                    check_portable(declaration)
                if target is not None:
                    raise InvalidInput(
                        "on_complete is not available to a client that starts runs through "
                        "the engine (start_via_engine=True): start the follow-up run yourself"
                    )
                chosen, run_id = run_id is not None, run_id or new_run_id()
                started_id, created = await request_start(
                    self._conn,
                    name,
                    queue or default_queue,
                    data,
                    run_id,
                    not_before,
                    priority,
                    flow=declaration,
                    chosen_run_id=chosen,
                )
            elif definition is not None and definition.flow_controlled:
                check_flow_start(definition, run_id)
                started_id, created = await flow_start(
                    self._runs,
                    definition,
                    input,
                    data,
                    queue or default_queue,
                    not_before,
                    run_id=run_id,  # a rate-limited start keeps its idempotency key
                    trace_context=traced.carrier,
                    on_complete=target,
                    retention=definition.retention,
                    priority=priority,
                )
            elif definition is None:  # by name: the flow control its workers declare
                started_id, created = await start_declared(
                    self._runs,
                    name,
                    queue or default_queue,
                    data,
                    run_id,
                    not_before=not_before,
                    chosen_run_id=run_id is not None,
                    trace_context=traced.carrier,
                    on_complete=target,
                    priority=priority,
                )
            else:
                started_id, created = await self._runs.start(
                    name,
                    queue or default_queue,
                    data,
                    run_id,
                    not_before=not_before,
                    trace_context=traced.carrier,
                    on_complete=target,
                    retention=definition.retention if definition is not None else None,
                    priority=priority,
                )
            traced.started(started_id, created)
        return RunHandle(self._runs, started_id, definition)

    async def restart(
        self, run_id: str, *, from_step: str | tuple[str, int] | None = None
    ) -> RunHandle:
        """Restart a closed run from a step with the code now deployed; the new run's handle.

        ``from_step`` is a step name (its first occurrence), ``(name, occurrence)``, or None
        for the run's first failed step. Steps recorded before that point are not run again
        (the new run's history starts with their recorded outcomes); that step and every
        later one run. The new run is ``<run_id>-r<n>``; ``RunInfo.restarted_from`` and
        ``restarted_as`` link the two, and the original history stays readable. A run with
        no failed step and no ``from_step``, or a step it never recorded, is
        :class:`InvalidInput`.
        """
        new_id = await restart_run(self._conn, run_id, from_step)
        return RunHandle(self._runs, new_id)

    async def delete(self, run_id: str) -> None:
        """Delete a closed run: its history, index entry, signals, dead letters, timers and
        lease all go, and :meth:`describe` then raises :class:`RunNotFound`. An open run is
        a :class:`NatflowError`: cancel it first."""
        await delete_run(self._conn, run_id)

    async def events(
        self,
        workflow: str | None = None,
        status: str | None = None,
        *,
        durable: str | None = None,
        from_start: bool = False,
    ) -> AsyncIterator[LifecycleEvent]:
        """Lifecycle events, one per run status change, as they happen.

        ``workflow`` and ``status`` filter (``status="failed"``). Without ``durable`` it
        yields what happens from now on (``from_start=True``: everything still stored
        first). With ``durable`` (a name) the server remembers how far this consumer got, so
        a later call with the same name catches up on what happened in between (an event
        counts as seen once the loop asks for the next one or leaves).

        Example::

            async for event in client.events("order", "failed", durable="pager"):
                page_someone(event.run_id, event.error)
        """
        async for event in follow(
            self._conn, workflow, status, durable=durable, from_start=from_start
        ):
            yield event

    async def cancel(self, run_id: str, reason: str | None = None) -> None:
        """Cancel a run: ``asyncio.CancelledError`` is raised in the workflow at its next
        await, so its ``finally`` blocks and cleanup steps run; then it ends as cancelled.
        Cancelling a finished run does nothing; an unknown run is :class:`RunNotFound`."""
        await self._control(run_id, CANCEL, reason)

    async def terminate(self, run_id: str, reason: str) -> None:
        """Stop a run at once: no more workflow code runs; it ends as terminated."""
        await self._control(run_id, TERMINATE, reason)

    async def pause(self, run_id: str, reason: str | None = None) -> None:
        """Pause a run: while it is ``paused`` no step, child or timer of it starts; a step
        already running finishes and is recorded; signals are accepted and kept; timers that
        fall due meanwhile fire once it is resumed. Terminate still stops it at once; a
        cancellation runs its cleanup once it is resumed. A run that has ended cannot be
        paused (:class:`NatflowError`, as ``natflow runs pause`` says)."""
        await self._control(run_id, PAUSE, reason)

    async def resume(self, run_id: str) -> None:
        """Resume a paused run (a run that is not paused is left as it is)."""
        await self._control(run_id, RESUME, None)

    async def _control(self, run_id: str, kind: str, reason: str | None) -> None:
        check_run_id(run_id)
        info = await self._readable(run_id)
        if info is not None and info.is_closed:
            if kind == PAUSE:  # it said nothing, so a caller took the run as paused
                ended = f"run {run_id!r} already ended ({info.status}); nothing to pause"
                raise NatflowError(ended)
            return
        if info is not None and info.site:  # at a hub: a site's run, through the outbox
            await self.site(info.site).control(run_id, kind, reason)
            return
        await ensure_streams(self._conn)
        await send_signal(self._conn, run_id, kind, encode_value("reason", reason), None)

    async def signal(
        self, run_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> None:
        """Send signal ``name`` to a run; durable once this returns.

        ``signal_id`` deduplicates per run and signal name: the same id sent twice to this
        run and name is delivered once (to another run it is another signal). An unknown run is
        :class:`RunNotFound`; a finished one is :class:`NatflowError`.
        """
        check_run_id(run_id)
        check_token("signal name", name)
        if signal_id is not None:
            check_token("signal_id", signal_id)
        data = encode_value(f"payload of signal {name!r}", payload)
        if self._conn.codec is not None:
            data = seal(self._conn.codec, data)
        check_value_size(self._conn, f"payload of signal {name!r}", len(data))
        info = await self._readable(run_id)
        if info is not None and info.is_closed:
            raise NatflowError(
                f"run {run_id!r} already ended ({info.status}); a signal can no longer reach it"
            )
        if info is not None and info.site:  # at a hub: a site's run, through the outbox
            await self.site(info.site).signal(run_id, name, payload, signal_id=signal_id)
            return
        await ensure_streams(self._conn)
        data = await store_value(self._conn, f"payload of signal {name!r}", data, run_id)
        await send_signal(self._conn, run_id, name, data, signal_id)

    async def emit(self, name: str, payload: Any = None, *, event_id: str | None = None) -> int:
        """Publish event ``name`` (``natflow.event.<name>``); durable once this returns.

        Each workflow declared with ``@workflow(on_event=name)`` starts one run with
        ``payload`` as its input. ``event_id`` (the ``Nats-Msg-Id``) deduplicates: the same id
        twice starts nothing new. Returns the event's sequence in ``NATFLOW_EVENTS``.

        With a codec the payload is sealed: the engine, which holds no key, cannot check
        it against the workflows' input schemas, so a payload that does not fit fails the
        run when its worker decodes it (instead of being dead-lettered).
        """
        check_event_name(name)
        check_event_id(event_id)
        data = encode_value(f"payload of event {name!r}", payload)
        self._conn.check_size(f"payload of event {name!r}", len(data))
        await ensure_streams(self._conn)
        return await emit(self._conn, name, data, event_id)

    async def _readable(self, run_id: str) -> Addressee | None:
        return await self._runs.readable(run_id)

    def handle(self, run_id: str, workflow: Workflow | None = None) -> RunHandle:
        """A handle on an existing run (not checked until used)."""
        return RunHandle(self._runs, check_run_id(run_id), workflow)

    async def describe(self, run_id: str) -> RunInfo:
        """The run's :class:`RunInfo`; :class:`RunNotFound` if there is none."""
        return await self._runs.describe(run_id)

    async def steps(self, run_id: str) -> list[StepInfo]:
        """Every step occurrence of the run, in the order the workflow asked for them."""
        return await self._runs.steps(run_id)

    async def history(self, run_id: str) -> list[Event]:
        """The run's events, oldest first."""
        return await self._runs.events(run_id)

    async def list(
        self, workflow: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[RunInfo]:
        """Runs from the engine's index, newest first (needs a running engine)."""
        found = await self._index.scan(workflow=workflow, status=status, limit=limit)
        # A large result is indexed as its reference: read back, as describe() does.
        opened: list[RunInfo] = list(found)
        limiter = anyio.CapacityLimiter(8)

        async def resolve(i: int) -> None:
            async with limiter:
                opened[i] = await self._resolved(found[i])

        with one_error():  # a natflow error to the caller, not a group of them
            async with anyio.create_task_group() as tg:
                for i, info in enumerate(found):
                    if value_ref(info.result) is not None:
                        tg.start_soon(resolve, i)
        return [self._opened(info) for info in opened]

    async def _resolved(self, info: RunInfo) -> RunInfo:
        if info.site:  # a site's run at its hub: a large value stayed in the site's store
            return info
        data = msgspec.json.encode(info.result)
        try:
            stored = await load_value(self._conn, data, f"the result of run {info.run_id!r}")
        except UnreadableValue:
            # Deleted since the index was read (retention, a delete): one run's result is
            # gone, the list is not (it failed whole). Shown as its reference, as a site's.
            return info
        return msgspec.structs.replace(info, result=msgspec.json.decode(stored))

    def _opened(self, info: RunInfo) -> RunInfo:
        """The index's summary with its result opened, where this client holds the key (the
        engine, which has none, indexes it sealed)."""
        if sealed_key(info.result) is None or self._conn.codec is None:
            return info
        try:
            what = f"the result of run {info.run_id!r}"
            data = open_sealed(self._conn.codec, msgspec.json.encode(info.result), what)
        except (MissingKey, UnreadableValue):  # shown sealed: one run's stays its own
            return info
        return msgspec.structs.replace(info, result=msgspec.json.decode(data))

    async def watch(self, run_id: str) -> AsyncIterator[Event]:
        """The run's events as they are appended, from the first one on; :class:`RunNotFound`
        if this server holds no history of it (it would wait for good)."""
        check_run_id(run_id)
        if await self._runs.history.last(run_id) is None:
            raise RunNotFound(run_id)
        sub = await self._conn.js.subscribe(
            history_subject(run_id),
            stream=HISTORY_STREAM,
            ordered_consumer=True,
            # It notices a server restart by two missed heartbeats, then carries on from the
            # last event it saw: at nats-py's default (5 s) a watch stalled ~10-17 s.
            idle_heartbeat=0.4,
        )
        try:
            check_cancelled()  # one lost in the subscribe (3.11): the watch waited for good
            async for msg in sub.messages:
                for event in unpacked([decode_event(msg.data)]):
                    yield event
        finally:
            await sub.unsubscribe()


@contextmanager
def _retry_needs_an_id(run_id: str | None) -> Iterator[None]:
    """A start that failed for want of the server may still land: nats-py sends what it
    buffered while reconnecting once it is back, after the caller gave up. Retried without
    a run id (an idempotency key), it made a second run."""
    try:
        yield
    except (ServerUnavailable, RequestTimeout) as exc:
        if run_id is not None:
            raise
        raise type(exc)(
            f"{exc}; the start may still reach the server once it answers: start again with "
            f"a run_id= (an idempotency key) to be sure no second run is made"
        ) from exc
