"""Batch reads (``_reader``): a history is read in one request per subject when one batch
holds it, and in full when the server cuts a batch short."""

from __future__ import annotations

import msgspec
import pytest
from natflow import Client
from natflow_engine import _reader
from natflow_engine._history import HistoryStore
from natflow_engine._streams import ensure_streams
from natflow_engine.events import RunStarted, StepCompleted, utcnow

from tests.helpers import read_requests


async def _write(store: HistoryStore, run_id: str, steps: int) -> None:
    start = RunStarted(
        id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    seq = await store.append(run_id, start, 0)
    for n in range(steps):
        step = StepCompleted(
            id=f"{run_id}:{n + 2}",
            at=utcnow(),
            seq=n + 1,
            name="s",
            occurrence=n + 1,
            attempt=1,
            started_at=utcnow(),
            result=msgspec.Raw(b"1"),
        )
        seq = await store.append(run_id, step, seq)


async def test_a_history_one_batch_holds_is_read_in_one_request_per_subject(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    await _write(store, "one-batch", 5)
    sent = read_requests(monkeypatch)
    history = await store.read("one-batch")
    assert len(history.events) == 6
    # one request per subject (start, run-level, step-level), none to find nothing more
    assert len(sent) == 3, sent


async def test_a_batch_cut_short_is_followed_to_the_end(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    await _write(store, "cut-short", 9)
    monkeypatch.setattr(_reader, "BATCH", 4)  # the server cuts each batch at 4 messages
    sent = read_requests(monkeypatch)
    history = await store.read("cut-short")
    assert [e.id for e in history.events] == [f"cut-short:{n}" for n in range(1, 11)]
    assert len(sent) == 5, sent  # its start's own subject; the run-level; 9 steps in 4 + 4 + 1
    last = await store.last("cut-short")
    assert last is not None and history.last_seq == last[1]


async def test_a_batch_cut_by_its_bytes_is_followed_to_the_end(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request asks for at most ``MAX_BYTES``: a history bigger than that is read in
    several requests, none of which could swamp the shared reply subscription."""
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    await _write(store, "by-bytes", 9)
    monkeypatch.setattr(_reader, "MAX_BYTES", 700)  # about three step events a request
    sent = read_requests(monkeypatch)
    history = await store.read("by-bytes")
    assert [e.id for e in history.events] == [f"by-bytes:{n}" for n in range(1, 11)]
    steps = [r for r in sent if r.get("next_by_subj", "").endswith(".step")]
    assert len(steps) >= 3, sent
    assert all(r["max_bytes"] == 700 for r in sent if "next_by_subj" in r)
