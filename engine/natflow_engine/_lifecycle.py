"""Lifecycle events: one JSON message per run status change, for any NATS client to follow.

Subject: ``natflow.lifecycle.<workflow>.<status>.<run_id>`` in the stream
``NATFLOW_LIFECYCLE`` (file storage, kept 30 days), so a subscriber filters on the workflow,
the status, or both (``natflow.lifecycle.order.failed.*``), and a durable consumer that was
away catches up on what it missed. ``<status>`` is one of the run statuses (``pending``,
``running``, ``sleeping``, ``waiting``, ``blocked``, ``paused``, ``completed``, ``failed``,
``cancelled``, ``terminated``). ``<workflow>`` is the workflow's name, with ``.``, ``*``,
``>``, ``%``, whitespace and non-ASCII characters percent-encoded (``orders.v2`` becomes
``orders%2Ev2``) so that any name is one subject token; :func:`workflow_token` does it.

The engine's dispatcher produces them while it folds history into the run index, off the
step hot path: steps change no status, so a run of a thousand steps emits a handful. The
message id is derived from the history event that changed the status (``<run_id>:<seq>``),
so a redelivery, a crash between publishing and indexing, or another engine replica
publishes nothing twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec
from nats.js import api

from ._append_batch import appender
from ._connection import Connection
from ._errors import ErrorInfo
from ._state import RunInfo
from ._values import value_ref

LIFECYCLE_STREAM: Final = "NATFLOW_LIFECYCLE"
LIFECYCLE_PREFIX: Final = "natflow.lifecycle"
# Long enough to cover an engine that dies after publishing and before acknowledging: its
# event comes back to another replica after the dispatcher's 30 s ack deadline.
DUPLICATE_WINDOW: Final = 600.0

# Printable ASCII that may stand in a subject token as it is.
_SAFE: Final = frozenset(c for c in map(chr, range(0x21, 0x7F)) if c not in ".*>%")


class LifecycleEvent(msgspec.Struct, kw_only=True, frozen=True):
    """A run's status changed: what ``client.events()`` yields and subscribers receive.

    ``seq`` is the history stream sequence of the event that changed the status; ``result``
    and ``error`` are set once the run has closed.
    """

    v: int = 1
    run_id: str
    workflow: str
    queue: str
    status: str
    previous: str | None = None
    at: datetime
    seq: int
    current: str | None = None
    parent: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    result_omitted: bool = False  # too large to repeat here: read it with describe()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LifecycleEvent)


def decode_lifecycle(data: bytes) -> LifecycleEvent:
    return _decoder.decode(data)


def workflow_token(name: str) -> str:
    """The workflow name as one subject token (itself, unless it holds ``.``, ``*``, ...)."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in name)


def lifecycle_subject(workflow: str, status: str, run_id: str) -> str:
    return f"{LIFECYCLE_PREFIX}.{workflow_token(workflow)}.{status}.{run_id}"


def lifecycle_filter(workflow: str | None = None, status: str | None = None) -> str:
    """The subject filter for one workflow's, one status's, or all lifecycle events."""
    wf = "*" if workflow is None else workflow_token(workflow)
    return f"{LIFECYCLE_PREFIX}.{wf}.{status or '*'}.*"


def lifecycle_stream_config(replicas: int, max_age: float) -> api.StreamConfig:
    return api.StreamConfig(
        name=LIFECYCLE_STREAM,
        description="natflow: one message per run status change, for any NATS client",
        subjects=[f"{LIFECYCLE_PREFIX}.>"],
        storage=api.StorageType.FILE,
        allow_direct=True,
        allow_atomic=True,  # many runs' changes in one batch (_append_batch)
        duplicate_window=DUPLICATE_WINDOW,
        max_age=max_age,
        num_replicas=replicas,
    )


async def publish_status(conn: Connection, previous: str | None, info: RunInfo, hseq: int) -> None:
    """Publish the change of ``info``'s run to ``info.status`` (deduplicated by ``hseq``)."""
    closed = info.is_closed
    # A result stored by reference is left out as a large one is (a subscriber reads it
    # with describe()), not handed on as the reference.
    stored = closed and value_ref(info.result) is not None
    event = LifecycleEvent(
        run_id=info.run_id,
        workflow=info.workflow,
        queue=info.queue,
        status=info.status,
        previous=previous,
        at=info.updated_at,
        seq=hseq,
        current=info.current,
        parent=info.parent,
        result=info.result if closed and not stored else None,
        error=info.error,
        result_omitted=stored,
    )
    data = _encoder.encode(event)
    if len(data) > conn.max_payload - 1024:
        data = _encoder.encode(msgspec.structs.replace(event, result=None, result_omitted=True))
    await appender(conn, LIFECYCLE_STREAM).publish(
        lifecycle_subject(info.workflow, info.status, info.run_id),
        data,
        {"Nats-Msg-Id": f"{info.run_id}:{hseq}"},
    )
