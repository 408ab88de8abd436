"""The dispatcher reads through two consumers of one filter each, a run's start first.

nats-server finds a multi-filter consumer's next message by intersecting its filters with
every subject of the message block; once such a dispatcher lagged, each message cost the
block's subjects and held the store's lock (16 cores: 8 and 16 workers slower than 4).
"""

from __future__ import annotations

import time
from functools import partial

import anyio
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine._lanes import Lanes
from natflow_engine._puller import engine_consumer
from natflow_engine._server import EmbeddedServer
from natflow_engine._start_order import IDLE_AFTER, WAIT_AT_MOST, StartOrder
from natflow_engine._streams import (
    DISPATCHER,
    DISPATCHERS,
    HISTORY_STREAM,
    RUN_LEVEL_FILTER,
    START_DISPATCHER,
    START_FILTER,
    ensure_streams,
    is_start_subject,
    start_consumer,
)
from natflow_engine.events import Event, RunStarted
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from tests.helpers import dispatcher_caught_up, running_engine, running_worker, wait_for


def _one(value: int) -> int:
    return value


@workflow(name="dispatchers-steps")
async def dispatchers_steps(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step("one", _one, n)


async def test_each_consumer_has_one_filter_and_every_start_is_folded_first(
    client: Client, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [f"dispatchers-{i}" for i in range(30)]
    async with running_engine(nats_server.url) as engine:
        folded: dict[str, list[type[Event]]] = {}
        apply = engine._index.apply

        async def recorded(run_id: str, event: Event, *args: object) -> object:
            folded.setdefault(run_id, []).append(type(event))
            return await apply(run_id, event, *args)

        engine._index.apply = recorded
        jsm = client.connection.jsm
        # The starts' consumer behind the other (as under load): each start handed on late.
        put = Lanes.put

        async def slow_starts(lanes: Lanes, run_id: str, msg: Msg, stored: float) -> None:
            if is_start_subject(msg.subject):
                await anyio.sleep(0.02)
            await put(lanes, run_id, msg, stored)

        monkeypatch.setattr(Lanes, "put", slow_starts)
        async with running_worker(client, [dispatchers_steps]), await _starter(nats_server) as c:
            handles = [await c.start(dispatchers_steps, i, run_id=r) for i, r in enumerate(runs)]
            for handle in handles:
                assert await handle.result(timeout=30) == int(handle.run_id.rsplit("-", 1)[1])
            await wait_for(partial(dispatcher_caught_up, client), what="the engine")
    filters = {}
    for name in DISPATCHERS:
        info = await jsm.consumer_info(HISTORY_STREAM, name)
        assert not info.config.filter_subjects or len(info.config.filter_subjects) == 1
        filters[name] = info.config.filter_subject or info.config.filter_subjects[0]
    assert filters == {DISPATCHER: RUN_LEVEL_FILTER, START_DISPATCHER: START_FILTER}
    # The runs started where their worker takes them: the starts' consumer read them.
    starts = await jsm.consumer_info(HISTORY_STREAM, START_DISPATCHER)
    assert starts.delivered.consumer_seq >= len(runs)
    # Starts come from the starts' consumer, the rest from the other: a start first all
    # the same, so the index never rebuilt a run from history.
    for run_id in runs:
        assert folded[run_id][0] is RunStarted, (run_id, folded[run_id])
    assert all(len(f) >= 3 for f in folded.values())  # start, claim, end


async def test_an_engine_of_one_consumer_of_both_filters_goes_on_where_it_was(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """An engine upgraded from the one consumer: the starts' new consumer begins where the
    old one had acknowledged, so the starts it had folded are not read again."""
    conn = client.connection
    await ensure_streams(conn)
    old = engine_consumer(DISPATCHER, "the engine before", [RUN_LEVEL_FILTER, START_FILTER])
    await conn.jsm.add_consumer(HISTORY_STREAM, config=old)
    async with running_worker(client, [dispatchers_steps]):
        done = [await client.start(dispatchers_steps, i, run_id=f"before-{i}") for i in range(3)]
        for handle in done:
            await handle.result(timeout=30)
        # What the engine before had acknowledged: all of it.
        sub = await conn.js.pull_subscribe_bind(DISPATCHER, HISTORY_STREAM)
        while msgs := await _fetch(sub):
            for msg in msgs:
                await msg.ack()
        await sub.unsubscribe()
        floor = (await conn.jsm.consumer_info(HISTORY_STREAM, DISPATCHER)).ack_floor.stream_seq
        async with running_engine(nats_server.url), await _starter(nats_server) as c:
            after = await c.start(dispatchers_steps, 7, run_id="after-1")
            assert await after.result(timeout=30) == 7
            await wait_for(partial(dispatcher_caught_up, client), what="the engine")
    async with running_engine(nats_server.url):  # restarted: its consumers as they are
        pass
    starts = await conn.jsm.consumer_info(HISTORY_STREAM, START_DISPATCHER)
    assert starts.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
    assert starts.config.opt_start_seq == floor + 1
    assert starts.delivered.consumer_seq == 1  # the new run's start, none from before
    runs = await conn.jsm.consumer_info(HISTORY_STREAM, DISPATCHER)
    assert runs.config.filter_subject == RUN_LEVEL_FILTER and not runs.config.filter_subjects
    assert (await client.describe("after-1")).status == "completed"


async def _starter(nats_server: EmbeddedServer) -> Client:
    """A client that connects once the worker's start consumer exists, so its runs start
    where the worker takes them (a client that looked earlier writes tasks for a while)."""
    probe = await Client.connect(nats_server.url)
    name = start_consumer("default", dispatchers_steps.name)

    async def exists() -> bool:
        try:
            await probe.connection.jsm.consumer_info(HISTORY_STREAM, name)
        except NotFoundError:
            return False
        return True

    try:
        await wait_for(exists, what="the worker's start consumer")
    finally:
        await probe.close()
    return await Client.connect(nats_server.url)


async def _fetch(sub: JetStreamContext.PullSubscription) -> list[Msg]:
    try:
        return await sub.fetch(100, timeout=0.5)
    except Exception:  # nats-py's timeout: nothing left
        return []


async def test_an_event_waits_for_its_runs_start_while_starts_are_read() -> None:
    unread = [0]
    order = StartOrder(lambda: unread[0])
    order.read("a", 10)
    await order.before("a", 50)  # its start was read
    await order.before("b", 5)  # stored before the last start read
    released = anyio.Event()
    unread[0] = 1  # a start delivered and not yet read

    async def claim_of_c() -> None:
        await order.before("c", 20)
        released.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim_of_c)
        await anyio.wait_all_tasks_blocked()
        # Still held three idle intervals on: a start is delivered, not yet read.
        with anyio.move_on_after(IDLE_AFTER * 3):
            await released.wait()
        assert not released.is_set()
        order.read("c", 15)
        with anyio.fail_after(2):
            await released.wait()
    # Starts still coming, none of them before the event: it goes on after WAIT_AT_MOST.
    t0 = time.monotonic()
    with anyio.fail_after(WAIT_AT_MOST + 2):
        await order.before("d", 40)
    assert time.monotonic() - t0 >= WAIT_AT_MOST - 0.05
    # Nothing delivered and nothing read lately: no start is coming, no wait.
    unread[0] = 0
    with anyio.fail_after(IDLE_AFTER * 4):
        await order.before("e", 60)
