"""Replay histories recorded by earlier versions (tests/histories/*.jsonl) against today's code.

Each file is one run's events as natflow stored them, one JSON object per line. Replaying
them on every test run checks two promises at once: the event schema still decodes what was
written before (new fields need defaults), and the workflows still make the same decisions
from the same history (no divergence, the same result). Re-record only on purpose, with the
change that makes old histories incompatible.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from natflow import Workflow
from natflow._replay import WorkflowState
from natflow_engine._history import History
from natflow_engine._state import fold_run
from natflow_engine.events import RunCompleted, RunRestarted, decode_event

from examples.greeting import greet
from examples.order import order
from tests.workflows_recorded import recorded_mix, recorded_pause

HISTORIES = Path(__file__).parent / "histories"
WORKFLOWS: dict[str, Workflow] = {w.name: w for w in (greet, order, recorded_mix, recorded_pause)}


def load(path: Path) -> History:
    events = [decode_event(line) for line in path.read_bytes().splitlines() if line.strip()]
    return History(path.stem, events, len(events))


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_history_replays_to_its_recorded_result(path: Path) -> None:
    history = load(path)
    while isinstance(history.events[-1], RunRestarted):  # appended after the run closed
        link = history.events.pop()
        info = fold_run(path.stem, [*history.events, link])
        assert info is not None and info.restarted_as == link.restarted_as
        assert info.status == "completed"
    final = history.events[-1]
    assert isinstance(final, RunCompleted)
    start = history.events[0]
    workflow = WORKFLOWS[start.workflow]  # type: ignore[union-attr]
    history.events = history.events[:-1]  # the result must come from the replay alone
    state = WorkflowState(workflow, history)
    try:
        state._begin()
        assert state.block is None, state.block
        assert state._root is not None and state._root.done()
        replayed = msgspec.json.decode(msgspec.json.encode(state._root.result()))
        assert replayed == msgspec.json.decode(final.result)
    finally:
        state._close_workflow()


def test_every_recorded_workflow_is_known() -> None:
    names = {load(p).events[0].workflow for p in HISTORIES.glob("*.jsonl")}  # type: ignore[union-attr]
    assert names and names <= set(WORKFLOWS)
