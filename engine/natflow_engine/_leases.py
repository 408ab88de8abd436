"""Run leases in KV: who holds a run, until when, and how to hand its task back.

A worker writes ``natflow_leases/<run_id>`` when it takes a run's task and renews it with a
revision-checked put on every heartbeat (never per step). The lease's TTL equals the task
consumer's ack deadline, so the lease and the task expire together. A renewal that meets a
newer revision means another worker took the run: the holder drops it. The history's
conditional append remains the fencing token; the lease makes ownership visible and lets the
engine hand a dead worker's tasks back at once (it NAKs the task's ``ack_subject``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

import msgspec

from ._connection import Connection, JetStreamError
from ._kv import kv_delete_nowait, kv_get, kv_put, kv_stream
from ._undecodable import UNDECODABLE
from .events import utcnow

LEASES_BUCKET = "natflow_leases"
# Seconds a released lease's delete marker stays. Nothing watches the leases (the reaper reads
# them every 30 s and when a worker is gone), so a marker only fills those reads: at the
# default minute, 12,000 of them at 200 runs/s, which a reap read before it could hand a dead
# worker's runs back.
LEASE_MARKER_TTL: Final = 1.0


class Lease(msgspec.Struct, kw_only=True):
    v: int = 1
    run_id: str
    worker: str
    queue: str
    ack_subject: str
    ttl: float
    acquired_at: datetime
    expires_at: datetime


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Lease)


def decode_lease(data: bytes) -> Lease:
    return _decoder.decode(data)


class Leases:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def acquire(
        self, run_id: str, worker: str, queue: str, ack_subject: str, ttl: float
    ) -> tuple[Lease, int]:
        """Take the run's lease. The caller was handed the run's task by the consumer, which
        is the authority on who may take a run, so this overwrites any earlier lease."""
        now = utcnow()
        lease = Lease(
            run_id=run_id,
            worker=worker,
            queue=queue,
            ack_subject=ack_subject,
            ttl=ttl,
            acquired_at=now,
            expires_at=now + timedelta(seconds=ttl),
        )
        revision = await kv_put(
            self._conn, LEASES_BUCKET, run_id, _encoder.encode(lease), ttl=ttl + 1
        )
        return lease, revision

    async def renew(self, lease: Lease, revision: int) -> tuple[Lease, int] | None:
        """Extend the lease; None if another worker has taken it since ``revision``.

        A renewal whose acknowledgement was lost (a leader change) has moved the revision on
        although the lease is still ours: on a conflict the entry is read, and if it names
        this holder and acquisition, renewed from its current revision.
        """
        lease.expires_at = utcnow() + timedelta(seconds=lease.ttl)
        for _ in range(2):
            new = await self._put_at(lease, revision)
            if new is None:
                found = await self.get(lease.run_id)
                if found is None:  # expired while it could not be renewed: write it anew
                    revision = await self._last_revision(lease.run_id)
                    continue
                if not _same_holding(found[0], lease):
                    return None
                revision = found[1]
                continue
            return lease, new
        return None

    async def write_back(self, lease: Lease) -> tuple[Lease, int] | None:
        """Write ``lease`` over whatever the run's entry holds now (another worker wrote over
        it and let the run go); None if the entry changed again meanwhile."""
        lease.expires_at = utcnow() + timedelta(seconds=lease.ttl)
        new = await self._put_at(lease, await self._last_revision(lease.run_id))
        return None if new is None else (lease, new)

    async def _put_at(self, lease: Lease, revision: int) -> int | None:
        """Store ``lease`` if its entry is still at ``revision``: the new revision, or None."""
        try:
            return await kv_put(
                self._conn,
                LEASES_BUCKET,
                lease.run_id,
                _encoder.encode(lease),
                revision=revision,
                ttl=lease.ttl + 1,
            )
        except JetStreamError as exc:
            if not exc.wrong_last_sequence:
                raise
            return None

    async def _last_revision(self, run_id: str) -> int:
        """The entry's last revision, a delete marker's included (0: nothing there)."""
        msg = await self._conn.request(
            f"{self._conn.api}.DIRECT.GET.{kv_stream(LEASES_BUCKET)}.$KV.{LEASES_BUCKET}.{run_id}",
            b"",
        )
        headers = msg.headers or {}
        return 0 if "Status" in headers else int(headers.get("Nats-Sequence", "0"))

    async def release(self, run_id: str, revision: int) -> None:
        """Drop the lease if it is still ours (fire and forget)."""
        await kv_delete_nowait(
            self._conn, LEASES_BUCKET, run_id, revision=revision, marker_for=LEASE_MARKER_TTL
        )

    async def get(self, run_id: str) -> tuple[Lease, int] | None:
        """The run's lease and its revision; None if there is none (or it is not one: the
        engine's reaper sets such an entry aside)."""
        found = await kv_get(self._conn, LEASES_BUCKET, run_id)
        if found is None:
            return None
        try:
            return decode_lease(found[0]), found[1]
        except UNDECODABLE:
            return None


def _same_holding(found: Lease, mine: Lease) -> bool:
    return found.worker == mine.worker and found.acquired_at == mine.acquired_at
