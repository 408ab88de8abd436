"""The leases of the runs a worker holds: written when a run is taken, dropped when it goes.

A lease (KV, one key per run) makes a run's holder visible, so the engine can hand the run
back at once when its holder dies, and nudge the holder when a signal arrives. It is advisory:
the claim appended to history fences other holders, so a lease that cannot be written costs
no run. The heartbeat (see ``_pulse``) renews it; its time to live is the worker's lease period.
"""

from __future__ import annotations

import contextlib
import logging
import time

from natflow_engine import Connection, Leases, NatflowError, last_signal_seq, quietly

from ._held import Held

log = logging.getLogger("natflow.worker")


class RunLeases:
    """Takes and drops the leases of the runs one worker holds.

    Args:
        leases: The lease bucket.
        conn: The worker's connection (to look for signals once a lease is written).
        identity: The worker's identity, written into each lease.
        ttl: Seconds a lease lasts without renewal (the worker's lease period).
    """

    def __init__(self, leases: Leases, conn: Connection, identity: str, ttl: float) -> None:
        self._leases = leases
        self._conn = conn
        self._identity = identity
        self.ttl = ttl  # lowered at start to match a queue's shorter ack deadline

    async def take(self, held: Held) -> bool:
        """Write the run's lease; False if it could not be written (it is advisory: the
        claim append still fences other holders)."""
        try:
            held.lease, held.revision = await self._leases.acquire(
                held.run_id, self._identity, held.queue, held.msg.reply, self.ttl
            )
        except NatflowError as exc:
            log.warning("run %s: could not write its lease (%s)", held.run_id, exc)
            return False
        held.renewed_at = time.monotonic()
        return True

    async def take_and_look(self, held: Held) -> None:
        """Write the run's lease, then look once for signals stored before it existed."""
        if not await self.take(held):
            return
        # A signal (a pause, a cancel) stored before the lease existed had no holder to
        # nudge; one stored after it gets a nudge. Look once, beside the run's first steps.
        execution = held.execution
        if execution is not None:
            with contextlib.suppress(NatflowError):
                if await last_signal_seq(self._conn, held.run_id) > execution.signal_cursor:
                    execution.signals_arrived()

    async def release(self, held: Held) -> None:
        """Drop the run's lease, unless it is gone or was lost to another worker.

        The run is marked released, and its lease's revision read, under the run's guard: a
        renewal the heartbeat has in flight meanwhile moves the revision on (so this delete,
        conditional on the one read, misses) or writes the lease anew after it (a renewal
        that finds none). Either way the heartbeat then sees the run released and deletes
        what it wrote (``Pulse._beat``), so no lease outlives its run.
        """
        with held.guard:
            held.released = True
            lease, revision = held.lease, held.revision
            held.lease = None
        if lease is not None and not held.lost:
            await quietly(self._leases.release(held.run_id, revision))
