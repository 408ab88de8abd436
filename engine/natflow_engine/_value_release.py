"""Deleting stored values with the runs that used them: a run's markers go, and each value
no other run's marker names is deleted (the race with a concurrent writer is closed by the
tombstone protocol described in ``_value_refs``)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from ._connection import JetStreamError
from ._errors import NatflowError
from ._kv import kv_delete, kv_put
from ._level_read import first_start
from ._reader import stored_time
from ._value_refs import REFS_BUCKET, TOMBSTONE, live_keys, ref_key, run_markers, run_values
from ._values import delete_object, ref_of
from .events import RunContinued, decode_event, event_kind

if TYPE_CHECKING:
    from ._connection import Connection

log = logging.getLogger("natflow.values")

_CLOCK_SLACK: Final = timedelta(seconds=5)


async def release_run_values(conn: Connection, run_id: str) -> int:
    """Drop the run's markers and delete each of its values no other run refers to; how many
    values were deleted. Safe to run again after a crash (what is gone stays gone)."""
    deleted = 0
    for digest in await run_values(conn, run_id):
        await kv_delete(conn, REFS_BUCKET, ref_key(digest, run_id))
        if await delete_if_unreferenced(conn, digest):
            deleted += 1
    return deleted


async def release_older_stretches(conn: Connection, run_id: str) -> int:
    """After ``ctx.continue_as_new``: drop the run's markers written before its current
    stretch began, and delete each of those values no other run refers to; how many were.

    The stretch keeps what its ``run_continued`` refers to (its input, the signals it
    carries). A value its workflow stores from then on is marked anew (a later marker: kept,
    even where an older stretch stored the same value), and a marker is removed only at the
    revision read here, so one written meanwhile stays. Times are the server's (a worker's
    clock may be off), less a few seconds for the clocks of a cluster's servers.
    """
    msg = await first_start(conn, run_id)
    if msg is None or event_kind(msg.data) != "run_continued":
        return 0
    start = decode_event(msg.data)
    assert isinstance(start, RunContinued)
    keep = _refs_in(start)
    cutoff = stored_time(msg.headers or {}) - _CLOCK_SLACK
    deleted = 0
    for digest, revision, stored in await run_markers(conn, run_id):
        if digest in keep or stored >= cutoff:
            continue
        try:
            await kv_delete(conn, REFS_BUCKET, ref_key(digest, run_id), revision=revision)
        except JetStreamError as exc:
            if not exc.wrong_last_sequence:
                raise
            continue  # marked again meanwhile: the new stretch uses it
        if await delete_if_unreferenced(conn, digest):
            deleted += 1
    return deleted


def _refs_in(event: RunContinued) -> set[str]:
    values = [bytes(event.input), *(bytes(s.payload) for s in event.signals)]
    return {ref.digest for ref in map(ref_of, values) if ref is not None}


async def delete_if_unreferenced(conn: Connection, digest: str) -> bool:
    """Delete stored value ``digest`` if no run's marker names it (see the module docstring)."""
    tombstone = ref_key(digest, TOMBSTONE)
    await kv_put(conn, REFS_BUCKET, tombstone, str(time.time()).encode())
    try:
        keys = await live_keys(conn, f"$KV.{REFS_BUCKET}.{digest}.*")
        others = [key for key in keys if key != tombstone]
        if others:
            return False
        await delete_object(conn, digest)
        log.debug("value %s deleted: no run refers to it", digest)
        return True
    finally:
        try:
            await kv_delete(conn, REFS_BUCKET, tombstone)
        except NatflowError as exc:  # a writer waits at most TOMBSTONE_STALE for it
            log.warning("value %s: tombstone left behind (%s)", digest, exc)
