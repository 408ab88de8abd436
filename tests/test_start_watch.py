"""The dispatcher's watch over starts (``_start_watch``): a start is checked for its task only
once its grace has passed on the stream's clock, or on the wall clock once caught up."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from natflow import Client
from natflow_engine._engine import Engine
from natflow_engine._index import RunIndex
from natflow_engine._server import EmbeddedServer
from natflow_engine._start_watch import StartWatch
from natflow_engine._streams import (
    DISPATCHER,
    HISTORY_STREAM,
    TASK_PREFIX,
    TASK_STREAM,
    ensure_streams,
    history_subject,
    task_subject,
)
from natflow_engine._tasks import queued
from natflow_engine.events import RunClaimed, RunStarted, decode_event, utcnow
from nats.aio.msg import Msg

from tests.helpers import add_older_stream, wait_for


def _start(run_id: str) -> RunStarted:
    return RunStarted(
        id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )


class _Msg:  # stands in for the delivered message: the watch only hands it back
    def __init__(self, name: str) -> None:
        self.name = name


def _watch(grace: float = 2.0, limit: int = 100) -> tuple[StartWatch, dict[str, Any]]:
    watch = StartWatch(grace=grace, limit=limit)
    msgs = {r: _Msg(r) for r in ("a", "b", "c")}
    return watch, msgs


def test_a_run_that_moves_on_is_never_checked() -> None:
    watch, msgs = _watch()
    watch.add("a", _start("a"), msgs["a"], stored=1000.0)  # type: ignore[arg-type]
    assert watch.moved_on("a") is msgs["a"]  # its claim: the start message is acked
    assert watch.due(reached=9999.0, caught_up=True, now=1e12) == []
    assert watch.started_now("a")
    assert not watch.started_now("b")


def test_a_lagging_dispatcher_does_not_check_starts_it_has_not_read_past() -> None:
    watch, msgs = _watch()
    watch.add("a", _start("a"), msgs["a"], stored=1000.0)  # type: ignore[arg-type]
    # Long after on the wall clock, but the dispatcher has read only 1 s further and more
    # waits: the run's claim may be just ahead of it.
    assert watch.due(reached=1001.0, caught_up=False, now=1e12) == []
    due = watch.due(reached=1002.5, caught_up=False, now=0.0)  # past its grace, stream clock
    assert [w.run_id for w in due] == ["a"] and due[0].msg is msgs["a"]
    assert len(watch) == 0


def test_a_lone_start_on_an_idle_system_is_checked_on_the_wall_clock() -> None:
    watch, msgs = _watch(grace=0.0)
    watch.add("a", _start("a"), msgs["a"], stored=1000.0)  # type: ignore[arg-type]
    assert watch.due(reached=0.0, caught_up=False) == []  # more to read: wait for it
    assert [w.run_id for w in watch.due(reached=0.0, caught_up=True)] == ["a"]


def test_beyond_the_limit_the_oldest_is_checked_at_once() -> None:
    watch, msgs = _watch(limit=2)
    for r in ("a", "b", "c"):
        watch.add(r, _start(r), msgs[r], stored=1000.0)  # type: ignore[arg-type]
    assert [w.run_id for w in watch.due(reached=0.0, caught_up=False)] == ["a"]
    assert len(watch) == 2
    assert sorted(m.name for m in watch.drop()) == ["b", "c"]  # type: ignore[attr-defined]


def test_a_redelivered_start_hands_back_the_earlier_delivery() -> None:
    watch, msgs = _watch()
    watch.add("a", _start("a"), msgs["a"], stored=1000.0)  # type: ignore[arg-type]
    again = _Msg("a2")
    assert watch.add("a", _start("a"), again, stored=1000.0) is msgs["a"]  # type: ignore[arg-type]
    assert watch.moved_on("a") is again


async def test_a_start_that_comes_back_after_its_run_moved_on_is_not_held(
    client: Client,
) -> None:
    """A start NAKed by an engine that stopped (or past its ack deadline) comes back after
    its claim was folded: the index shows the run moved on, so it is acknowledged at once,
    not held for a grace (and then checked) while nothing more of the run will come."""
    conn = client.connection
    await ensure_streams(conn)
    await client.start("nobody-serves-this", 1, run_id="back-1")
    sub = await conn.js.pull_subscribe(
        history_subject("back-1"), "test-back", stream=HISTORY_STREAM
    )
    (msg,) = await sub.fetch(1, timeout=5)
    start = decode_event(msg.data)
    hseq = msg.metadata.sequence.stream
    folded = RunIndex(conn)  # the engine that stopped had folded the start and the claim
    await folded.apply("back-1", start, hseq)
    claim = RunClaimed(id="back-1:2", at=utcnow(), worker="w1", delivery=1)
    await folded.apply("back-1", claim, hseq + 1)
    engine = Engine(conn)
    await engine._dispatch("back-1", msg)
    assert len(engine._watched) == 0
    # A first delivery, before anything else of its run, is held as before.
    await client.start("nobody-serves-this", 2, run_id="fresh-1")
    sub = await conn.js.pull_subscribe(
        history_subject("fresh-1"), "test-fresh", stream=HISTORY_STREAM
    )
    (msg,) = await sub.fetch(1, timeout=5)
    await engine._dispatch("fresh-1", msg)
    assert len(engine._watched) == 1


async def test_starts_whose_tasks_wait_in_the_queue_are_looked_up_together(
    client: Client,
) -> None:
    """Under a backlog (here: no worker at all) starts outlive their grace with their tasks
    still queued. One lookup shows those tasks: the engine tries no enqueue for them, and
    still enqueues the task of a start whose client died before it could."""
    conn = client.connection
    await ensure_streams(conn)
    tried: list[str] = []  # every publish to a task subject, refused ones included

    async def tap(msg: Msg) -> None:
        tried.append(msg.subject)

    await conn.nc.subscribe(f"{TASK_PREFIX}.>", cb=tap)
    queued = [f"queued-{i}" for i in range(40)]
    for i, run_id in enumerate(queued):
        await client.start("nobody-serves-this", i, run_id=run_id)
    await client._runs.history.append("orphan-2", _orphan("orphan-2"), 0)
    engine = Engine(conn)
    engine._watched = StartWatch(grace=0.2)

    async def all_acknowledged() -> bool:
        info = await conn.jsm.consumer_info(HISTORY_STREAM, DISPATCHER)
        return info.delivered.consumer_seq >= 41 and info.num_ack_pending == 0

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        with anyio.fail_after(10):
            await engine.ready.wait()  # its consumer exists
        await wait_for(all_acknowledged, what="every start acknowledged", interval=0.1)
        tg.cancel_scope.cancel()
    await conn.nc.flush()
    expected = [task_subject("default", "nobody-serves-this", r) for r in [*queued, "orphan-2"]]
    assert sorted(tried) == sorted(expected)  # one each: the clients', and the orphan's


def _orphan(run_id: str) -> RunStarted:
    """The start of a client that died before enqueueing its task."""
    return RunStarted(
        id=f"{run_id}:1",
        at=utcnow(),
        workflow="nobody-serves-this",
        queue="default",
        input=msgspec.Raw(b"null"),
    )


async def test_an_older_task_stream_is_updated_for_the_lookup(nats_server: EmbeddedServer) -> None:
    """A store from before the lookup has no direct gets on its task stream: ensure_streams
    turns them on in place, and the queued task it held is found."""
    client = await Client.connect(nats_server.url)
    try:
        conn = client.connection
        await add_older_stream(client, TASK_STREAM, allow_direct=False)
        await conn.js.publish(task_subject("default", "w", "kept-1"), b"{}")
        await ensure_streams(conn)
        info = await conn.jsm.stream_info(TASK_STREAM)
        assert info.config.allow_direct is True
        tasks = [("default", "w", "kept-1"), ("default", "w", "none-1"), ("other", "w", "kept-1")]
        assert await queued(conn, tasks) == {"kept-1"}
    finally:
        await client.close()
