"""Python's cycle collector, tuned for a long-lived natflow process (engine, worker).

A busy worker holds hundreds of runs, each a few hundred live objects while it is in
flight. With Python's default young-generation threshold (700 allocations), the collector
walks those live objects again and again: measured at 12-15 % of a worker's CPU and 5 % of
an engine's under a 3,000-run burst, though an ended run's objects form no cycles to collect
(they are freed by reference counting; ``tests/test_run_freed.py`` holds that).

So the processes natflow starts itself (``natflow worker``, ``natflow engine``, ``natflow
dev``) freeze what startup built (modules, classes, the workflows), which no pass need walk
again, and collect the young generation every 10,000 net allocations instead of 700. A
process that embeds a ``Worker`` or ``Client`` keeps whatever its own author set.
"""

from __future__ import annotations

import gc
import logging
from typing import Final

log = logging.getLogger("natflow.collector")

YOUNG_THRESHOLD: Final = 10_000


def tune_collector() -> None:
    """Freeze what exists now and make young-generation passes rarer (once, at startup)."""
    gc.collect()  # what startup left as garbage goes now, not frozen forever
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young < YOUNG_THRESHOLD:  # a higher setting (its author's) is kept
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    log.debug(
        "cycle collector: thresholds %s, %d objects frozen",
        gc.get_threshold(),
        gc.get_freeze_count(),
    )
