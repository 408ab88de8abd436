"""The few KV operations natflow needs, as raw JetStream requests.

Buckets are ordinary JetStream KV buckets (``nats kv ls`` shows them). natflow writes them with
raw publishes because it needs what nats-py's KV helpers lack: a per-entry TTL on every put,
revision-checked puts and deletes, and fire-and-forget deletes off the hot path.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Final

from nats.aio.msg import Msg
from nats.js import api

from ._connection import Connection, NoResponders
from ._errors import NatflowError
from ._reader import reader

KV_OPERATION: Final = "KV-Operation"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def kv_stream_config(bucket: str, description: str, replicas: int) -> api.StreamConfig:
    """The stream behind a bucket, as nats-py and nats.go create it, plus per-entry TTLs."""
    return api.StreamConfig(
        name=kv_stream(bucket),
        description=description,
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=120.0,
        max_msgs_per_subject=1,
        max_consumers=-1,
        max_msgs=-1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


def marker_ttl() -> float:
    """How long a delete marker stays (``NATFLOW_KV_MARKER_TTL`` seconds, default 60).

    Long enough for every watcher to see it; then it expires (silently: the buckets keep no
    marker of an expiry), so a bucket holds nothing for runs that are gone.
    """
    return float(os.environ.get("NATFLOW_KV_MARKER_TTL", "60"))


def _ttl_header(ttl: float) -> str:
    return f"{max(1, round(ttl))}s"  # the server takes whole seconds, at least 1


async def kv_put(
    conn: Connection,
    bucket: str,
    key: str,
    value: bytes,
    *,
    revision: int | None = None,
    ttl: float | None = None,
) -> int:
    """Store ``value``; with ``revision``, only if the entry is still at that revision (0: new).

    Returns the new revision. A revision mismatch raises JetStreamError 10071.
    """
    headers: dict[str, str] = {}
    if revision is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
    if ttl is not None:
        headers["Nats-TTL"] = _ttl_header(ttl)
    ack = await conn.publish(conn.kv_write_subject(bucket, key), value, headers or None)
    return ack.seq


async def kv_get(conn: Connection, bucket: str, key: str) -> tuple[bytes, int] | None:
    """The entry's value and revision, or None if it is missing or deleted."""
    msg = await conn.request(
        f"{conn.api}.DIRECT.GET.{kv_stream(bucket)}.{kv_subject(bucket, key)}", b""
    )
    headers = msg.headers or {}
    if headers.get("Status") == "404" or headers.get(KV_OPERATION) in ("DEL", "PURGE"):
        return None
    if "Status" in headers:
        raise NatflowError(f"reading {bucket}/{key} failed: {headers}")
    return msg.data, int(headers["Nats-Sequence"])


async def kv_delete_nowait(
    conn: Connection,
    bucket: str,
    key: str,
    *,
    revision: int | None = None,
    marker_for: float | None = None,
) -> None:
    """Delete an entry without waiting for the acknowledgement (off the hot path). Its
    delete marker stays ``marker_for`` seconds (default :func:`marker_ttl`)."""
    ttl = marker_ttl() if marker_for is None else marker_for
    headers = {KV_OPERATION: "DEL", "Nats-TTL": _ttl_header(ttl)}
    if revision is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
    await conn.send(conn.kv_write_subject(bucket, key), b"", headers)


async def kv_delete(
    conn: Connection, bucket: str, key: str, *, revision: int | None = None
) -> None:
    """Delete an entry; with ``revision``, only if it is still at that revision (else
    JetStreamError 10071)."""
    headers = {KV_OPERATION: "DEL", "Nats-TTL": _ttl_header(marker_ttl())}
    if revision is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(revision)
    await conn.publish(conn.kv_write_subject(bucket, key), b"", headers)


async def kv_watch(conn: Connection, bucket: str) -> AsyncIterator[tuple[str, bytes | None, int]]:
    """Every entry's latest value, then every change: ``(key, value or None, revision)``."""
    prefix = f"$KV.{bucket}."
    sub = await conn.js.subscribe(
        f"{prefix}>",
        stream=kv_stream(bucket),
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
        # The ordered consumer notices a server restart by missed heartbeats (two of them)
        # and then recreates itself from the last sequence it saw: keep that under a second.
        idle_heartbeat=0.4,
    )
    try:
        async for msg in sub.messages:
            key = msg.subject[len(prefix) :]
            deleted = (msg.headers or {}).get(KV_OPERATION) in ("DEL", "PURGE")
            yield key, None if deleted else msg.data, msg.metadata.sequence.stream
    finally:
        await sub.unsubscribe()


async def kv_entries(conn: Connection, bucket: str, keys: str = ">") -> list[Msg]:
    """The live (not deleted) entries of ``bucket`` whose keys match ``keys``; each message
    names its key in ``Nats-Subject`` and its revision in ``Nats-Sequence``. A denial is
    named at once (the batch reader's), not after a timeout.

    Read as the bucket's stream by subject, in batches, not as "the last message of each
    key" (``multi_last``): nats-server answers that with at most 1,024 keys ("413 Too Many
    Results"), and a bucket's delete markers count, so the leases of a busy minute passed
    it. The buckets keep one message per key (``max_msgs_per_subject`` 1), so the stream
    holds the same messages.
    """
    try:
        page = await reader(conn).read_all(kv_stream(bucket), f"$KV.{bucket}.{keys}", headers=True)
    except NoResponders:  # the bucket does not exist (yet): nothing in it
        return []
    return [
        m
        for m in page.messages
        if m.data and (m.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")
    ]
