"""A cancellation Python 3.11 lost, delivered again.

Python 3.11's ``asyncio.wait_for`` (inside nats-py's requests, subscribes and ``next_msg``)
loses a cancellation that lands as the call it waits on completes: the task is left
"cancelling" (``Task.cancelling()``) with no ``CancelledError`` on its way, and a wait that
follows (a run's result, a feed of events) waits for good. 2 % of ``task.cancel()`` calls
on a task awaiting ``RunHandle.result()`` were lost so. anyio's own cancel scopes deliver
again until the task leaves them; ``task.cancel()``, ``asyncio.timeout`` and TaskGroups do
not, so a wait checks after each such call.
"""

from __future__ import annotations

import asyncio


def check_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to cancel and the request was
    lost on the way (see the module docstring)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
