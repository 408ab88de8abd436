"""A new run's task that arrives before its start can be read.

The start is appended (and acknowledged) before its task is enqueued, but the task and the
start live in different streams: a read served by a replica that has not applied the start
yet (a cluster's direct gets), or a start and task that reach the server another way, can
show a worker the task of a run with no history. The task vouches for the start (it was
written by the starter after the append), so the worker looks again within moments instead
of handing the task back for a second (or dropping it, for a task whose start was too large
to carry inline).
"""

from __future__ import annotations

from typing import Final

import anyio
from natflow_engine import History, HistoryStore, Task

# Seconds between the looks: ~30 ms in all, then the task goes back with a delay.
_PAUSES: Final = (0.002, 0.004, 0.008, 0.016)


def vouches_for_start(task: Task) -> bool:
    """Whether the task was written by the run's starter, after its start was stored."""
    return task.start_seq > 0 or task.reason == "start"


async def read_until_seen(store: HistoryStore, run_id: str, history: History) -> History:
    """``history`` if it shows the run, else the run's history read again, a few times
    within moments, until it does (an empty history if it still does not)."""
    for pause in _PAUSES:
        if history.events or history.corrupt:
            break
        await anyio.sleep(pause)
        history = await store.read(run_id)
    return history
