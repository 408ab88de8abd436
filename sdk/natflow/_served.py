"""What a worker serves: its workflows by name and the queues it pulls.

Checked when the worker is made, so a wrong list of workflows fails there, with the fix named,
and not when the first task arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from natflow_engine import InvalidInput, check_queue

from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


def index_workflows(workflows: Iterable[Workflow]) -> dict[str, Workflow]:
    """The workflows by name; at least one, each a :class:`Workflow`, no name twice."""
    found: dict[str, Workflow] = {}
    for wf in workflows:
        if not isinstance(wf, Workflow):
            raise InvalidInput(f"{wf!r} is not a workflow; decorate it with @workflow")
        if wf.name in found and found[wf.name] is not wf:
            raise InvalidInput(f"two workflows are named {wf.name!r}; names must be unique")
        found[wf.name] = wf
    if not found:
        raise InvalidInput("a worker needs at least one workflow")
    return found


def pick_queues(workflows: dict[str, Workflow], queue: str | None) -> list[str]:
    """The queues to serve: ``queue`` alone, or (``None``) every queue the workflows declare."""
    if queue is None:
        return sorted({wf.queue for wf in workflows.values()})
    check_queue(queue)
    for wf in workflows.values():
        if wf.queue != queue:
            log.warning(
                "workflow %r declares queue %r but this worker serves %r: its runs reach "
                "this worker only when started with queue=%r",
                wf.name,
                wf.queue,
                queue,
                queue,
            )
    return [queue]


def served_pairs(workflows: dict[str, Workflow], queue: str | None) -> list[tuple[str, str]]:
    """What the worker pulls, as (queue, workflow) pairs: each workflow's tasks on the queue
    it serves that workflow (``queue``, or the workflow's own)."""
    return sorted((queue if queue is not None else wf.queue, wf.name) for wf in workflows.values())
