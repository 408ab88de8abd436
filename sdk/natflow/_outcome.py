"""How one execution of a run ends, and how long a waiting run stays held.

A run that can only wait (for a timer further off than :data:`HOLD_TIMERS_UNDER`, or for a
signal) ends its execution ``SUSPENDED``: the worker lets it go, and a sleeping run holds no
worker and no memory.
"""

from __future__ import annotations

import enum

# A timer due sooner than this is waited for while holding the run; a later one lets it go.
HOLD_TIMERS_UNDER = 1.0
HOLD_FOR_CHILDREN = 1.0  # seconds a run waiting only for child runs stays held


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"  # waits for a timer or a signal; the worker lets it go
    LOST = "lost"  # another worker holds the run now; this one steps back
    STALE = "stale"  # a claim without reading history met a newer one: read it and retry
    HANDED_BACK = "handed_back"  # the worker is draining; running steps were recorded
    CANCELLED = "cancelled"  # cancelled (after its cleanup) or terminated
    CONTINUED = "continued"  # continued as new: a fresh stretch of history waits to run
