"""Append message ids (``Nats-Msg-Id``): unique to each append, across processes too, so a
second writer of the same event is fenced, never taken for a retry of the first."""

from __future__ import annotations

import os

import msgspec
import pytest
from natflow import Client
from natflow_engine._history import AppendConflict, HistoryStore, _nonces
from natflow_engine._streams import ensure_streams
from natflow_engine.events import RunClaimed, RunStarted, utcnow


def test_nonces_differ_within_a_process_and_in_a_forked_child() -> None:
    mine = {_nonces.next() for _ in range(1000)}
    assert len(mine) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: same counter state, but a prefix of its own
        os.write(write, _nonces.next().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child and child not in mine and child[:16] != next(iter(mine))[:16]


async def test_two_writers_of_one_event_are_fenced_not_deduplicated(client: Client) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    start = RunStarted(
        id="ids-1:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    first = await store.append("ids-1", start, 0)
    claim = RunClaimed(id="ids-1:2", at=utcnow(), worker="a", delivery=1)
    assert await store.append("ids-1", claim, first) == first + 1
    other = RunClaimed(id="ids-1:2", at=utcnow(), worker="b", delivery=1)
    with pytest.raises(AppendConflict):
        await store.append("ids-1", other, first)
