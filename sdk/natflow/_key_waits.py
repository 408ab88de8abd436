"""Runs this worker handed back for a signal sealed with a key it does not hold.

The run goes back for a worker that holds the key, and comes back here every few seconds
while none takes it (for up to ``KEY_PATIENCE``, after which this worker rejects the signal).
Each time it came back the worker claimed it again before meeting the same signal: one
``run_claimed`` more in the run's history every 2 s, for an hour, for one forged signal.
Remembering the run's last sequence at the hand-back lets the next delivery go back at once,
unclaimed, while nothing new reached the run's history.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Final

from natflow_engine.events import utcnow

_KEPT: Final = 10_000  # runs remembered at most (the oldest are forgotten first)


class KeyWaits:
    """Which runs wait for a worker holding a key, and until when."""

    __slots__ = ("_waits",)

    def __init__(self) -> None:
        self._waits: OrderedDict[str, tuple[int, datetime]] = OrderedDict()

    def note(self, run_id: str, last_seq: int, patience_ends: datetime) -> None:
        """The run was handed back at history sequence ``last_seq``."""
        self._waits[run_id] = (last_seq, patience_ends)
        self._waits.move_to_end(run_id)
        while len(self._waits) > _KEPT:
            self._waits.popitem(last=False)

    def still_waiting(self, run_id: str, last_seq: int) -> bool:
        """Whether the run, read at ``last_seq``, is as this worker handed it back: nothing
        new in its history, and its signal's wait for the key not yet over."""
        wait = self._waits.get(run_id)
        if wait is None:
            return False
        if wait[0] == last_seq and utcnow() < wait[1]:
            return True
        del self._waits[run_id]
        return False
