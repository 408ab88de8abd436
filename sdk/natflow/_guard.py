"""Quarantined runs: poisoned, corrupt or parked runs are held as ``blocked`` with the reason.

A run is held (a ``run_blocked`` event whose error type says why) when

* its workers died twice while holding it with no progress in between (``PoisonedRun``): the
  run, most likely one of its steps, kills the process (``os._exit``, a crash in native code,
  the memory it takes); another worker would only die too;
* an event in its history does not decode (``CorruptHistory``): it cannot be replayed;
* its task failed the same way on every one of many deliveries (``ParkedRun``).

A held run's tasks are acknowledged without running any of its code, so nothing loops. It
can still be cancelled or terminated: a ``$cancel`` or ``$terminate`` signal ends it as
terminated.
"""

from __future__ import annotations

import logging
from typing import Final

from natflow_engine import (
    CONTROL,
    AppendConflict,
    Connection,
    ErrorInfo,
    HistoryStore,
    NatflowError,
    NoResponders,
    fields,
    pending_signals,
    ping_subject,
    quarantined,
)
from natflow_engine.events import (
    Event,
    RunBlocked,
    RunClaimed,
    RunTerminated,
    StepStarted,
    utcnow,
)

log = logging.getLogger("natflow.worker")

POISONED: Final = "PoisonedRun"
CORRUPT: Final = "CorruptHistory"
PARKED: Final = "ParkedRun"
HELD_TYPES: Final = (POISONED, CORRUPT, PARKED)
DEATHS_TO_POISON: Final = 2
_NO_PROGRESS: Final = (RunClaimed, StepStarted)  # what a worker writes before it gets anywhere


def held_block(last: Event | None) -> RunBlocked | None:
    """The block that holds the run in quarantine, if ``last`` (its last event) is one."""
    if isinstance(last, RunBlocked) and last.error.type in HELD_TYPES:
        return last
    return None


def unfinished_holders(events: list[Event], me: str) -> tuple[list[str], str | None]:
    """Workers (other than ``me``) that claimed the run since its last progress, oldest
    first, and the step the last of them had been running, if history says."""
    holders: list[str] = []
    step: str | None = None
    for event in reversed(events):
        if not isinstance(event, _NO_PROGRESS):
            break
        if isinstance(event, StepStarted) and step is None:
            step = event.name
        if isinstance(event, RunClaimed) and event.worker != me and event.worker not in holders:
            holders.append(event.worker)
    return holders[::-1], step


async def is_gone(conn: Connection, identity: str) -> bool:
    """Whether a worker's connection is gone (nothing answers its pings)."""
    try:
        await conn.request(ping_subject(identity), b"", timeout=1.0)
    except NoResponders:
        return True
    except NatflowError:  # slow or unreachable: not proof of death
        return False
    return False


class RunGuard:
    """Decides whether a run is held in quarantine, and holds it there."""

    def __init__(self, conn: Connection, store: HistoryStore, identity: str) -> None:
        self._conn = conn
        self._store = store
        self._identity = identity

    async def poisoned(self, run_id: str, events: list[Event]) -> ErrorInfo | None:
        """The reason to hold the run as poisoned, or None."""
        holders, step = unfinished_holders(events, self._identity)
        if len(holders) < DEATHS_TO_POISON:
            return None
        dead = [w for w in holders if await is_gone(self._conn, w)]
        if len(dead) < DEATHS_TO_POISON:
            return None
        doing = f" while running step {step!r}" if step else ""
        return ErrorInfo(
            type=POISONED,
            message=f"the run's workers died {len(dead)} times{doing} with no progress in "
            f"between ({', '.join(dead)}); it is held so that it kills no more workers. Fix "
            "the code that ends the process, then start the run again (cancel this one)",
        )

    async def hold(
        self, run_id: str, error: ErrorInfo, *, last_seq: int, count: int, path: str
    ) -> None:
        """Append the ``run_blocked`` that holds the run (once), count and log it."""
        quarantined(path, f"run {run_id}", error.message, logger=log)
        event = RunBlocked(id=f"{run_id}:{count + 1}", at=utcnow(), position=0, error=error)
        try:
            await self._store.append(run_id, event, last_seq)
        except AppendConflict:
            log.info("run %s changed while being held; it will be looked at again", run_id)

    async def end_if_asked(self, run_id: str, why: str, *, last_seq: int, count: int) -> bool:
        """Terminate a held run that was asked to cancel or terminate; True if it was."""
        asked = [
            m
            for m in await pending_signals(self._conn, run_id, 0)
            if (m.headers or {}).get("Nats-Subject", m.subject).rsplit(".", 1)[-1] in CONTROL
        ]
        if not asked:
            return False
        event = RunTerminated(
            id=f"{run_id}:{count + 1}", at=utcnow(), reason=f"stopped while held: {why}"
        )
        try:
            await self._store.append(run_id, event, last_seq)
        except AppendConflict:
            return False
        log.info("run %s: terminated while held (%s)", run_id, why, extra=fields(run_id))
        return True
