"""Deleting stored values with the runs that used them: a run's markers go, and each value
no other run's marker names is deleted (the race with a concurrent writer is closed by the
tombstone protocol described in ``_value_refs``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ._errors import NatflowError
from ._kv import kv_delete, kv_put
from ._value_refs import REFS_BUCKET, TOMBSTONE, live_keys, ref_key, run_values
from ._values import delete_object

if TYPE_CHECKING:
    from ._connection import Connection

log = logging.getLogger("natflow.values")


async def release_run_values(conn: Connection, run_id: str) -> int:
    """Drop the run's markers and delete each of its values no other run refers to; how many
    values were deleted. Safe to run again after a crash (what is gone stays gone)."""
    deleted = 0
    for digest in await run_values(conn, run_id):
        await kv_delete(conn, REFS_BUCKET, ref_key(digest, run_id))
        if await delete_if_unreferenced(conn, digest):
            deleted += 1
    return deleted


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
