"""The buttons of the run page: which run statuses offer each and what it does. A new run
operation is one entry in :data:`RUN_ACTIONS`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from .._connection import Connection
from .._restart import restart_run
from .._signals import CANCEL, PAUSE, RESUME, TERMINATE, send

# What an action does: returns the run to show next (None: the same run).
Perform = Callable[[Connection, str, "str | None"], Awaitable["str | None"]]


def _control(kind: str) -> Perform:
    """An action carried out by a control signal (as ``natflow cancel`` sends it)."""

    async def perform(conn: Connection, run_id: str, reason: str | None) -> str | None:
        await send(conn, run_id, kind, msgspec.json.encode(reason), None)
        return None

    return perform


async def _restart(conn: Connection, run_id: str, reason: str | None) -> str | None:
    return await restart_run(conn, run_id, None)


@dataclass(frozen=True, slots=True)
class RunAction:
    """A button on the run page: which statuses offer it and what it does."""

    name: str
    label: str
    statuses: frozenset[str]
    perform: Perform
    explain: str
    danger: bool = False


_OPEN = frozenset({"pending", "running", "sleeping", "waiting", "blocked", "paused"})
RUN_ACTIONS: list[RunAction] = [
    RunAction(
        "cancel",
        "Cancel run",
        _OPEN,
        _control(CANCEL),
        "Raises cancellation in the workflow; its cleanup runs.",
    ),
    RunAction(
        "terminate",
        "Terminate",
        _OPEN,
        _control(TERMINATE),
        "Stops the run at once; no more code runs.",
        danger=True,
    ),
    RunAction(
        "pause",
        "Pause",
        _OPEN - {"blocked", "paused"},
        _control(PAUSE),
        "Starts no step or timer until resumed; a running step finishes and is recorded.",
    ),
    RunAction("resume", "Resume", frozenset({"paused"}), _control(RESUME), "Carries on."),
    RunAction(
        "restart",
        "Restart",
        frozenset({"completed", "failed", "cancelled", "terminated"}),
        _restart,
        "A new run from the first failed step, with the code now deployed; earlier steps "
        "keep their recorded results.",
    ),
]
