"""Quarantine: what natflow does with input it cannot use, whoever sent it.

A bad history event, task, KV entry or signal never takes a process down and is never retried
in a hot loop. It is set aside where an operator can see it (a dead letter with the reason, or
a ``blocked`` run whose error says why), counted in ``natflow_quarantined_total`` by ``path``,
and logged once per process with its location (later sightings of the same item log at debug).

Paths (the metric's ``path`` label):

* ``task``: a task message that does not decode (terminated, dead-lettered as ``task``);
* ``task_forged``: a task whose inline ``run_started`` disagrees with history (history wins);
* ``history_event``: an event in a run's history that does not decode (run blocked);
* ``dispatcher_event``: the same event as the engine meets it, dispatching or rebuilding a
  run's summary (skipped);
* ``kv_timers`` / ``kv_leases`` / ``kv_workers``: a KV entry that does not decode
  (dead-lettered as ``kv``; a bad timer wakes its run so the worker re-indexes its timers);
* ``kv_schedules``: a stored schedule that does not decode, or whose next fire time cannot
  be computed (left out by the engine and ``list``; ``describe`` names it, ``delete`` removes it);
* ``signal_too_large``: a signal too large to move into history (rejected in history);
* ``run_poisoned``: a run whose workers died twice while holding it (run blocked);
* ``run_parked``: a run whose task failed the same way too often (run blocked);
* ``user_base_exception``: a step or workflow raised ``SystemExit``, ``KeyboardInterrupt``
  or another ``BaseException`` (recorded as the step's or run's failure).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Final

from prometheus_client import Counter

log = logging.getLogger("natflow.quarantine")

QUARANTINED = Counter(
    "natflow_quarantined",
    "Bad input set aside instead of processed (dead letter, blocked run, rejected signal), "
    "by path.",
    ["path"],
)
PATHS: Final = (
    "task",
    "task_forged",
    "history_event",
    "dispatcher_event",
    "kv_timers",
    "kv_leases",
    "kv_workers",
    "kv_schedules",
    "signal_too_large",
    "run_poisoned",
    "run_parked",
    "user_base_exception",
)
for _path in PATHS:  # every path has a series from the start (0 until something comes)
    QUARANTINED.labels(_path)
_SEEN_LIMIT: Final = 10_000
_seen: OrderedDict[tuple[str, str], None] = OrderedDict()


def quarantined(path: str, where: str, reason: str, *, logger: logging.Logger = log) -> bool:
    """Count one quarantined item and log it, once per ``(path, where)`` in this process.

    Returns True the first time (the caller may then do the one-time work, such as writing a
    dead letter), False for a repeat.
    """
    QUARANTINED.labels(path).inc()
    key = (path, where)
    if key in _seen:
        _seen.move_to_end(key)
        logger.debug("quarantined again (%s) %s: %s", path, where, reason)
        return False
    _seen[key] = None
    if len(_seen) > _SEEN_LIMIT:
        _seen.popitem(last=False)
    logger.error("quarantined (%s) %s: %s", path, where, reason)
    return True
