"""Chunks of stored values that no object names any more, found and purged.

A value in the object store is a meta message (``$O.natflow_values.M.<name>``, naming its
chunks' ``nuid``) and its chunks (``$O.natflow_values.C.<nuid>``). Deleting a value purges
the chunks its meta names. Two writers storing one value at once (the same large input
started twice, two steps returning the same result) each write chunks under a nuid of their
own, then their meta, and nats-py's ``put`` purges only the chunks of the meta it saw before
it began (none): the loser's chunks were named by no meta, and no delete ever found them
(7.7 MB left behind under a single 70 KB value). A writer that dies between its chunks and
its meta leaves the same. The engine looks now and then: chunks no meta names, whose last
message is older than a put could still be writing, are purged.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Final

import msgspec

from ._connection import Connection
from ._reader import LAST_PER_REQUEST, reader, stored_time
from ._undecodable import UNDECODABLE
from ._values import VALUES_BUCKET, VALUES_STREAM
from .events import utcnow

log = logging.getLogger("natflow.values")

_CHUNKS: Final = f"$O.{VALUES_BUCKET}.C."
_METAS: Final = f"$O.{VALUES_BUCKET}.M.>"
# A put still writing its chunks has no meta yet: chunks this recent are left alone.
ORPHAN_AGE: Final = timedelta(minutes=10)


class _Meta(msgspec.Struct):
    nuid: str = ""
    deleted: bool = False


_meta_decoder = msgspec.json.Decoder(_Meta)


async def purge_orphan_chunks(conn: Connection, older_than: timedelta = ORPHAN_AGE) -> int:
    """Purge the chunks no live meta names, last written before ``older_than`` ago; how many
    objects' chunks went."""
    info = await conn.admin(
        "listing stored values",
        lambda: conn.jsm.stream_info(VALUES_STREAM, subjects_filter=f"{_CHUNKS}>"),
    )
    chunked = {subject.removeprefix(_CHUNKS) for subject in info.state.subjects or {}}
    if not chunked:
        return 0
    named = set()
    for msg in (await reader(conn).read_all(VALUES_STREAM, _METAS)).messages:
        try:
            meta = _meta_decoder.decode(msg.data)
        except UNDECODABLE:
            continue
        if not meta.deleted:
            named.add(meta.nuid)
    unnamed = sorted(chunked - named)
    cutoff = utcnow() - older_than
    purged = 0
    for at in range(0, len(unnamed), LAST_PER_REQUEST):
        subjects = [f"{_CHUNKS}{nuid}" for nuid in unnamed[at : at + LAST_PER_REQUEST]]
        page = await reader(conn).read_last(VALUES_STREAM, subjects)
        for msg in page.messages:
            headers = msg.headers or {}
            if stored_time(headers) < cutoff:
                subject = headers.get("Nats-Subject", msg.subject)
                await conn.admin(
                    "purging an unnamed value's chunks",
                    lambda subject=subject: conn.jsm.purge_stream(  # type: ignore[misc]
                        VALUES_STREAM, subject=subject
                    ),
                    subject=f"{conn.api}.STREAM.PURGE.{VALUES_STREAM}",
                )
                purged += 1
    if purged:
        log.info("purged the chunks of %d stored values no object names", purged)
    return purged
