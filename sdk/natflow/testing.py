"""Replaying recorded histories against today's workflow code, without a worker.

A deploy changes workflow code under runs that are still open. :class:`Replayer` replays a
run's recorded history (a JSONL file, a list of events, or a run fetched from a server)
through the same replay core the worker uses, and reports the first place where today's code
asks for something other than what history recorded. It runs no step, writes nothing and
needs no worker; ``natflow replay-check`` runs it over a server's stored runs.

Example::

    from natflow.testing import Replayer

    replayer = Replayer([order, greet])
    result = replayer.replay_file("tests/histories/order-42.jsonl")
    assert result.ok, result.divergence   # "at position 3 the workflow code asks for ..."
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from natflow_engine import (
    ErrorInfo,
    History,
    InvalidInput,
    MissingKey,
    NonDeterminismError,
    Runs,
    UnreadableValue,
    error_info,
    open_events,
)
from natflow_engine.events import Event, RunStarted, decode_event, unpacked, utcnow

from ._client import Client
from ._replay import WorkflowState
from ._workflow import Workflow

__all__ = ["ReplayResult", "Replayer", "load_history"]


@dataclass(frozen=True)
class ReplayResult:
    """What replaying one run's history against today's code found.

    ``divergence`` is the first mismatch (its ``position``, ``expected``: what today's code
    asks for, and ``recorded``: what history holds), or None when the code is compatible.
    ``unreadable`` names an event of the stored history that does not decode (written by a
    newer natflow, or by something else): a worker holds such a run as blocked, so it is not
    compatible either. ``finished`` says whether the workflow ended within the recorded
    history; if so,
    ``result`` is what it returned, ``error`` what it raised and ``cancelled`` the reason of
    a cancellation it ended by.
    """

    run_id: str
    workflow: str
    events: int
    divergence: NonDeterminismError | None = None
    finished: bool = False
    result: Any = None
    error: ErrorInfo | None = None
    cancelled: str | None = None
    unreadable: str | None = None

    @property
    def ok(self) -> bool:
        """True when today's code asks for exactly what history recorded."""
        return self.divergence is None and self.unreadable is None


def load_history(path: str | os.PathLike[str]) -> History:
    """A run's history from a file: JSONL, one event per line, as natflow stores them, or
    the JSON array ``natflow runs history RUN_ID --json`` prints."""
    file = Path(path)
    data = file.read_bytes()
    try:
        if data.lstrip().startswith(b"["):
            raw = [msgspec.json.encode(e) for e in msgspec.json.decode(data)]
        else:
            raw = [line for line in data.splitlines() if line.strip()]
        events = unpacked([decode_event(line) for line in raw])
    except Exception as exc:
        raise InvalidInput(
            f"{file} is not a natflow history (one event per line, or the JSON array "
            f"`natflow runs history RUN_ID --json` prints): {exc}"
        ) from exc
    if not events or not isinstance(events[0], RunStarted):
        raise InvalidInput(f"{file} does not start with a run_started event")
    run_id = events[0].id.rpartition(":")[0] or file.stem
    return History(run_id, events, len(events))


class Replayer:
    """Replays recorded histories against the given workflows; see the module docstring."""

    def __init__(self, workflows: Iterable[Workflow]) -> None:
        self._workflows = {w.name: w for w in workflows}
        if not self._workflows:
            raise InvalidInput("Replayer needs at least one workflow to replay against")

    def knows(self, workflow: str) -> bool:
        """Whether a run of this workflow name can be replayed here."""
        return workflow in self._workflows

    def replay(self, history: History | Sequence[Event], run_id: str | None = None) -> ReplayResult:
        """Replay one run's events (oldest first) and report what today's code does with them."""
        if not isinstance(history, History):
            events = list(history)
            history = History(run_id or _run_id(events), events, len(events))
        start = history.events[0] if history.events else None
        if not isinstance(start, RunStarted):
            raise InvalidInput(f"history of run {history.run_id!r} does not start with run_started")
        workflow = self._workflows.get(start.workflow)
        if workflow is None:
            raise InvalidInput(
                f"run {history.run_id!r} is of workflow {start.workflow!r}, which this Replayer "
                f"was not given (it knows {sorted(self._workflows)})"
            )
        state = WorkflowState(workflow, history)
        try:
            state.begin()
            return _result(state, len(history.events))
        finally:
            state.close()

    def replay_file(self, path: str | os.PathLike[str]) -> ReplayResult:
        """Replay a history stored as JSONL (one event per line)."""
        return self.replay(load_history(path))

    async def replay_run(self, client: Client, run_id: str) -> ReplayResult:
        """Fetch a run's history from the server and replay it."""
        history = await Runs(client.connection).opened_history(run_id)
        try:  # strictly now: a value left sealed would reach the code as an envelope
            open_events(client.connection.codec, history.events, run_id)
        except (MissingKey, UnreadableValue) as exc:
            start = history.events[0]
            workflow = start.workflow if isinstance(start, RunStarted) else ""
            return ReplayResult(
                run_id=run_id,
                workflow=workflow,
                events=len(history.events),
                unreadable=f"{exc} (connect with the workers' keys: NATFLOW_CODEC_KEYS)",
            )
        result = self.replay(history)
        if history.corrupt:
            seq, reason = history.corrupt[0]
            unreadable = f"history event at stream sequence {seq} does not decode: {reason}"
            return dataclasses.replace(result, unreadable=unreadable)
        return result

    async def replay_runs(
        self, client: Client, *, since: timedelta | None = None, limit: int = 10_000
    ) -> list[ReplayResult]:
        """Replay every stored run of the known workflows (created within ``since``).

        Runs come from the engine's run index (as ``client.list`` does), newest first.
        """
        cutoff: datetime | None = utcnow() - since if since is not None else None
        results: list[ReplayResult] = []
        for name in sorted(self._workflows):
            for info in await client.list(workflow=name, limit=limit):
                if cutoff is not None and info.created_at < cutoff:
                    continue
                results.append(await self.replay_run(client, info.run_id))
        return results


def _run_id(events: Sequence[Event]) -> str:
    return events[0].id.rpartition(":")[0] if events else ""


def _result(state: WorkflowState, events: int) -> ReplayResult:
    root = state.root
    assert root is not None
    common: dict[str, Any] = {
        "run_id": state.run_id,
        "workflow": state.workflow_name,
        "events": events,
        "divergence": state.block,
    }
    if not root.done():
        return ReplayResult(**common)
    if root.cancelled():
        return ReplayResult(**common, finished=True, cancelled=state.cancelled or "cancelled")
    exc = root.exception()
    if exc is not None:
        return ReplayResult(**common, finished=True, error=error_info(exc))
    return ReplayResult(**common, finished=True, result=root.result())
