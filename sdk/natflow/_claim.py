"""Taking a run: whether a claim is worth writing, and writing it.

A claim is a ``run_claimed`` event appended, fenced, to the run's history: of two workers
that read the same history, one claim lands and the other meets the newer history and steps
back. A claim written without reading history first (``optimistic``) that meets a newer one
is no verdict: the run is read and the claim tried again.
"""

from __future__ import annotations

import logging

import anyio
from natflow_engine import FENCED, TAKEOVERS, last_signal_seq, one_error
from natflow_engine.events import RunClaimed, utcnow

from ._outcome import HOLD_TIMERS_UNDER
from ._recorder import Fenced, RunRecorder

log = logging.getLogger("natflow.worker")


class RunClaimer:
    """Claims one run for this worker.

    Attributes:
        optimistic: History was not read before the claim: a claim conflict is no verdict.
    """

    __slots__ = ("_delivery", "_identity", "_rec", "optimistic")

    def __init__(self, rec: RunRecorder, *, identity: str, delivery: int, optimistic: bool) -> None:
        self._rec = rec
        self._identity = identity
        self._delivery = delivery
        self.optimistic = optimistic

    async def has_work(self) -> bool | None:
        """Whether taking the run now would change anything (None: no claim is written).

        True means signals wait to be moved in; False that this is not known yet.
        """
        state = self._rec.state
        if state.has_commands:
            return False
        due = state.next_due
        if due is not None and (due - utcnow()).total_seconds() <= HOLD_TIMERS_UNDER:
            return False
        # A signal for a wait, or a cancellation for any waiting run.
        return True if await self._signals_waiting() else None

    async def claim_and_look(self) -> tuple[bool, bool]:
        """Claim the run and look for waiting signals at once (one round trip of time)."""
        found: list[bool] = []

        async def look() -> None:
            found.append(await self._signals_waiting())

        with one_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(look)
                claimed = await self.claim()
        return claimed, found[0]

    async def _signals_waiting(self) -> bool:
        """Whether signals (or a cancel) for this run wait outside its history."""
        rec = self._rec
        return await last_signal_seq(rec.conn, rec.run_id) > rec.state.signal_cursor

    async def claim(self) -> bool:
        rec = self._rec
        try:
            await rec.append(
                RunClaimed(
                    id=rec.next_id(),
                    at=utcnow(),
                    worker=self._identity,
                    delivery=self._delivery,
                )
            )
        except Fenced:
            if self.optimistic:
                return False
            FENCED.labels(rec.workflow_name, "claim").inc()
            log.info(
                "run %s: claimed by another worker first; stepping back",
                rec.run_id,
                extra=rec.fields(),
            )
            return False
        state = rec.state
        if self._delivery > 1 and state.last_holder not in (None, self._identity):
            TAKEOVERS.labels(state.start.queue, "redelivered").inc()
            log.info(
                "run %s: taken over from worker %s (delivery %d)",
                rec.run_id,
                state.last_holder,
                self._delivery,
                extra=rec.fields(),
            )
        return True
