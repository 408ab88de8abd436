"""Which steps run now, and a watchdog that reports a blocked worker loop by step name.

A step body that blocks the event loop (``time.sleep`` inside an ``async def`` step) stops
everything else on it. Heartbeats do not depend on that loop (see ``_pulse``); this module
says who blocked it: a thread posts a callback to the loop every fraction of a second and,
when the loop has not run it for ``threshold`` seconds, logs the steps running at the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Final

log = logging.getLogger("natflow.worker")

_running: Counter[str] = Counter()
_lock = threading.Lock()
BLOCKED_AFTER: Final = 2.0


@contextlib.contextmanager
def running_step(run_id: str, step: str) -> Iterator[None]:
    """Mark ``step`` of ``run_id`` as running for as long as the block lasts."""
    label = f"{step!r} of run {run_id}"
    with _lock:
        _running[label] += 1
    try:
        yield
    finally:
        with _lock:
            _running[label] -= 1
            if _running[label] <= 0:
                del _running[label]


def running_steps() -> list[str]:
    """The steps running now, as ``'name' of run <id>``."""
    with _lock:
        return sorted(_running)


class LoopWatchdog:
    """Reports (logs, and counts in ``blocked_reports``) an event loop blocked too long."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float = BLOCKED_AFTER) -> None:
        self._loop = loop
        self.threshold = threshold
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.blocked_reports: list[str] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="natflow-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        tick = min(0.25, self.threshold / 4)
        while not self._stop.is_set():
            answered = threading.Event()
            try:
                self._loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop is closed
                return
            posted = time.monotonic()
            reported = False
            while not answered.wait(tick):
                if self._stop.is_set():
                    return
                blocked = time.monotonic() - posted
                if blocked >= self.threshold and not reported:
                    self._report(blocked)
                    reported = True
            self._stop.wait(tick)

    def _report(self, blocked: float) -> None:
        steps = running_steps()
        what = ", ".join(steps) if steps else "no step (workflow or library code)"
        text = (
            f"the worker's event loop has been blocked for {blocked:.1f} s; running: {what}. "
            "A blocking call in an async step stops every run on this worker: make the step a "
            "plain def (it runs in a thread) or await a non-blocking call"
        )
        self.blocked_reports.append(text)
        log.warning("%s", text)
