"""A run a worker holds: the record of one task in hand, from its delivery to its end.

The worker keeps one :class:`Held` per run it holds, keyed by run id. The heartbeat reads it
(see ``_pulse``: the task message to mark in progress, the lease to renew), the run's handling
writes it (its execution, its lease, whether it was lost or handed back).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from natflow_engine import TASK_LAG, Lease, fields, labelled
from natflow_engine.events import utcnow
from nats.aio.msg import Msg

from ._admission import Admission
from ._execution import RunExecution

log = logging.getLogger("natflow.worker")


@dataclass(eq=False)
class Held:
    """A run this worker holds: its task message, lease and the scope that runs it."""

    msg: Msg
    run_id: str
    queue: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    execution: RunExecution | None = None
    lease: Lease | None = None
    revision: int = 0
    renewed_at: float = field(default_factory=time.monotonic)
    lost: bool = False
    released: bool = False  # its task was handed back: another worker may take the run
    # Held while the lease and its revision are read or written together: the heartbeat
    # renews on a thread of its own (see RunLeases.release and Pulse._beat).
    guard: threading.Lock = field(default_factory=threading.Lock)
    # asyncio's own (anyio's asks which event loop runs, each time: ~2 us a run)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    admission: Admission | None = None  # the concurrency slots it holds (see _admission)
    nudged: bool = False  # told of new signals before its execution existed

    @property
    def execution_fields(self) -> dict[str, Any]:
        """Log fields: the run id, and its workflow once known."""
        workflow = self.execution.workflow.name if self.execution is not None else None
        return fields(self.run_id, workflow)


def same_task(a: Msg, b: Msg) -> bool:
    """Two deliveries of one task message (same stream and sequence), not two tasks (a
    task and a new run's start, read from history, may share a sequence number)."""
    try:
        first, second = a.metadata, b.metadata
        return first.stream == second.stream and first.sequence.stream == second.sequence.stream
    except Exception:  # not a JetStream delivery: treat as different
        return False


def observe_lag(held: Held) -> None:
    """Schedule-to-start: from the task's enqueueing to now (first deliveries only)."""
    meta = held.msg.metadata
    if meta.num_delivered == 1:
        lag = (utcnow() - meta.timestamp).total_seconds()
        labelled(TASK_LAG, held.queue).observe(max(0.0, lag))
