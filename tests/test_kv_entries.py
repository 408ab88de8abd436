"""A bucket past 1,024 keys, delete markers included, is read whole (``kv_entries``), and the
reaper hands a gone worker's runs back there. nats-server answers "the last message of each
key" with at most 1,024 keys ("413 Too Many Results"): the leases of a busy minute passed it,
and the reaper's read failed, taking the engine down with it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from natflow import Client, NatflowError
from natflow_engine._kv import kv_delete, kv_entries, kv_put
from natflow_engine._leases import LEASES_BUCKET, Leases
from natflow_engine._reaper import STRIKES, Reaper
from natflow_engine._streams import ensure_streams

from tests.helpers import wait_for

KEYS = 1100
DELETED = 600


async def _fill(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    await asyncio.gather(
        *(kv_put(conn, LEASES_BUCKET, f"filler-{n}", b"not a lease") for n in range(KEYS))
    )
    await asyncio.gather(*(kv_delete(conn, LEASES_BUCKET, f"filler-{n}") for n in range(DELETED)))


async def test_a_bucket_past_1024_keys_is_read_whole(client: Client) -> None:
    await _fill(client)
    entries = await kv_entries(client.connection, LEASES_BUCKET)
    keys = {(m.headers or {})["Nats-Subject"].rsplit(".", 1)[1] for m in entries}
    assert keys == {f"filler-{n}" for n in range(DELETED, KEYS)}
    assert all(int((m.headers or {})["Nats-Sequence"]) > 0 for m in entries)


async def test_the_reaper_hands_back_a_gone_workers_run_among_1100_lease_keys(
    client: Client,
) -> None:
    await _fill(client)
    conn = client.connection
    leases = Leases(conn)
    await leases.acquire("held-run", "gone-worker", "q", "_INBOX.gone.ack", ttl=60)
    reaper = Reaper(conn)
    holders = await reaper.sweep()  # the 500 fillers are not leases: set aside, not fatal
    assert holders == {"gone-worker"}
    await reaper._reap("gone-worker")

    async def handed_back() -> bool:
        return await leases.get("held-run") is None

    await wait_for(handed_back, what="the gone worker's lease to be deleted")


async def test_a_reap_that_fails_leaves_the_engine_running(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_streams(client.connection)
    reaper = Reaper(client.connection)

    async def refused() -> list[object]:
        raise NatflowError("reading KV_natflow_leases failed: 413 Too Many Results")

    monkeypatch.setattr(reaper, "_leases", refused)
    reaper._strikes["silent-worker"] = STRIKES - 1  # this probe is the one that reaps
    with caplog.at_level(logging.WARNING, logger="natflow.reaper"):
        await reaper._probe("silent-worker")  # no exception: the probe's task group lives on
    assert any("could not be handed back yet" in r.getMessage() for r in caplog.records)


async def test_a_gone_worker_is_reaped_once_not_at_every_probe_until_the_next_sweep(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    leases = Leases(conn)
    await leases.acquire("held-run", "gone-worker", "q", "_INBOX.gone.ack", ttl=60)
    reaper = Reaper(conn)
    assert await reaper.sweep() == {"gone-worker"}  # a holder with no registry entry
    reads = 0
    read_leases = reaper._leases

    async def counted() -> list[tuple[object, int]]:
        nonlocal reads
        reads += 1
        return await read_leases()  # type: ignore[return-value]

    monkeypatch.setattr(reaper, "_leases", counted)
    for _ in range(STRIKES * 4):  # probe rounds, as the reaper's loop makes them
        for owner in reaper.to_probe():
            await reaper._probe(owner)
    assert reaper.to_probe() == set()

    async def handed_back() -> bool:
        return await leases.get("held-run") is None

    await wait_for(handed_back, what="the gone worker's lease to be deleted")
    assert reads == 1  # was one read of every lease at every other probe until the sweep
