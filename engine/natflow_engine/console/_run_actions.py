"""The buttons of the run page: which runs offer each and what it does. A new run operation
is one entry in :data:`RUN_ACTIONS`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import msgspec

from .._connection import Connection
from .._restart import restart_run
from .._signals import CANCEL, PAUSE, RESUME, TERMINATE, send
from .._state import StepInfo

_MAX_CHOICES = 500

# What an action does, given the run and its form's fields (``reason``, ``from_step``):
# returns the run to show next (None: the same run).
Perform = Callable[[Connection, str, Mapping[str, str]], Awaitable["str | None"]]


def _control(kind: str) -> Perform:
    """An action carried out by a control signal (as ``natflow cancel`` sends it)."""

    async def perform(conn: Connection, run_id: str, form: Mapping[str, str]) -> str | None:
        reason = form.get("reason", "").strip() or None
        await send(conn, run_id, kind, msgspec.json.encode(reason), None)
        return None

    return perform


async def _restart(conn: Connection, run_id: str, form: Mapping[str, str]) -> str | None:
    # No step chosen: the first failed one (restart_run refuses a run without one).
    return await restart_run(conn, run_id, form.get("from_step", "").strip() or None)


def step_choices(steps: list[StepInfo]) -> list[tuple[str, bool]]:
    """The steps a restart can start from, as ``NAME#N``, with the one to preselect marked:
    the first failed step (what a restart without a step uses), else the first step. At
    most :data:`_MAX_CHOICES` (a select of 10,000 steps helps no one), the marked one kept."""
    failed = next((i for i, s in enumerate(steps) if s.status == "failed"), 0)
    shown = [i for i in range(min(len(steps), _MAX_CHOICES)) if i != failed]
    if steps:
        shown = sorted([*shown[: _MAX_CHOICES - 1], failed])
    return [(f"{steps[i].name}#{steps[i].occurrence}", i == failed) for i in shown]


@dataclass(frozen=True, slots=True)
class RunAction:
    """A button on the run page: which statuses offer it and what it does."""

    name: str
    label: str
    statuses: frozenset[str]
    perform: Perform
    explain: str
    danger: bool = False
    needs_steps: bool = False  # offered only on a run that recorded a step

    def offered(self, status: str, steps: list[StepInfo]) -> bool:
        return status in self.statuses and (bool(steps) or not self.needs_steps)


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
        "A new run from the chosen step, with the code now deployed; earlier steps keep "
        "their recorded results.",
        # A restart starts again from a recorded step: a run that recorded none has nothing
        # to restart from (the button always failed there).
        needs_steps=True,
    ),
]
