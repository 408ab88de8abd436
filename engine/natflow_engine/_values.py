"""Large values: kept in a JetStream Object Store, history holds a small reference.

A user value (a run's input, a step's or run's result, a signal's payload) whose JSON, sealed
if the connection has a codec, is over :data:`INLINE_BYTES` (64 KiB) is put in the Object
Store bucket ``natflow_values`` under the SHA-256 of its bytes (so a retried write is
harmless), and history carries, in the value's place::

    {"$natflow_ref":"<sha256 hex>","size":N}

Readers resolve references where they open sealed values (replay, results, ``steps()``,
``history()``, the CLI), before opening them. A value over the connection's
``max_value_bytes`` (default :data:`MAX_VALUE_BYTES`, 64 MiB) is refused with
:class:`InvalidInput` before anything is written. A value stored for a run is marked as
that run's (``_value_refs``) and deleted with the last run that refers to it.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import TYPE_CHECKING, Any, Final

import msgspec
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from ._errors import ErrorInfo, InvalidInput, NatflowError, PermissionDenied
from ._undecodable import UNDECODABLE, UnreadableValue
from ._value_refs import mark
from .events import (
    ChildCompleted,
    ChildFailed,
    Event,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    SignalReceived,
    StepCompleted,
    StepFailed,
    StepRetrying,
)

if TYPE_CHECKING:
    from ._connection import Connection

VALUES_BUCKET: Final = "natflow_values"
VALUES_STREAM: Final = f"OBJ_{VALUES_BUCKET}"
INLINE_BYTES: Final = 64 * 1024
"""A value up to this many bytes stays in history; a larger one is stored by reference."""
MAX_VALUE_BYTES: Final = 64 * 1024 * 1024
"""The default largest value (``Connection.max_value_bytes``)."""
REF_MARKER: Final = "$natflow_ref"
_PREFIX: Final = b'{"' + REF_MARKER.encode() + b'":'


class ValueRef(msgspec.Struct):
    digest: str = msgspec.field(name=REF_MARKER)
    size: int = 0


_ref_decoder = msgspec.json.Decoder(ValueRef)
_encoder = msgspec.json.Encoder()


def is_ref(data: bytes) -> bool:
    return data.startswith(_PREFIX)


def ref_of(data: bytes) -> ValueRef | None:
    """The reference ``data`` is (None: a value itself, or not a reference natflow wrote)."""
    if not is_ref(data):
        return None
    try:
        return _ref_decoder.decode(data)
    except UNDECODABLE:
        return None


def value_ref(value: Any) -> ValueRef | None:
    """The reference a decoded JSON value is, else None (for display)."""
    if isinstance(value, dict) and isinstance(value.get(REF_MARKER), str):
        return ValueRef(digest=value[REF_MARKER], size=int(value.get("size", 0)))
    return None


def check_value_size(conn: Connection, what: str, size: int, *, to_seal: bool = False) -> None:
    """Refuse a value over the connection's ``max_value_bytes``. ``to_seal``: ``size`` is of
    the plain JSON, which the append seals first (under a codec), so count the envelope's
    growth too (base64 of nonce + ciphertext + tag, and the envelope's keys)."""
    if to_seal and conn.codec is not None:
        size = 4 * ((size + 28 + 2) // 3) + 128
    limit = conn.max_value_bytes
    if size > limit:
        raise InvalidInput(
            f"{what} is {size} bytes, over the largest value natflow keeps ({limit} bytes, "
            f"max_value_bytes); store large data elsewhere and pass a reference, or raise "
            f"max_value_bytes"
        )


def inline_limit(conn: Connection) -> int:
    """The most bytes a value keeps inline on this server: :data:`INLINE_BYTES`, less where
    the server's max payload is small (an event may carry more than one value)."""
    return min(INLINE_BYTES, max(1024, conn.max_payload // 4))


def _chunk_size(conn: Connection) -> int:
    """Object store chunks within the server's max payload (nats-py's are 128 KiB: a server
    whose max payload was 64 KiB refused every large value)."""
    return max(1024, min(_CHUNK_BYTES, conn.max_payload - 4096))


_CHUNK_BYTES: Final = 128 * 1024


def _store(conn: Connection) -> ObjectStore:
    return ObjectStore(name=VALUES_BUCKET, stream=VALUES_STREAM, js=conn.js)


async def store_value(
    conn: Connection,
    what: str,
    data: bytes,
    run_id: str | None = None,
    *,
    inline: int = INLINE_BYTES,
) -> bytes:
    """``data`` itself if it is small (or a reference already), else a reference to it.

    ``run_id``: the run the value belongs to, marked as referring to it before the object is
    written (so the value is deleted with the last run that refers to it)."""
    if is_ref(data):
        # Stored by another writer (a client, or the run a restart copies): this run's too.
        if run_id is not None:
            await mark(conn, _ref_decoder.decode(data).digest, run_id)
        return data
    if len(data) <= min(inline, inline_limit(conn)):
        return data
    check_value_size(conn, what, len(data))
    try:
        return await _stored(conn, what, data, run_id)
    except PermissionDenied as exc:  # a role without the value store (the signaller)
        raise PermissionDenied(
            f"{what} is {len(data)} bytes, over the {inline} kept inline: it goes to the "
            f"{VALUES_BUCKET} object store, which this connection may not use ({exc}); send "
            f"a smaller value, or a reference to it"
        ) from None


async def _stored(conn: Connection, what: str, data: bytes, run_id: str | None) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if run_id is not None:
        await mark(conn, digest, run_id)
    store = _store(conn)
    try:
        info = await store.get_info(digest)
        present = info.size == len(data) and not info.deleted
    except Exception:  # not there yet (nats-py raises ObjectNotFoundError, or NotFoundError)
        present = False
    if not present:
        try:
            meta = ObjectMeta(
                name=digest, options=ObjectMetaOptions(max_chunk_size=_chunk_size(conn))
            )
            await conn.admin(
                f"storing {what} ({len(data)} bytes)", lambda: store.put(digest, data, meta=meta)
            )
        except NatflowError:
            raise
        except Exception as exc:  # a nats-py error: mapped here, at the boundary
            raise NatflowError(
                f"{what} ({len(data)} bytes) could not be stored in the {VALUES_BUCKET} "
                f"object store ({exc})"
            ) from exc
    return _encoder.encode(ValueRef(digest=digest, size=len(data)))


async def delete_object(conn: Connection, digest: str) -> None:
    """Delete stored value ``digest`` (nothing if it is gone already)."""
    store = _store(conn)
    # nats-py marks a deleted object with a meta message of its own ("deleted": true), which
    # stays: ~400 bytes left behind per value deleted, by every delete and retention sweep.
    # Purged too, the value leaves nothing.
    meta = f"$O.{VALUES_BUCKET}.M.{base64.urlsafe_b64encode(digest.encode()).decode()}"
    try:
        await conn.admin(f"deleting value {digest}", lambda: store.delete(digest))
        await conn.admin(
            f"deleting value {digest}",
            lambda: conn.jsm.purge_stream(VALUES_STREAM, subject=meta),
            subject=f"{conn.api}.STREAM.PURGE.{VALUES_STREAM}",
        )
    except NatflowError:
        raise
    except Exception as exc:  # a nats-py error: mapped here, at the boundary
        if isinstance(exc, NotFoundError):
            return
        raise NatflowError(
            f"value {digest} could not be deleted from the {VALUES_BUCKET} object store ({exc})"
        ) from exc


async def load_value(conn: Connection, data: bytes, what: str = "a value") -> bytes:
    """The value ``data`` refers to (``data`` itself if it is not a reference)."""
    if not is_ref(data):
        return data
    try:
        ref = _ref_decoder.decode(data)
    except UNDECODABLE as exc:
        raise UnreadableValue(f"{what} is a malformed value reference ({exc})") from None
    store = _store(conn)
    # Into a buffer: without one, nats-py joins the chunks with bytes += (quadratic: 12 s
    # for 50 MiB here, against well under a second into a buffer).
    buffer = io.BytesIO()

    async def read() -> None:
        buffer.seek(0)
        buffer.truncate()  # a retried read starts over
        await store.get(ref.digest, writeinto=buffer)

    try:
        await conn.admin(f"reading {what}", read)
    except NatflowError:
        raise
    except Exception as exc:
        if isinstance(exc, NotFoundError):  # for good, as retrying shows nothing new
            raise UnreadableValue(
                f"{what} refers to value {ref.digest}, which the {VALUES_BUCKET} object "
                f"store does not hold"
            ) from exc
        raise NatflowError(
            f"{what} is stored as value {ref.digest} ({ref.size} bytes) in the "
            f"{VALUES_BUCKET} object store, which could not be read ({exc})"
        ) from exc
    return buffer.getvalue()


def _raw(data: msgspec.Raw) -> bytes:
    return bytes(data)


_ERROR_HEAD: Final = 2000  # characters of a stored error's message kept inline
_ERROR_TAIL: Final = 4000  # ... and of its traceback (the end, where the raise is)
_error_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorInfo)


async def _stored_error(conn: Connection, error: ErrorInfo, what: str, run_id: str) -> ErrorInfo:
    """A large error stored whole, with its head and tail kept inline (a small one as is).

    An error is never refused: one over ``max_value_bytes`` keeps only its head and tail.
    """
    if error.stored:  # stored by the run a restart copies it from: this run's too
        await store_value(conn, what, error.stored.encode(), run_id)
        return error
    data = _error_encoder.encode(error)
    if len(data) <= INLINE_BYTES:
        return error
    if len(data) > conn.max_value_bytes:
        ref = ""
        note = f" [... {len(data):,} bytes in all, over max_value_bytes: cut to its ends]"
    else:
        ref = (await store_value(conn, what, data, run_id)).decode()
        note = f" [... {len(data):,} bytes in all: the whole error is stored by reference]"
    return ErrorInfo(
        type=error.type,
        message=error.message if error.sealed else error.message[:_ERROR_HEAD] + note,
        traceback="" if error.sealed else error.traceback[-_ERROR_TAIL:],
        stored=ref,
    )


async def _loaded_error(conn: Connection, error: ErrorInfo, what: str) -> ErrorInfo:
    if not error.stored:
        return error
    return _error_decoder.decode(await load_value(conn, error.stored.encode(), what))


# Tuples, not ``A | B`` unions: a union in ``isinstance`` is built anew on every call, and
# this runs for every append.
_WITH_ERROR = (StepFailed, StepRetrying, RunFailed, ChildFailed)
_WITH_RESULT = (StepCompleted, RunCompleted, ChildCompleted)


async def store_event(conn: Connection, event: Event, run_id: str) -> Event:
    """``event`` with a large user value replaced by its reference (stored first)."""
    if isinstance(event, RunCompleted) and event.last_step is not None:  # carried: stored too
        last_step = await store_event(conn, event.last_step, run_id)
        assert isinstance(last_step, StepCompleted)
        event = msgspec.structs.replace(event, last_step=last_step)
    if isinstance(event, _WITH_RESULT):
        data = bytes(event.result)
        if len(data) <= INLINE_BYTES and not is_ref(data):
            return event  # the common case: a small value stays inline, nothing to copy
    if isinstance(event, _WITH_ERROR) and event.error:
        what = f"error of {type(event).__name__} in run {run_id!r}"
        error = await _stored_error(conn, event.error, what, run_id)
        return event if error is event.error else msgspec.structs.replace(event, error=error)
    if isinstance(event, RunContinued) and event.signals:  # signals it carries, too
        # Many untaken signals together could outgrow one message: then each payload over
        # 1 KiB goes by reference, so the event holds about 200 bytes a signal.
        crowded = sum(len(_raw(signal.payload)) for signal in event.signals) > INLINE_BYTES
        signals = []
        for signal in event.signals:
            what = f"payload of signal {signal.name!r}"
            data = await store_value(
                conn, what, _raw(signal.payload), run_id, inline=1024 if crowded else INLINE_BYTES
            )
            signals.append(msgspec.structs.replace(signal, payload=msgspec.Raw(data)))
        event = msgspec.structs.replace(event, signals=signals)
    if isinstance(event, RunStarted):
        data = await store_value(conn, f"input of run {run_id!r}", _raw(event.input), run_id)
        return msgspec.structs.replace(event, input=msgspec.Raw(data))
    if isinstance(event, StepCompleted):
        data = await store_value(conn, f"result of step {event.name!r}", _raw(event.result), run_id)
        return msgspec.structs.replace(event, result=msgspec.Raw(data))
    if isinstance(event, RunCompleted):
        data = await store_value(conn, f"result of run {run_id!r}", _raw(event.result), run_id)
        return msgspec.structs.replace(event, result=msgspec.Raw(data))
    if isinstance(event, ChildCompleted):
        data = await store_value(
            conn, f"result of child {event.name!r}", _raw(event.result), run_id
        )
        return msgspec.structs.replace(event, result=msgspec.Raw(data))
    if isinstance(event, SignalReceived):
        data = await store_value(
            conn, f"payload of signal {event.name!r}", _raw(event.payload), run_id
        )
        return msgspec.structs.replace(event, payload=msgspec.Raw(data))
    return event


async def load_event(conn: Connection, event: Event, run_id: str) -> Event:
    """``event`` with a referenced user value read back in its place."""
    what = f"a value of run {run_id!r}"
    if isinstance(event, StepFailed | StepRetrying | RunFailed | ChildFailed) and event.error:
        if event.error.stored:
            error = await _loaded_error(conn, event.error, f"an error of run {run_id!r}")
            return msgspec.structs.replace(event, error=error)
        return event
    if isinstance(event, RunContinued) and event.signals:  # signals it carries, too
        signals = [await load_event(conn, signal, run_id) for signal in event.signals]
        event = msgspec.structs.replace(event, signals=signals)
    if isinstance(event, RunStarted) and is_ref(_raw(event.input)):
        data = await load_value(conn, _raw(event.input), what)
        return msgspec.structs.replace(event, input=msgspec.Raw(data))
    with_result = StepCompleted | RunCompleted | ChildCompleted
    if isinstance(event, with_result) and is_ref(_raw(event.result)):
        data = await load_value(conn, _raw(event.result), what)
        return msgspec.structs.replace(event, result=msgspec.Raw(data))
    if isinstance(event, SignalReceived) and is_ref(_raw(event.payload)):
        data = await load_value(conn, _raw(event.payload), what)
        return msgspec.structs.replace(event, payload=msgspec.Raw(data))
    return event


async def load_events(conn: Connection, events: list[Event], run_id: str) -> list[Event]:
    """Every referenced value read back (a history without references is returned as is)."""
    return [await load_event(conn, event, run_id) for event in events]
