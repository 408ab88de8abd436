"""The engine's dispatcher processes the events of different runs at once, and each run's
events one after the other in stream order (``_lanes``): a run whose processing is slow
holds up no other run, and never sees its own events out of order."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import pytest
from natflow import Client, RunCancelled, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._index import RunIndex
from natflow_engine._lanes import LANES, lane_of
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import dead_letters
from natflow_engine._streams import DISPATCHERS, HISTORY_STREAM
from natflow_engine.events import Event
from natflow_engine.events import RunCancelled as RunCancelledEvent

from tests.helpers import dispatcher_caught_up, running_engine, running_worker, wait_for
from tests.workflows_children import WORKFLOWS as CHILD_WORKFLOWS
from tests.workflows_children import grandparent


def _same(value: int) -> int:
    return value


@workflow(name="lanes-steps")
async def lanes_steps(ctx: WorkflowContext, n: int) -> int:
    a = await ctx.step("one", _same, n)
    b = await ctx.step("two", _same, a + 1)
    return await ctx.step("three", _same, b + 1)


Apply = Callable[..., Awaitable[Any]]


class Folds:
    """Wraps the engine's index fold: ``before(run_id, event)`` runs first, then each event's stream
    sequence is recorded per run, in the order the dispatcher folds them."""

    def __init__(self, engine: Engine, before: Callable[[str, Event], Awaitable[None]]) -> None:
        self.runs: dict[str, list[int]] = defaultdict(list)
        self.entered: set[str] = set()  # runs whose processing began
        self.at_once = 0  # events being processed together (most seen: ``most``)
        self.most = 0
        self._apply: Apply = engine._index.apply
        self._before = before
        engine._index.apply = self._recorded  # type: ignore[method-assign, assignment]

    async def _recorded(self, run_id: str, event: Event, hseq: int, *args: Any) -> Any:
        self.entered.add(run_id)
        self.at_once += 1
        self.most = max(self.most, self.at_once)
        try:
            await self._before(run_id, event)
            self.runs[run_id].append(hseq)
            return await self._apply(run_id, event, hseq, *args)
        finally:
            self.at_once -= 1


async def _completed(client: Client, run_id: str) -> bool:
    info = await RunIndex(client.connection).get(run_id)  # a fresh one: nothing cached
    return info is not None and info.status == "completed"


async def test_a_run_slow_to_process_holds_up_no_other_run(
    client: Client, nats_server: EmbeddedServer
) -> None:
    slow = "lanes-slow"
    # Runs in other lanes than the slow one's (one in the same lane would wait behind it).
    fast = [
        r
        for r in (f"lanes-fast-{i}" for i in range(20))
        if lane_of(r, LANES) != lane_of(slow, LANES)
    ]
    released = anyio.Event()

    async def hold_slow(run_id: str, event: Event) -> None:
        if run_id == slow:
            await released.wait()

    async with running_engine(nats_server.url) as engine:
        folds = Folds(engine, hold_slow)
        folded = folds.runs
        async with running_worker(client, [lanes_steps]):
            await client.start(lanes_steps, 0, run_id=slow)
            await wait_for(lambda: _began(folds, slow), what="the slow run's start folding")
            handles = [await client.start(lanes_steps, i, run_id=r) for i, r in enumerate(fast[:3])]
            for handle in handles:
                assert await handle.result(timeout=20) is not None
            # Serially, every event behind the slow run's start would wait for it.
            for run_id in fast[:3]:
                await wait_for(partial(_completed, client, run_id), what=f"{run_id} indexed")
            assert not await _completed(client, slow)
            released.set()
            await wait_for(lambda: _completed(client, slow), what="the slow run indexed")
            await wait_for(lambda: dispatcher_caught_up(client), what="the dispatcher to catch up")
    for run_id in [slow, *fast[:3]]:
        assert folded[run_id] == sorted(folded[run_id]), (run_id, folded[run_id])
        assert len(folded[run_id]) == len(set(folded[run_id])) >= 3  # start, claim, end
    for name in DISPATCHERS:
        info = await client.connection.jsm.consumer_info(HISTORY_STREAM, name)
        assert info.num_redelivered == 0, name


async def _began(folds: Folds, run_id: str) -> bool:
    return run_id in folds.entered


async def test_each_runs_events_are_folded_in_stream_order_while_runs_overlap(
    client: Client, nats_server: EmbeddedServer
) -> None:
    rng = random.Random(20)

    async def jitter(
        run_id: str, event: Event
    ) -> None:  # processing times that differ from event to event
        await anyio.sleep(rng.uniform(0, 0.01))

    runs = [f"lanes-order-{i}" for i in range(24)]
    async with running_engine(nats_server.url) as engine:
        folds = Folds(engine, jitter)
        folded = folds.runs
        async with running_worker(client, [lanes_steps]):
            handles = [await client.start(lanes_steps, i, run_id=r) for i, r in enumerate(runs)]
            for handle in handles:
                await handle.result(timeout=30)
            for run_id in runs:
                await wait_for(partial(_completed, client, run_id), what=f"{run_id} indexed")
    for run_id in runs:
        assert folded[run_id] == sorted(folded[run_id]), (run_id, folded[run_id])
    # The runs' events were processed together (else this test would show nothing).
    assert folds.most > 1


async def test_a_parent_closing_while_its_child_closes_gets_no_outcome(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """A cancelled parent's end is read before its child's; folded in another lane, slowly.
    The child's end still sees the parent closed (as one event at a time would), so its
    outcome is not sent to a run nobody waits in (no dead letter)."""

    child_ended = anyio.Event()

    async def slow_parent_end(run_id: str, event: Event) -> None:
        if not isinstance(event, RunCancelledEvent):
            return
        if run_id == "gp-2-c1":
            child_ended.set()
        elif run_id == "gp-2":
            with anyio.move_on_after(10):  # the child's end is folded meanwhile, in its lane
                await child_ended.wait()

    assert lane_of("gp-2", LANES) != lane_of("gp-2-c1", LANES)
    async with running_engine(nats_server.url) as engine:
        Folds(engine, slow_parent_end)
        async with running_worker(client, CHILD_WORKFLOWS):
            handle = await client.start(grandparent, run_id="gp-2")

            async def grandchild_sleeps() -> bool:
                info = await RunIndex(client.connection).get("gp-2-c1-c1")
                return info is not None and info.status == "sleeping"

            await wait_for(grandchild_sleeps, what="the grandchild to sleep")
            await client.cancel("gp-2", reason="stop all")
            with pytest.raises(RunCancelled):
                await handle.result(timeout=10)
            for run_id in ("gp-2-c1", "gp-2-c1-c1"):
                await wait_for(partial(_closed, client, run_id), what=f"{run_id} cancelled")
            await wait_for(lambda: dispatcher_caught_up(client), what="the dispatcher to catch up")
    assert not [d for d in await dead_letters(client.connection) if d.name == "$child"]


async def _closed(client: Client, run_id: str) -> bool:
    info = await RunIndex(client.connection).get(run_id)
    return info is not None and info.is_closed
