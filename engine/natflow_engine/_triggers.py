"""Event triggers: a JSON message on ``natflow.event.<name>`` starts the workflows that asked.

Any NATS client publishes to ``natflow.event.<name>`` (``name``: tokens of ``[A-Za-z0-9_-]``
joined by dots, e.g. ``order.created``) and gets a JetStream acknowledgement from
``NATFLOW_EVENTS``; from then on the event is durable, with or without an engine running.

Which workflows want which event is declared in the KV bucket ``natflow_triggers``: a worker
writes ``<event name>.<workflow hash>`` for each workflow it serves with
``@workflow(on_event=...)`` when it starts, holding the workflow, its queue and the JSON
Schema of its input. Declarations outlive the worker, so an event published while no worker
runs still starts its runs (they wait in the queue).

The engine's intake reads each event once (a durable consumer shared by all replicas) and,
for each declaration of its name, starts the run ``ev-<key>-<workflow hash>``, where ``key``
hashes the event's name and ``Nats-Msg-Id`` (or, without one, its stream sequence): the same message
delivered twice, or republished with the same ``Nats-Msg-Id`` even after the stream's
two-minute duplicate window, finds its run there and starts nothing new. A singleton or
debounced workflow's run takes its id from its key instead: the intake keeps which run such
an event started in ``natflow_rates`` (``event.<run id above>``), for as long as the events
stream keeps the event, and a second delivery finds it there. A body that is not
JSON, or does not fit a workflow's input schema, goes to ``NATFLOW_DEADLETTER`` (kind
``event``) with the reason, and starts no run of that workflow.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from nats.aio.msg import Msg

from ._connection import Connection, quietly, retrying
from ._errors import InvalidInput, NatflowError, PermissionDenied
from ._flow_decls import declared, start_declared
from ._kv import kv_delete, kv_entries, kv_get, kv_put
from ._logs import fields
from ._metrics import EVENT_RUNS, EVENTS_REJECTED
from ._puller import Puller, engine_consumer
from ._quarantine import quarantined
from ._reader import reader, stored_time, stream_bounds
from ._runs import Runs
from ._sealing import seal, sealed_key
from ._signals import DeadLetter
from ._streams import (
    DEADLETTER_PREFIX,
    EVENT_PREFIX,
    EVENTS_STREAM,
    RATES_BUCKET,
    RETENTION_DAYS,
    TRIGGERS_BUCKET,
)
from ._undecodable import UNDECODABLE
from .events import Trigger, utcnow

if TYPE_CHECKING:  # jsonschema loads in ~0.1 s: only the engine's intake needs it
    import jsonschema

# emit()'s event id, beside the Nats-Msg-Id that carries the name too (see emit).
EVENT_ID_HEADER: Final = "Natflow-Event-Id"
log = logging.getLogger("natflow.triggers")

INTAKE: Final = "natflow-engine-events"
_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_MAX_NAME: Final = 200
_MAX_SHOWN: Final = 2048


class TriggerDeclaration(msgspec.Struct, kw_only=True):
    """A workflow's wish to start on an event, as a worker wrote it."""

    v: int = 1
    event: str
    workflow: str
    queue: str
    takes_input: bool = True
    input_schema: Any = None  # JSON Schema of the input; None accepts any JSON
    declared_by: str = ""
    declared_at: datetime


class EventRecord(msgspec.Struct, kw_only=True):
    """One stored event and the runs it started (``natflow events list``)."""

    seq: int
    name: str
    at: datetime
    event_id: str | None
    payload: str
    runs: dict[str, str | None]  # workflow -> run id (None: no run, e.g. dead-lettered)


_decl_encoder = msgspec.json.Encoder()
_decl_decoder = msgspec.json.Decoder(TriggerDeclaration)


def check_event_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > _MAX_NAME or _NAME.fullmatch(name) is None:
        raise InvalidInput(
            f"invalid event name {name!r}: use tokens of A-Z, a-z, 0-9, '_' and '-' joined "
            f"by dots, e.g. 'order.created'"
        )
    return name


def event_subject(name: str) -> str:
    return f"{EVENT_PREFIX}.{name}"


def _short_hash(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def event_run_id(name: str, event_id: str | None, seq: int, workflow: str) -> str:
    """The run an event starts for ``workflow`` (see the module docstring)."""
    key = f"id:{name}:{event_id}" if event_id else f"seq:{seq}"
    return f"ev-{_short_hash(key, 20)}-{_short_hash(workflow, 8)}"


# -- which run an event started, where its id is not the event's ---------------------------
# A singleton or debounced workflow's run ids come from its key, so the event's own run id
# (``event_run_id``) never exists and cannot say "this event was taken": the intake keeps
# ``event.<event run id>`` -> the run it started in ``natflow_rates``, as long as the events
# stream keeps the event.


def _marker_key(event_run: str) -> str:
    return f"event.{event_run}"


async def run_started_by(conn: Connection, event_run: str) -> str | None:
    """The run an event started for a workflow: ``event_run`` itself if it exists, else the
    one its marker names (a singleton or debounced workflow's), else None."""
    if await Runs(conn).history.exists(event_run):
        return event_run
    found = await kv_get(conn, RATES_BUCKET, _marker_key(event_run))
    return found[0].decode() if found else None


async def _remember(conn: Connection, event_run: str, started: str) -> None:
    ttl = RETENTION_DAYS * 86400.0
    await kv_put(conn, RATES_BUCKET, _marker_key(event_run), started.encode(), ttl=ttl)


# -- declarations ----------------------------------------------------------------------------


def _declaration_key(event: str, workflow: str) -> str:
    return f"{event}.{_short_hash(workflow, 16)}"


async def declare(conn: Connection, declaration: TriggerDeclaration) -> None:
    """Store (or refresh) one workflow's wish to start on an event."""
    check_event_name(declaration.event)
    key = _declaration_key(declaration.event, declaration.workflow)
    try:
        found = await kv_get(conn, TRIGGERS_BUCKET, key)
    except PermissionDenied:  # a worker role from before it might read the bucket: write
        found = None
    if found is not None and _same(found[0], declaration):
        # Already so: nothing written (a worker started while the store was full exited on
        # a rewrite of what another worker had declared already).
        return
    await kv_put(conn, TRIGGERS_BUCKET, key, _decl_encoder.encode(declaration))


def _same(stored: bytes, declaration: TriggerDeclaration) -> bool:
    """Whether ``stored`` declares the same (whoever declared it, and when)."""
    try:
        held = _decl_decoder.decode(stored)
    except UNDECODABLE:
        return False
    who = {"declared_by": declaration.declared_by, "declared_at": declaration.declared_at}
    return msgspec.structs.replace(held, **who) == declaration


def _key_of(msg: Msg) -> str:
    """The KV key of an entry read from the bucket's stream (kv_entries)."""
    subject = (msg.headers or {}).get("Nats-Subject", msg.subject)
    return subject.removeprefix(f"$KV.{TRIGGERS_BUCKET}.")


async def undeclare(conn: Connection, event: str, workflow: str) -> bool:
    """Forget that ``workflow`` starts on ``event``; False if it did not."""
    check_event_name(event)
    key = _declaration_key(event, workflow)
    # By its key, whether or not the entry decodes (one that does not is removed so too).
    entries = await kv_entries(conn, TRIGGERS_BUCKET, f"{event}.*")
    if key not in {_key_of(msg) for msg in entries}:
        return False
    await kv_delete(conn, TRIGGERS_BUCKET, key)
    return True


async def declarations(conn: Connection, event: str | None = None) -> list[TriggerDeclaration]:
    """The declarations of ``event`` (of every event when None), by workflow."""
    entries = await kv_entries(conn, TRIGGERS_BUCKET, f"{event}.*" if event else ">")
    found = []
    for msg in entries:
        try:
            found.append(_decl_decoder.decode(msg.data))
        except UNDECODABLE as exc:  # one bad entry must not stop the event's other starts
            key = _key_of(msg)
            quarantined(
                "kv_triggers",
                key,
                f"trigger declaration {key!r} does not decode ({exc}); skipped: "
                f"`natflow events undeclare` or a worker's next start replaces it",
                logger=log,
            )
    return sorted(found, key=lambda d: (d.event, d.workflow))


# -- publishing and reading events ------------------------------------------------------------


def check_event_id(event_id: object) -> None:
    """An event id is 1 to 256 printable characters (or None: one is made)."""
    if event_id is not None and (
        not isinstance(event_id, str) or not event_id.isprintable() or not 0 < len(event_id) <= 256
    ):
        raise InvalidInput(f"event_id must be 1 to 256 printable characters, not {event_id!r}")


async def emit(conn: Connection, name: str, payload: bytes, event_id: str | None) -> int:
    """Publish an event, retrying through a reconnect; returns its stream sequence.

    Every attempt carries the same ``Nats-Msg-Id`` (``event_id``, or one made here), so a
    retry of an event that landed unacknowledged is stored once. With a codec on the
    connection (a client's, or the CLI's NATFLOW_CODEC_KEYS) the payload is sealed.
    """
    check_event_name(name)
    check_event_id(event_id)  # the command line's too ("" became a random id)
    if conn.codec is not None:
        payload = seal(conn.codec, payload)
    # The name in the id: JetStream drops a repeated Nats-Msg-Id across the whole stream,
    # whatever the subject, so one event_id for two events (an order's id for created and
    # paid) lost the second within the 2-minute window.
    # The event's own id travels beside it, for the run ids (as a plain publisher's id is).
    headers = {"Nats-Msg-Id": f"natflow-{uuid.uuid4().hex}"}
    if event_id:
        headers = {"Nats-Msg-Id": f"{name}:{event_id}", EVENT_ID_HEADER: event_id}
    ack = await retrying(
        f"emitting event {name!r}",
        lambda: conn.publish(event_subject(name), payload, headers),
    )
    return ack.seq


def event_id_of(headers: dict[str, str] | None) -> str | None:
    """An event's id: ``emit``'s own (its ``Nats-Msg-Id`` has the name in front), or the
    ``Nats-Msg-Id`` a plain publisher gave it."""
    headers = headers or {}
    return headers.get(EVENT_ID_HEADER) or headers.get("Nats-Msg-Id")


async def recent_events(conn: Connection, limit: int = 20) -> list[EventRecord]:
    """The newest events, newest first, each with the run it started per declared workflow."""
    bounds = await stream_bounds(conn, EVENTS_STREAM)
    if bounds is None or bounds[1] < max(bounds[0], 1):  # none, or nothing in it
        return []
    first, last = bounds
    start = max(first, last - limit + 1)
    page = await reader(conn).read_all(EVENTS_STREAM, start=start, limit=limit, headers=True)
    wanted: dict[str, list[TriggerDeclaration]] = {}
    for decl in await declarations(conn):
        wanted.setdefault(decl.event, []).append(decl)
    records: list[EventRecord] = []
    for msg in reversed(page.messages):
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject", msg.subject)
        name = subject[len(EVENT_PREFIX) + 1 :]
        seq = int(headers.get("Nats-Sequence", "0"))
        event_id = event_id_of(headers)
        started: dict[str, str | None] = {}
        for decl in wanted.get(name, []):
            event_run = event_run_id(name, event_id, seq, decl.workflow)
            started[decl.workflow] = await run_started_by(conn, event_run)
        records.append(
            EventRecord(
                seq=seq,
                name=name,
                at=_stored_at(headers),
                event_id=event_id,
                payload=msg.data[:_MAX_SHOWN].decode(errors="replace"),
                runs=started,
            )
        )
    return records


def _stored_at(headers: dict[str, str]) -> datetime:
    return stored_time(headers) if "Nats-Time-Stamp" in headers else utcnow()


# -- the engine's intake ------------------------------------------------------------------------


class BadEvent(Exception):
    """An event, or its body for one workflow, that starts no run; says why."""


@functools.lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> jsonschema.Draft202012Validator:
    """A checked validator per distinct schema (checking a schema costs more than using it)."""
    import jsonschema

    schema = msgspec.json.decode(schema_json)
    jsonschema.Draft202012Validator.check_schema(schema)
    # Formats checked: a body whose "uuid" field is no UUID is dead-lettered, not a run that
    # fails on its input once a worker decodes it.
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def check_body(decl: TriggerDeclaration, body: Any) -> None:
    """:class:`BadEvent` if ``body`` does not fit the workflow's declared input schema."""
    if decl.input_schema is None or not decl.takes_input or sealed_key(body) is not None:
        return  # a sealed body (Client(codec=...).emit) is opened and checked by its worker
    import jsonschema

    try:
        validator = _validator(msgspec.json.encode(decl.input_schema))
        error = jsonschema.exceptions.best_match(validator.iter_errors(body))
    except jsonschema.exceptions.SchemaError as exc:  # a declaration natflow did not write
        raise BadEvent(
            f"workflow {decl.workflow!r} declared an input schema that is not valid JSON "
            f"Schema ({exc.message}); restart its worker to declare it again"
        ) from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the body"
        raise BadEvent(
            f"body does not fit the input of workflow {decl.workflow!r}: {error.message} "
            f"(at {where})"
        )


class EventIntake:
    """Reads each event once and starts one run per declared workflow."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._runs = Runs(conn)
        self.started = 0
        self.rejected = 0

    async def run(self) -> None:
        config = engine_consumer(
            INTAKE, "natflow engine: start runs from events", f"{EVENT_PREFIX}.>"
        )
        await self._conn.admin(
            "the event intake's consumer",
            lambda: self._conn.jsm.add_consumer(EVENTS_STREAM, config=config),
        )
        puller = Puller(self._conn, EVENTS_STREAM, INTAKE)
        await puller.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(puller.keep_asking, lambda: 64)
                async for msg in puller.messages:
                    await self._take(msg)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await puller.stop()
                except Exception:  # the connection is going away; the server drops the pull
                    log.debug("unsubscribe failed", exc_info=True)

    async def _take(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        name = msg.subject[len(EVENT_PREFIX) + 1 :]
        event_id = event_id_of(msg.headers)
        try:
            try:
                check_event_name(name)
                body = msgspec.json.decode(msg.data or b"null")
            except (InvalidInput, *UNDECODABLE) as exc:
                reason = str(exc) if isinstance(exc, InvalidInput) else f"body is not JSON: {exc}"
                await self._dead(msg, seq, name, "", reason)
                await quietly(msg.ack())
                return
            declared = await declarations(self._conn, name)
            if not declared:  # acknowledged: nothing would ever take it, but not unseen
                await self._dead(msg, seq, name, "", f"no workflow declares event {name!r}")
            for decl in declared:
                await self._start(msg, seq, name, event_id, decl, body)
        except (NatflowError, OSError) as exc:  # the server could not be reached: again soon
            log.warning("event #%d: could not process (%s); retrying", seq, exc)
            await quietly(msg.nak(delay=1.0))
            return
        except Exception:  # a bug must not stop the intake: say so, try again later
            log.exception("event #%d: could not process; retrying in 10 s", seq)
            await quietly(msg.nak(delay=10.0))
            return
        await quietly(msg.ack())

    async def _start(
        self,
        msg: Msg,
        seq: int,
        name: str,
        event_id: str | None,
        decl: TriggerDeclaration,
        body: Any,
    ) -> None:
        run_id = event_run_id(name, event_id, seq, decl.workflow)
        try:
            check_body(decl, body)
        except BadEvent as bad:
            await self._dead(msg, seq, name, run_id, str(bad))
            return
        flow = await declared(self._conn, decl.workflow)
        keyed = flow is not None and (flow.singleton or flow.debounce is not None)
        if keyed and (taken := await run_started_by(self._conn, run_id)) is not None:
            # Redelivered, or republished with its id after the duplicate window: a second
            # start would make a second run once the first has closed.
            log.debug("event %s #%d: already started run %s", name, seq, taken)
            return
        try:
            started, created = await start_declared(  # with the workflow's flow control
                self._runs,
                decl.workflow,
                decl.queue,
                msg.data or b"null",
                run_id,
                declaration=flow,
                trigger=Trigger(kind="event", event=name, event_seq=seq),
            )
        except InvalidInput as exc:  # retrying would not help
            await self._dead(msg, seq, name, run_id, f"workflow {decl.workflow!r}: {exc}")
            return
        if started != run_id:
            await _remember(self._conn, run_id, started)
        if created:
            self.started += 1
            EVENT_RUNS.inc()
            log.info(
                "event %s #%d started run %s of %s",
                name,
                seq,
                started,
                decl.workflow,
                extra=fields(started, decl.workflow),
            )

    async def _dead(self, msg: Msg, seq: int, name: str, run_id: str, reason: str) -> None:
        self.rejected += 1
        EVENTS_REJECTED.inc()
        letter = DeadLetter(
            kind="event",
            subject=msg.subject,
            run_id=run_id,
            name=name,
            reason=reason,
            signal_seq=seq,
            at=utcnow(),
            payload=msg.data[:_MAX_SHOWN].decode(errors="replace"),
        )
        await self._conn.publish(
            f"{DEADLETTER_PREFIX}.event.{run_id or '_'}",
            msgspec.json.encode(letter),
            {"Nats-Msg-Id": f"event-{seq}-{run_id}"},
        )
        log.warning("event %s (#%d) dead-lettered: %s", name, seq, reason)
