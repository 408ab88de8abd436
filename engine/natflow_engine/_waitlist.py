"""The order in which runs waiting for a limit's slot get one (pure; no I/O).

Higher priority first. Within a priority, round-robin over fairness keys (the run's
per-key limit keys), so one customer's 10,000 waiting runs take turns with another's 10
instead of going first. Within a fairness key, first started, first served.
"""

from __future__ import annotations

import heapq
from datetime import datetime

from ._limits import Waiter


class Waitlist:
    """The runs waiting for the slots of one limit and key."""

    def __init__(self) -> None:
        self._waiters: dict[str, Waiter] = {}
        # priority -> fairness key -> heap of (started at, run id); stale items are skipped
        self._heaps: dict[int, dict[str, list[tuple[datetime, str]]]] = {}
        self._last_fair: dict[int, str] = {}  # per priority, the fairness key served last

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._waiters

    def add(self, waiter: Waiter) -> None:
        known = self._waiters.get(waiter.run_id)
        if known is not None and (known.priority, known.fair, known.since) == (
            waiter.priority,
            waiter.fair,
            waiter.since,
        ):
            self._waiters[waiter.run_id] = waiter
            return
        self._waiters[waiter.run_id] = waiter
        by_fair = self._heaps.setdefault(waiter.priority, {})
        heapq.heappush(by_fair.setdefault(waiter.fair, []), (waiter.since, waiter.run_id))

    def discard(self, run_id: str) -> None:
        self._waiters.pop(run_id, None)  # its heap item goes when it reaches the top

    def next(self) -> Waiter | None:
        """The waiter to grant the next free slot to (not removed: see :meth:`served`)."""
        for priority in sorted(self._heaps, reverse=True):
            by_fair = self._heaps[priority]
            keys = sorted(k for k in list(by_fair) if self._top(priority, k) is not None)
            if not keys:
                del self._heaps[priority]
                continue
            last = self._last_fair.get(priority)
            after = [k for k in keys if last is not None and k > last]
            fair = after[0] if after else keys[0]
            top = self._top(priority, fair)
            assert top is not None
            return top
        return None

    def served(self, waiter: Waiter) -> None:
        """``waiter`` got its slot: it leaves the list and its fairness key had its turn."""
        self.discard(waiter.run_id)
        self._last_fair[waiter.priority] = waiter.fair

    def _top(self, priority: int, fair: str) -> Waiter | None:
        by_fair = self._heaps[priority]
        heap = by_fair[fair]
        while heap:
            since, run_id = heap[0]
            waiter = self._waiters.get(run_id)
            if waiter is not None and (waiter.priority, waiter.fair, waiter.since) == (
                priority,
                fair,
                since,
            ):
                return waiter
            heapq.heappop(heap)  # left the list, or re-added with another order
        del by_fair[fair]
        return None
