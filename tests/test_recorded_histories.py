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
from natflow.testing import Replayer, load_history
from natflow_engine import History, value_ref
from natflow_engine._state import fold_run
from natflow_engine._undecodable import UNDECODABLE
from natflow_engine.events import (
    SCHEMA_VERSION,
    Event,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunRestarted,
    decode_event,
    encode_event,
)

from examples.greeting import greet
from examples.order import order
from tests.workflows_recorded import (
    recorded_cancel,
    recorded_children,
    recorded_continue,
    recorded_flow,
    recorded_mix,
    recorded_patch,
    recorded_pause,
    recorded_released,
    recorded_retry,
    recorded_values,
)
from tests.workflows_triggers import fulfil, tick

HISTORIES = Path(__file__).parent / "histories"
# Today's code of every workflow with a recorded history (recorded_patch is its version 2:
# recorded-patch-old was recorded by version 1 and must keep to the old path).
WORKFLOWS: dict[str, Workflow] = {
    w.name: w
    for w in (
        greet,
        order,
        recorded_mix,
        recorded_retry,
        recorded_patch,
        recorded_cancel,
        recorded_children,
        recorded_flow,
        recorded_continue,
        recorded_values,
        recorded_pause,
        recorded_released,
        tick,
        fulfil,
    )
}


VALUES = HISTORIES / "values"  # large values a history refers to, by SHA-256


def load(path: Path) -> History:
    history = load_history(path)
    history.events = [_resolved(e) for e in history.events]
    return history


def _resolved(event: Event) -> Event:
    """``event`` with each ``{"$natflow_ref": ...}`` value read from VALUES, as a worker
    reads it from the natflow_values object store."""
    fields = msgspec.json.decode(encode_event(event))
    for name, value in fields.items():
        ref = value_ref(value)
        if ref is not None:
            fields[name] = msgspec.json.decode((VALUES / f"{ref.digest}.json").read_bytes())
    return decode_event(msgspec.json.encode(fields))


def test_a_recorded_history_holds_large_values_by_reference() -> None:
    raw = load_history(HISTORIES / "recorded-values-1.jsonl")
    refs = [value_ref(v) for e in raw.events for v in msgspec.json.decode(encode_event(e)).values()]
    assert len([r for r in refs if r is not None]) == 2  # the input and the step's result


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_history_replays_to_its_recorded_result(path: Path) -> None:
    history = load(path)
    while isinstance(history.events[-1], RunRestarted):  # appended after the run closed
        link = history.events.pop()
        info = fold_run(path.stem, [*history.events, link])
        assert info is not None and info.restarted_as == link.restarted_as
        assert info.status == "completed"
    final = history.events[-1]
    assert isinstance(final, RunCompleted | RunCancelled)
    history.events = history.events[:-1]  # the outcome must come from the replay alone
    replay = Replayer(WORKFLOWS.values()).replay(history)
    assert replay.ok, replay.divergence
    assert replay.finished
    if isinstance(final, RunCancelled):
        assert replay.cancelled == final.reason
        return
    replayed = msgspec.json.decode(msgspec.json.encode(replay.result))
    assert replayed == msgspec.json.decode(final.result)


def test_a_recorded_continued_stretch_carries_its_untaken_signal() -> None:
    history = load_history(HISTORIES / "recorded-continue-1.jsonl")
    first = history.events[0]
    assert isinstance(first, RunContinued)
    assert first.stretch == 3 and first.base_seq > 0 and first.events_before > 0
    assert [(s.name, msgspec.json.decode(s.payload)) for s in first.signals] == [
        ("extra", "carried")
    ]


def test_every_recorded_workflow_is_known() -> None:
    names = {load(p).events[0].workflow for p in HISTORIES.glob("*.jsonl")}  # type: ignore[union-attr]
    assert names and names <= set(WORKFLOWS)


def test_a_recorded_end_carrying_its_last_step_reads_as_both_events() -> None:
    """Stored as three messages, the last a ``run_completed`` (v 2) carrying the outcome of
    the step the workflow returned after; read back as four events, one per position."""
    path = HISTORIES / "recorded-packed-end.jsonl"
    stored = [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]
    assert [m["type"] for m in stored] == ["run_started", "run_claimed", "run_completed"]
    assert stored[-1]["v"] == 2 and stored[-1]["last_step"]["type"] == "step_completed"
    events = load_history(path).events
    assert [type(e).__name__ for e in events] == [
        "RunStarted",
        "RunClaimed",
        "StepCompleted",
        "RunCompleted",
    ]
    assert [e.id.rpartition(":")[2] for e in events] == ["1", "2", "3", "4"]
    end = events[-1]
    assert isinstance(end, RunCompleted) and end.last_step is None


def test_an_event_of_a_newer_schema_version_is_refused_naming_why() -> None:
    """Decoded, what a newer natflow meant by it would be dropped unseen (a step's result
    became null, and the run replayed as if nothing were missing)."""
    line = (
        b'{"type":"step_completed","v":%d,"id":"r:3","at":"2026-11-28T06:00:00Z","seq":1,'
        b'"name":"charge","occurrence":1,"attempt":1,"started_at":"2026-11-28T06:00:00Z",'
        b'"result_ref":"elsewhere"}'
    )
    assert decode_event(line % SCHEMA_VERSION).v == SCHEMA_VERSION
    with pytest.raises(UNDECODABLE, match="written by a newer natflow"):
        decode_event(line % (SCHEMA_VERSION + 1))
