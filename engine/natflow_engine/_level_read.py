"""A run's history read as its subjects, each through the subject index, put in order by the
events' positions: its run-level and step-level subjects by their literal names, and the
start a run that starts now has on a subject of its own (one message, ``last_by_subj``).

Why not one read of ``natflow.history.<run_id>.>``: nats-server answers a read by a wildcard
subject by walking the stream's messages after the run's last one in its block, and every
later block once the stream holds over 64k subjects (``fileStore.LoadNextMsg``: it then
stops skipping blocks for wildcards). On a 350,000-message stream a read of an early run
cost the server ~15 ms that way, 1-3.6 ms as two reads by literal subject, which its
subject index answers.

Two reads are two moments, though: an event appended between them may be missing from the
first while a later one is in the second. Every event's id is ``<run_id>:<position>``
(positions go 1, 2, 3 ... across the run's stretches, each append the one after the history
its writer read), so the reads are put in position order and taken only when the positions
of the current stretch run without a gap: then they are the run's history as it stood at
some moment, exactly what one read returns. Anything else (a gap, an id that is not a
position, an event that does not decode) returns None, and the caller reads the one
wildcard subject as before.
"""

from __future__ import annotations

import asyncio
from itertools import repeat

import msgspec
from nats.aio.msg import Msg

from ._connection import Connection
from ._reader import BatchReader
from ._reader import reader as reader_of
from ._streams import HISTORY_STREAM, run_level_subject, start_subjects, step_level_subject
from ._undecodable import UNDECODABLE
from .events import Event, RunContinued, decode_event, event_kind, unpacked

_START_KINDS = ("run_started", "run_continued")


async def read_by_level(reader: BatchReader, run_id: str) -> tuple[list[Event], int] | None:
    """The run's events in order and the stream sequence of the last, or None when the two
    reads cannot be placed as one history (see the module docstring)."""
    start, runs, steps = await asyncio.gather(
        own_start(reader, run_id),
        reader.read_all(HISTORY_STREAM, run_level_subject(run_id)),
        reader.read_all(HISTORY_STREAM, step_level_subject(run_id)),
    )
    try:
        # Only a run-level event (``run_completed``) carries another inside it. A start on
        # its own subject is the run's first event: before every run-level one.
        run_events = unpacked([decode_event(m.data) for m in [*start, *runs.messages]])
        step_events = [decode_event(m.data) for m in steps.messages]
    except UNDECODABLE:
        return None  # the wildcard read names the bad message
    events = in_position_order(run_id, run_events, step_events)
    if events is None:
        return None
    start_seq = max((int((m.headers or {}).get("Nats-Sequence", "0")) for m in start), default=0)
    return events, max(start_seq, runs.last_seq, steps.last_seq)


async def own_start(reader: BatchReader, run_id: str) -> list[Msg]:
    """The start of a run that started now, on its own subject (headers included): one
    message, or none (a delayed start, a start no consumer took, an older natflow's)."""
    return await reader.read_last_each(HISTORY_STREAM, [start_subjects(run_id)])


async def first_start(conn: Connection, run_id: str) -> Msg | None:
    """The message of the run's current start (headers included), or None if it has none:
    the first run-level event where that is a start (a delayed start, an older natflow's, a
    continuation's after its rollup), else the one on the run's start subject. Both looked up
    at once, each through the subject index."""
    body = msgspec.json.encode({"seq": 1, "next_by_subj": run_level_subject(run_id)})
    first, own = await asyncio.gather(
        conn.request(f"{conn.api}.DIRECT.GET.{HISTORY_STREAM}", body),
        own_start(reader_of(conn), run_id),
    )
    kind = None if "Status" in (first.headers or {}) else event_kind(first.data)
    if kind in _START_KINDS:
        return first
    if own:
        return own[0]
    return first if kind == "" else None  # "": it does not decode, and its reader says so


def in_position_order(
    run_id: str, run_events: list[Event], step_events: list[Event]
) -> list[Event] | None:
    """Both lists (each in stream order) as one, in position order; None if an id is not a
    position of this run or the current stretch's positions have a gap or a repeat."""
    run_at = _positions(run_events, run_id)
    step_at = _positions(step_events, run_id)
    if run_at is None or step_at is None:
        return None
    # From the newest continuation on (older stretches' events are no part of the run), or
    # from the first event, which is position 1. A continuation is a run-level event.
    base = 1
    for at in range(len(run_events) - 1, -1, -1):
        if type(run_events[at]) is RunContinued:
            base = run_at[at]
            break
    positions = run_at + step_at
    events = run_events + step_events
    # Two runs already in order, which the sort merges in one pass.
    order = sorted(range(len(positions)), key=positions.__getitem__)
    first = next((i for i, at in enumerate(order) if positions[at] >= base), len(order))
    kept = order[first:]
    if [positions[at] for at in kept] != list(range(base, base + len(kept))):
        return None  # a gap or a repeat
    return [events[at] for at in kept]


def _positions(events: list[Event], run_id: str) -> list[int] | None:
    """Each event's position, from its id ``<run_id>:<position>``; None if one is not.
    (Built-in maps: this runs once per event of every read.)"""
    prefix = f"{run_id}:"
    cut = len(prefix)
    ids = [e.id for e in events]
    if not all(map(str.startswith, ids, repeat(prefix))):
        return None
    tails = [i[cut:] for i in ids]
    if not all(map(str.isdigit, tails)):
        return None
    return list(map(int, tails))
