"""The run index writes a new run's summary without reading first; the write is conditional,
so a start folded twice (a redelivery, a restarted engine, another replica) counts once."""

from __future__ import annotations

import msgspec
from natflow import Client
from natflow_engine._index import RunIndex
from natflow_engine._streams import ensure_streams
from natflow_engine.events import RunClaimed, RunStarted, utcnow


async def test_a_start_folded_twice_is_indexed_once(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    start = RunStarted(
        id="twice-1:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    changes: list[tuple[str | None, str]] = []

    async def on_status(previous: str | None, info: object, hseq: int) -> None:
        changes.append((previous, getattr(info, "status", "?")))

    first = await RunIndex(conn).apply("twice-1", start, 5, on_status)
    assert first is not None and first.status == "pending"
    # A fresh index (nothing cached), as a restarted engine or another replica holds.
    assert await RunIndex(conn).apply("twice-1", start, 5, on_status) is None
    claim = RunClaimed(id="twice-1:2", at=utcnow(), worker="w1", delivery=1)
    index = RunIndex(conn)
    running = await index.apply("twice-1", claim, 6, on_status)
    assert running is not None and running.status == "running"
    assert (await index.get("twice-1")) == running
    # A start seen again after the claim (redelivered late) changes nothing.
    assert await RunIndex(conn).apply("twice-1", start, 5, on_status) is None
    assert (await RunIndex(conn).get("twice-1")) == running
    # The status hook may run again for a start folded twice (its effects are idempotent:
    # a lifecycle event's message id is its history event's), never with another status.
    assert changes[0] == (None, "pending") and ("pending", "running") in changes
    assert set(changes) == {(None, "pending"), ("pending", "running")}
