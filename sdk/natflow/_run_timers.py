"""A held run's timers: armed on the worker's loop, fired into history when due.

A timer only wakes the driver (a ``TimerDue`` item); the firing is recorded by the driver's
task, so history order stays delivery order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from natflow_engine.events import TimerFired, utcnow

from ._commands import Item, TimerDue, WaitCommand
from ._recorder import RunRecorder
from ._signal_intake import SignalIntake


class RunTimers:
    """The timers armed for one held run."""

    __slots__ = ("_armed", "_notify", "_rec", "_signals")

    def __init__(
        self, rec: RunRecorder, signals: SignalIntake, notify: Callable[[Item], None]
    ) -> None:
        self._rec = rec
        self._signals = signals
        self._notify = notify  # hands a due timer to the driver
        self._armed: dict[int, asyncio.TimerHandle] = {}

    async def fire(self, seq: int) -> None:
        self._armed.pop(seq, None)
        state = self._rec.state
        due = state.timers.get(seq)
        command = state.command(seq)
        if due is None or command is None or state.paused:
            return  # a paused run's timers are armed again when it is resumed
        early = (due - utcnow()).total_seconds()
        if early > 0:  # never before its due time
            self._arm(seq, due)
            return
        if isinstance(command, WaitCommand):
            await self._signals.move()  # a signal that arrived in time beats its timeout
            if command.future.done():
                return
        rec = self._rec
        fired = await rec.append(
            TimerFired(id=rec.next_id(), at=utcnow(), seq=seq, name=command.name)
        )
        assert isinstance(fired, TimerFired)
        state.deliver(fired)

    def arm_all(self) -> None:
        """Arm each pending timer not armed yet."""
        for seq, due in self._rec.state.timers.items():
            if seq not in self._armed:
                self._arm(seq, due)

    def _arm(self, seq: int, due: datetime) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, (due - utcnow()).total_seconds())
        self._armed[seq] = loop.call_later(delay, self._notify, TimerDue(seq))

    def cancel(self) -> None:
        """Disarm every timer for good: the run's execution is over."""
        for handle in self._armed.values():
            handle.cancel()
        self._armed.clear()
        # The driver's callback holds the execution that holds these timers: let go of it,
        # so an ended run is freed at once rather than by the cycle collector.
        self._notify = _ended


def _ended(item: Item) -> None:
    """Where a timer's news goes once its run's execution has ended: nowhere."""
