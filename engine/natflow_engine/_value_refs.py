"""Which runs refer to which stored value, so a value is deleted with the last run using it.

A large value lives once in the ``natflow_values`` object store under its SHA-256 and may be
shared by many runs (the same input, a result passed on). Each run that stores one first
writes a reference marker, the KV entry ``<sha256>.<run_id>`` in ``natflow_value_refs``;
deleting a run (``client.delete``, retention) removes its markers and deletes each of its
objects that no other run's marker names any more (``_value_release``).

The race to close: run A is deleted while run B stores the same value. B writes its marker,
then checks whether the object is there (a retried or shared write skips the upload). The
deleter writes a tombstone ``<sha256>.~deleting`` *before* it looks for other markers, deletes
the object only if there are none, and removes the tombstone after. A writer that finds the
tombstone waits for it to go before it checks for the object. So either the deleter sees B's
marker (and keeps the object), or B's marker came after the deleter looked, B then sees the
tombstone (written before the look) and waits until the delete is over, and finds the object
gone and uploads it again. A tombstone older than :data:`TOMBSTONE_STALE` (its deleter died)
is ignored. ``~`` is never in a run id, so a tombstone never reads as a marker.

Values stored by a natflow before this module (no markers) are never deleted by it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Final

import anyio

from ._kv import KV_OPERATION, kv_get, kv_put, kv_stream
from ._reader import reader, stored_time

if TYPE_CHECKING:
    from ._connection import Connection

log = logging.getLogger("natflow.values")

REFS_BUCKET: Final = "natflow_value_refs"
TOMBSTONE: Final = "~deleting"
TOMBSTONE_STALE: Final = 30.0  # seconds: a deleter takes well under a second per object
_POLL: Final = 0.05


def ref_key(digest: str, run_id: str) -> str:
    return f"{digest}.{run_id}"


async def mark(conn: Connection, digest: str, run_id: str) -> None:
    """Record that ``run_id`` refers to value ``digest``; then wait out a delete of it."""
    await kv_put(conn, REFS_BUCKET, ref_key(digest, run_id), b"")
    deadline = time.monotonic() + TOMBSTONE_STALE
    while time.monotonic() < deadline:
        found = await kv_get(conn, REFS_BUCKET, ref_key(digest, TOMBSTONE))
        if found is None or _stale(found[0]):
            return
        await anyio.sleep(_POLL)


def _stale(value: bytes) -> bool:
    try:
        return time.time() - float(value) > TOMBSTONE_STALE
    except ValueError:
        return True


async def live_keys(conn: Connection, subject: str) -> list[str]:
    """Keys of live (not deleted) entries on ``subject`` (wildcards allowed)."""
    return [name.split(".", 2)[2] for name, _ in await _live_entries(conn, subject)]


async def run_markers(conn: Connection, run_id: str) -> list[tuple[str, int, datetime]]:
    """The run's live markers: ``(digest, revision, when the server stored it)``."""
    entries = await _live_entries(conn, f"$KV.{REFS_BUCKET}.*.{run_id}")
    return [
        (name.split(".")[2], int(headers["Nats-Sequence"]), stored_time(headers))
        for name, headers in entries
    ]


async def _live_entries(conn: Connection, subject: str) -> list[tuple[str, dict[str, str]]]:
    """The subject and headers of each live (not deleted) entry on ``subject``."""
    page = await reader(conn).read_all(kv_stream(REFS_BUCKET), subject, headers=True)
    found = []
    for msg in page.messages:
        headers = msg.headers or {}
        if headers.get(KV_OPERATION) not in ("DEL", "PURGE"):
            found.append((headers.get("Nats-Subject", msg.subject), headers))
    return found


async def run_values(conn: Connection, run_id: str) -> list[str]:
    """The digests of the values ``run_id`` stored (or refers to)."""
    keys = await live_keys(conn, f"$KV.{REFS_BUCKET}.*.{run_id}")
    return sorted({key.partition(".")[0] for key in keys})


__all__ = [
    "REFS_BUCKET",
    "TOMBSTONE",
    "live_keys",
    "mark",
    "ref_key",
    "run_markers",
    "run_values",
]
