"""The reaper: hands a dead worker's runs to other workers within a second.

It watches the worker registry and pings every registered worker
(``natflow.worker.<identity>.ping``). "No responders" twice in a row means the worker's
connection is gone (killed, crashed, cut off), so the reaper reads the leases bucket and NAKs
the task of every run that worker leased: the queue's consumer redelivers it at once and
another worker resumes the run. The leases are read only then, not watched: a watch cost the
engine two deliveries per run (a lease's write and its delete), the reap a few milliseconds.
A worker that answers slowly or not at all (paused, overloaded) is left alone; its lease and
ack deadline expire on their own, and the history's conditional append fences it if it comes
back. So is a worker on another server (a leaf node) that cannot be
reached because the link to that server is cut (``_reach``): a partitioned worker is not gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import nats.errors

from ._connection import Connection, NoResponders, RequestTimeout
from ._errors import NatflowError
from ._kv import kv_delete_nowait, kv_entries, kv_watch
from ._leases import LEASES_BUCKET, Lease, Leases, decode_lease
from ._logs import fields
from ._metrics import TAKEOVERS
from ._quarantine import quarantined
from ._reach import Place, is_near, place_of
from ._registry import WORKERS_BUCKET, decode_worker, ping_subject
from ._signals import dead_letter_item
from ._undecodable import UNDECODABLE
from .events import utcnow

log = logging.getLogger("natflow.reaper")

PROBE_INTERVAL: Final = 0.25
STRIKES: Final = 2  # consecutive "no responders" before a worker counts as gone
SWEEP_INTERVAL: Final = 30.0  # seconds between reads of every lease (see Reaper.sweep)


class Reaper:
    def __init__(self, conn: Connection, probe_interval: float = PROBE_INTERVAL) -> None:
        self._conn = conn
        self._lease_bucket = Leases(conn)
        self._interval = probe_interval
        self.workers: set[str] = set()
        self.holders: set[str] = set()  # workers that held a lease at the last sweep
        self.places: dict[str, Place] = {}  # where each registered worker is connected
        self.partitioned: set[str] = set()  # workers now unreachable behind a cut link
        self._strikes: dict[str, int] = {}
        self._quiet_until = 0.0
        self._probing: set[str] = set()
        self.reaped = 0
        # Called with a dead worker's identity once its runs are handed back (the limit
        # service frees its concurrency slots).
        self.on_reaped: list[Callable[[str], Awaitable[object]]] = []

    def pause_probes(self, seconds: float) -> None:
        """After this process reconnects, workers may still be reconnecting: hold fire."""
        self._quiet_until = time.monotonic() + seconds

    async def run(self) -> None:
        self._conn.on_reconnect.append(lambda: self.pause_probes(2.0))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_workers)
            tg.start_soon(self._sweep_every, SWEEP_INTERVAL)
            while True:
                await anyio.sleep(self._interval)
                if time.monotonic() < self._quiet_until or not self._conn.nc.is_connected:
                    continue
                for owner in self.to_probe():
                    self._probing.add(owner)
                    tg.start_soon(self._probe, owner)

    def to_probe(self) -> set[str]:
        """The workers to ping now: every registered one and every lease holder of the last
        sweep, less those a probe is still out for."""
        return (self.workers | self.holders) - self._probing

    async def _sweep_every(self, seconds: float) -> None:
        while True:
            try:
                await self.sweep()
            except (NatflowError, nats.errors.Error) as exc:
                log.warning("leases not swept (%s); again in %g s", exc, seconds)
            await anyio.sleep(seconds)

    async def sweep(self) -> set[str]:
        """Read every lease: its holders are probed too (a worker whose registry entry is
        missing still has its runs handed back), and an entry that is not a lease is set
        aside. Returns the holders."""
        self.holders = {lease.worker for lease, _ in await self._leases()}
        return self.holders

    async def _leases(self) -> list[tuple[Lease, int]]:
        """Every live lease and its revision; an entry that is not a lease is set aside (a
        lease is advisory: history fences)."""
        leases: list[tuple[Lease, int]] = []
        for msg in await kv_entries(self._conn, LEASES_BUCKET):
            headers = msg.headers or {}
            key = headers.get("Nats-Subject", "").removeprefix(f"$KV.{LEASES_BUCKET}.")
            revision = int(headers.get("Nats-Sequence", "0"))
            try:
                leases.append((decode_lease(msg.data), revision))
            except UNDECODABLE as exc:
                await self._quarantine(LEASES_BUCKET, "kv_leases", key, msg.data, revision, exc)
                await self._quietly(
                    kv_delete_nowait(self._conn, LEASES_BUCKET, key, revision=revision)
                )
        return leases

    async def _watch_workers(self) -> None:
        async for identity, value, revision in kv_watch(self._conn, WORKERS_BUCKET):
            if value is None:
                self.workers.discard(identity)
                self.places.pop(identity, None)
                continue
            try:
                info = decode_worker(value)
                self.workers.add(info.identity)
                self.places[info.identity] = Place(info.server, info.cluster, info.domain)
            except UNDECODABLE as exc:
                # A live worker writes its entry again on its next heartbeat.
                await self._quarantine(WORKERS_BUCKET, "kv_workers", identity, value, revision, exc)

    async def _quarantine(
        self, bucket: str, path: str, key: str, value: bytes, revision: int, exc: Exception
    ) -> None:
        reason = f"the entry does not decode: {exc}"
        if quarantined(path, f"{bucket}/{key}", reason, logger=log):
            letter = dead_letter_item(
                self._conn, "kv", f"$KV.{bucket}.{key}", reason, revision, value
            )
            await self._quietly(letter)

    @staticmethod
    async def _quietly(op: Awaitable[None]) -> None:
        try:
            await op
        except (NatflowError, nats.errors.Error) as exc:
            log.warning("could not set a bad entry aside: %s", exc)

    async def _probe(self, identity: str) -> None:
        try:
            await self._ping(identity)
        except (NatflowError, nats.errors.Error) as exc:
            # The engine goes on: the next probe of a worker still silent tries again.
            log.warning(
                "worker %s is gone, but its runs could not be handed back yet (%s); trying again",
                identity,
                exc,
                extra=fields(worker=identity),
            )
        finally:
            self._probing.discard(identity)

    async def _ping(self, identity: str) -> None:
        try:
            await self._conn.request(ping_subject(identity), b"", timeout=1.0)
        except NoResponders:
            strikes = self._strikes.get(identity, 0) + 1
            self._strikes[identity] = strikes
            if strikes >= STRIKES:
                if await self._behind_a_cut(identity):
                    self._strikes.pop(identity, None)  # count again once its server is back
                    return
                await self._reap(identity)
            return
        except (RequestTimeout, NatflowError, nats.errors.Error):
            pass  # slow or unreachable from here: not proof of death
        self._strikes.pop(identity, None)
        self.partitioned.discard(identity)

    async def _behind_a_cut(self, identity: str) -> bool:
        """Whether the silent worker is on a server this engine cannot reach now (its runs
        stay with it until its lease lapses) rather than gone from a reachable server."""
        there = self.places.get(identity)
        if there is None or is_near(there, place_of(self._conn.nc)):
            return False
        if await self._server_answers(identity, there):
            self.partitioned.discard(identity)
            return False
        if identity not in self.partitioned:
            self.partitioned.add(identity)
            log.warning(
                "worker %s does not answer, nor does its server %s (a cut link?): its runs "
                "stay with it until its lease lapses",
                identity,
                there.server,
                extra=fields(worker=identity),
            )
        return True

    async def _server_answers(self, identity: str, there: Place) -> bool:
        """Whether the server ``there`` is reachable: its JetStream domain, or another worker
        registered on it, answers."""
        probes: list[tuple[str, bytes]] = []
        if there.domain and there.domain != place_of(self._conn.nc).domain:
            probes.append((f"$JS.{there.domain}.API.INFO", b""))
        peers = [w for w, p in self.places.items() if p.server == there.server and w != identity]
        probes += [(ping_subject(peer), b"") for peer in peers[:3]]
        for subject, body in probes:
            try:
                await self._conn.request(subject, body, timeout=0.5)
            except (NoResponders, RequestTimeout, NatflowError, nats.errors.Error):
                continue
            return True
        return False

    async def _reap(self, identity: str) -> None:
        self._strikes.pop(identity, None)
        held = [(lease, rev) for lease, rev in await self._leases() if lease.worker == identity]
        for lease, revision in held:
            await self._conn.send(lease.ack_subject, b"-NAK")
            await self._lease_bucket.release(lease.run_id, revision)
            if lease.expires_at < utcnow():
                continue  # a lease left behind (its expiry is not seen here): no run moved
            TAKEOVERS.labels(lease.queue, "reaped").inc()
            log.info(
                "run %s: handed back from worker %s, which is gone",
                lease.run_id,
                identity,
                extra=fields(lease.run_id, queue=lease.queue, worker=identity),
            )
        for hook in self.on_reaped:
            try:
                await hook(identity)
            except (NatflowError, nats.errors.Error) as exc:
                log.warning("worker %s: could not free what it held: %s", identity, exc)
        if identity in self.workers:
            await kv_delete_nowait(self._conn, WORKERS_BUCKET, identity)
            self.workers.discard(identity)
        # Reaped, it holds nothing: until the next sweep, a holder still listed would be
        # probed and reaped again every other probe, each time reading every lease (a
        # minute's delete markers: 12,000 at 200 runs/s).
        self.holders.discard(identity)
        self.reaped += len(held)
        log.warning(
            "worker %s is gone (its connection closed); handed %d runs to other workers",
            identity,
            len(held),
            extra=fields(worker=identity),
        )
