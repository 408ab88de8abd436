"""Concurrency limits: slots counted across workers, granted in order, shown in the run view.

The step bodies of ``tests/workflows_limits.py`` record each execution interval in a file,
outside the worker, so overlap is checked on what really ran.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from natflow import (
    Client,
    InvalidInput,
    Limit,
    RunCancelled,
    RunHandle,
    RunNotFound,
    WorkflowContext,
    workflow,
)
from natflow_engine import LimitGroup, park, read_limit_slots
from natflow_engine._engine import Engine
from natflow_engine._limit_service import LimitService
from natflow_engine._limits import Slot, Waiter, encode_entry
from natflow_engine._server import EmbeddedServer
from natflow_engine._waitlist import Waitlist
from natflow_engine.events import RunClaimed, utcnow

from tests import workflows_limits as wl
from tests.helpers import running_engine, running_worker, wait_for
from tests.test_flow_everywhere import declared_by_worker


@pytest.fixture
def limits_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    log, gates = tmp_path / "intervals.log", tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(wl.LOG_ENV, str(log))
    monkeypatch.setenv(wl.GATE_ENV, str(gates))
    return log, gates


def intervals(log: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Execution intervals per group, as the step bodies recorded them."""
    found: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    if log.exists():
        for line in log.read_text().splitlines():
            group, start, end, run_id, _pid = line.split()
            found[group].append((float(start), float(end), run_id))
    return found


def most_at_once(spans: list[tuple[float, float, str]]) -> int:
    """The largest number of intervals that overlap at one instant."""
    edges = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    now = peak = 0
    for _, step in edges:  # at a tie an end sorts first: touching intervals do not overlap
        now += step
        peak = max(peak, now)
    return peak


# -- declarations ---------------------------------------------------------------------------


def test_a_limit_is_checked_where_it_is_declared() -> None:
    with pytest.raises(InvalidInput, match="max"):
        Limit(max=0)
    with pytest.raises(InvalidInput, match="scope"):
        Limit(max=1, scope="cluster")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="twice"):

        @workflow(concurrency=[Limit(max=1, key="a"), Limit(max=2, key="a")])
        async def twice(ctx: object, input: dict[str, str]) -> None: ...

    with pytest.raises(InvalidInput, match="priority"):

        @workflow(priority="high")  # type: ignore[arg-type]
        async def wrong(ctx: object) -> None: ...


def test_keyed_limits_come_first_so_a_waiting_run_holds_only_its_own_keys_slot() -> None:
    order = [b.key_name for b in wl.total_and_key.limits]
    assert order == ["key", None]


def test_long_keys_that_share_their_head_are_distinct_keys() -> None:
    """Keys were cut to 256 characters: two URLs with one long head shared their slots."""
    (bound,) = [b for b in wl.per_key.limits if b.key_name == "key"]
    head = "https://example.com/" + "a" * 300
    one, two = bound.key_value({"key": head + "/tenant-1"}), bound.key_value({"key": head + "/2"})
    assert one != two and len(one) == len(two) == 256
    assert bound.key_value({"key": "acme"}) == "acme"  # a short key is itself, as before


async def test_a_start_without_the_limit_key_fails_before_anything_is_written(
    client: Client,
) -> None:
    with pytest.raises(InvalidInput, match="'key'"):
        await client.start(wl.per_key, {"other": 1}, run_id="no-key")
    with pytest.raises(InvalidInput, match="priority"):
        await client.start(wl.per_key, {"key": "a"}, priority=1.5)  # type: ignore[arg-type]


async def test_a_start_by_name_without_the_limit_key_fails_as_one_with_the_definition(
    client: Client, engine: Engine
) -> None:
    """By name (client, CLI, console, a schedule or an event) it started, and its worker
    counted it under the key '' with every other such run."""
    async with running_worker(client, [wl.per_key]):
        await declared_by_worker(client, "per_key")
        with pytest.raises(InvalidInput, match="no field 'key'"):
            await client.start("per_key", {"other": 1}, run_id="no-key-by-name")
    with pytest.raises(RunNotFound):
        await client.describe("no-key-by-name")


def test_waitlist_grants_priority_first_then_round_robin_over_keys_then_oldest() -> None:
    start = utcnow()
    waitlist = Waitlist()

    def add(run_id: str, fair: str, seconds: int, priority: int = 0) -> None:
        waitlist.add(
            Waiter(
                run_id=run_id,
                workflow="w",
                queue="q",
                limit="l",
                label="l",
                max=1,
                priority=priority,
                since=start + timedelta(seconds=seconds),
                fair=fair,
                at=start,
            )
        )

    for i in range(5):
        add(f"a{i}", "acme", i)  # acme's five runs were started first
    add("b0", "bolt", 10)
    add("b1", "bolt", 11)
    add("urgent", "bolt", 20, priority=5)
    order = []
    while (waiter := waitlist.next()) is not None:
        waitlist.served(waiter)
        order.append(waiter.run_id)
    assert order == ["urgent", "a0", "b0", "a1", "b1", "a2", "a3", "a4"]


# -- in one process -------------------------------------------------------------------------


async def test_a_run_waiting_for_a_slot_says_so_and_runs_once_one_is_free(
    client: Client, engine: Engine, nats_server: EmbeddedServer, limits_env: tuple[Path, Path]
) -> None:
    log, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        first = await client.start(wl.one_at_a_time, "x", run_id="first")
        await wait_for(lambda: _slots_held(client, "workflow:one_at_a_time", 1), what="a slot")
        second = await client.start(wl.one_at_a_time, "y", run_id="second")

        async def explained() -> str | None:
            current = (await second.status()).current
            return current if current and "slot" in current else None

        current = await wait_for(explained, what="the run view to name the limit")
        assert current == "waiting for a slot of limit workflow=one_at_a_time 1/1"
        assert (await second.status()).status == "pending"
        # Nobody has claimed it: a run waiting for a slot is not being worked on.
        assert not [e for e in await client.history("second") if isinstance(e, RunClaimed)]
        shown = await anyio.run_process(
            [sys.executable, "-m", "natflow_engine", "runs", "show", "second"],
            env={**os.environ, "NATFLOW_URL": nats_server.url},
        )
        assert "pending: waiting for a slot of limit workflow=one_at_a_time 1/1" in (
            shown.stdout.decode()
        )
        # The lists say so too (the index folds events only: it knew nothing of the line).
        (listed,) = [run for run in await client.list() if run.run_id == "second"]
        assert (listed.status, listed.current) == ("pending", current)
        listing = await anyio.run_process(
            [sys.executable, "-m", "natflow_engine", "runs", "list", "--json"],
            env={**os.environ, "NATFLOW_URL": nats_server.url},
        )
        (row,) = [run for run in json.loads(listing.stdout) if run["run_id"] == "second"]
        assert (row["status"], row["current"]) == ("pending", current)
        (gates / "first").touch()
        assert await first.result(timeout=10) == "one"
        (gates / "second").touch()
        assert await second.result(timeout=10) == "one"
    spans = intervals(log)["one"]
    assert [run for _, _, run in spans] == ["first", "second"]
    assert spans[0][1] <= spans[1][0]


async def test_priority_a_high_run_started_after_twenty_low_ones_runs_next(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    log, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        first = await client.start(wl.one_at_a_time, "x", run_id="holder")
        await wait_for(lambda: _slots_held(client, "workflow:one_at_a_time", 1), what="a slot")
        low = [await client.start(wl.one_at_a_time, "x", run_id=f"low-{i}") for i in range(20)]
        high = await client.start(wl.one_at_a_time, "x", run_id="high", priority=10)
        await wait_for(
            lambda: _all_waiting(client, ["high", *(h.run_id for h in low)]),
            what="every run on the wait list",
        )
        (gates / "all").touch()
        await first.result(timeout=10)
        await high.result(timeout=10)
        for handle in low:
            await handle.result(timeout=20)
    order = [run for _, _, run in sorted(intervals(log)["one"])]
    assert order[:2] == ["holder", "high"], order
    assert order[2:] == [f"low-{i}" for i in range(20)]  # first started, first served


async def test_a_shared_slot_goes_round_robin_over_keys_not_to_the_busiest_first(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    log, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        handles = [await client.start(wl.fair_total, {"key": "acme"}, run_id="acme-0")]
        await wait_for(lambda: _slots_held(client, "workflow:fair_total", 1), what="a slot")
        handles += [
            await client.start(wl.fair_total, {"key": "acme"}, run_id=f"acme-{i}")
            for i in range(1, 8)
        ]
        handles += [
            await client.start(wl.fair_total, {"key": "bolt"}, run_id=f"bolt-{i}") for i in range(2)
        ]
        await wait_for(
            lambda: _all_waiting(client, [h.run_id for h in handles[1:]]),
            what="every run on the wait list",
        )
        (gates / "all").touch()
        for handle in handles:
            await handle.result(timeout=20)
    order = [run for _, _, run in sorted(intervals(log)["fair"])]
    # acme's 8 runs were started first; bolt's 2 take turns with them instead of waiting.
    assert order[:5] == ["acme-0", "acme-1", "bolt-0", "acme-2", "bolt-1"], order
    assert most_at_once(intervals(log)["fair"]) == 1


async def test_a_sleeping_run_holds_no_slot(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    log, _ = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        napping = await client.start(wl.sleeper, "a", run_id="napping")
        await wait_for(lambda: _said(log, "napping"), what="the first step")
        other = await client.start(wl.sleeper, "b", run_id="other")
        assert await napping.result(timeout=15) == "sleeper"
        assert await other.result(timeout=15) == "sleeper"
    spans = sorted(intervals(log)["sleeper"])
    # The other run took the slot while the first one slept (2 s), not after it ended.
    assert [run for _, _, run in spans][:2] == ["napping", "other"]


async def test_a_limit_that_holds_while_waiting_keeps_the_slot_through_a_sleep(
    client: Client, engine: Engine, limits_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long the sleep: the engine took a kept slot back as a granted one no worker
    took up, at a minute (here a fraction of the sleep), and the next run went in."""
    from natflow_engine import _limit_service

    monkeypatch.setattr(_limit_service, "GRANT_PICKUP", 0.2)
    monkeypatch.setattr(_limit_service, "GRANT_TAKEBACK", 0.5)
    log, _ = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        napping = await client.start(wl.keeper, "a", run_id="napping")
        await wait_for(lambda: _said(log, "napping"), what="the first step")
        other = await client.start(wl.keeper, "b", run_id="other")
        assert await napping.result(timeout=15) == "keeper"
        assert await other.result(timeout=15) == "keeper"
    spans = sorted(intervals(log)["keeper"])
    assert [run for _, _, run in spans] == ["napping", "napping", "other", "other"]


def test_a_named_limit_is_one_limit_whichever_workflow_declares_it() -> None:
    shared = Limit(max=2, name="payments-api")

    @workflow(concurrency=shared)
    async def charge(ctx: object) -> None: ...

    @workflow(concurrency=[shared, Limit(max=1, key="account")])
    async def refund(ctx: object, input: dict[str, str]) -> None: ...

    named = [b for b in refund.limits if b.key_name is None]
    assert charge.limits[0].limit_id("q1") == named[0].limit_id("q2") == "name:payments-api"


async def test_a_queue_limit_is_shared_by_the_workflows_of_the_queue(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    log, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        one = await client.start(wl.queue_one, "x", run_id="one")
        await wait_for(lambda: _slots_held(client, "queue:shared", 1), what="the queue's slot")
        two = await client.start(wl.queue_two, "y", run_id="two")
        await wait_for(lambda: _all_waiting(client, ["two"]), what="the other workflow to wait")
        assert (await two.status()).current == "waiting for a slot of limit queue=shared 1/1"
        (gates / "all").touch()
        assert await one.result(timeout=10) == await two.result(timeout=10) == "queue"
    spans = sorted(intervals(log)["queue"])
    assert [run for _, _, run in spans] == ["one", "two"]
    assert spans[0][1] <= spans[1][0]


async def test_a_total_and_a_per_key_limit_hold_together(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    log, _ = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        handles = [
            await client.start(wl.total_and_key, {"key": key, "seconds": 0.1})
            for key in ["a"] * 6 + ["b"] * 3 + ["c"] * 3
        ]
        for handle in handles:
            await handle.result(timeout=30)
    spans = intervals(log)
    assert all(most_at_once(spans[key]) <= 2 for key in "abc")
    assert 2 <= most_at_once([s for key in "abc" for s in spans[key]]) <= 3
    assert sum(len(spans[key]) for key in "abc") == 12


async def test_a_workflow_without_limits_touches_no_slot(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    seen: list[str] = []

    async def note(msg: object) -> None:
        seen.append(getattr(msg, "subject", ""))

    nc = client.connection.nc
    subs = [
        await nc.subscribe("$KV.natflow_limits.>", cb=note),
        await nc.subscribe("$JS.API.DIRECT.GET.KV_natflow_limits", cb=note),
        await nc.subscribe("$JS.API.DIRECT.GET.KV_natflow_limits.>", cb=note),
    ]
    async with running_worker(client, wl.WORKFLOWS):
        handles = [await client.start(wl.unlimited, i) for i in range(5)]
        assert [await h.result(timeout=10) for h in handles] == [0, 2, 4, 6, 8]
    for sub in subs:
        await sub.unsubscribe()
    assert seen == []


async def _slots_held(client: Client, limit: str, count: int, key: str = "") -> bool:
    slots = await read_limit_slots(client.connection, LimitGroup(limit, key))
    return len(slots.held) == count


async def _all_waiting(client: Client, run_ids: list[str]) -> bool:
    for run_id in run_ids:
        current = (await client.describe(run_id)).current or ""
        if "waiting for a slot" not in current:
            return False
    return True


async def _said(log: Path, run_id: str) -> bool:
    return any(run == run_id for spans in intervals(log).values() for _, _, run in spans)


async def test_a_waiting_run_can_be_cancelled_at_once(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    _, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        holder, queued = await _one_holds_one_waits(client, "holder", "queued")
        await client.cancel("queued", "not needed")
        with pytest.raises(RunCancelled):
            await queued.result(timeout=10)
        assert (await holder.status()).status == "running"  # its slot was never touched
        (gates / "all").touch()
        assert await holder.result(timeout=10) == "one"


async def test_a_slot_granted_to_a_run_that_already_closed_is_freed(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    _, gates = limits_env
    (gates / "all").touch()
    group = LimitGroup("workflow:one_at_a_time", "")
    async with running_worker(client, wl.WORKFLOWS):
        done = await client.start(wl.one_at_a_time, "x", run_id="done")
        assert await done.result(timeout=10) == "one"

        async def closed_everywhere() -> bool:  # released, and the engine saw it close
            listed = await client.list(workflow="one_at_a_time")
            indexed = bool(listed) and listed[0].status == "completed"
            return indexed and await _slots_held(client, group.limit, 0)

        await wait_for(closed_everywhere, what="the run closed and its slot given back")
        # A wait list entry that outlived its run (written in a race with its closing):
        # the engine grants it the free slot, and must not leave it granted forever.
        stale = Waiter(
            run_id="done",
            workflow="one_at_a_time",
            queue="default",
            limit=group.limit,
            label="workflow=one_at_a_time",
            max=1,
            since=utcnow(),
            at=utcnow(),
        )
        await park(client.connection, group, stale)
        await wait_for(lambda: _slots_held(client, group.limit, 1), what="the stale grant")
        await wait_for(lambda: _slots_held(client, group.limit, 0), timeout=10, what="its release")
        later = await client.start(wl.one_at_a_time, "y", run_id="later")
        assert await later.result(timeout=10) == "one"


async def test_two_engine_replicas_never_grant_more_than_max(
    client: Client, engine: Engine, nats_server: EmbeddedServer, limits_env: tuple[Path, Path]
) -> None:
    log, _ = limits_env
    async with running_engine(nats_server.url) as second, running_worker(client, wl.WORKFLOWS):
        handles = [
            await client.start(wl.per_key, {"key": key, "seconds": 0.05})
            for _ in range(12)
            for key in "AB"
        ]
        for handle in handles:
            await handle.result(timeout=60)
    spans = intervals(log)
    assert [len(spans[key]) for key in "AB"] == [12, 12]
    assert max(most_at_once(spans[key]) for key in "AB") == 2
    assert engine.limits.granted + second.limits.granted > 0  # grants happened, by either


async def test_closing_a_run_whose_group_the_service_forgot_is_no_error(client: Client) -> None:
    service = LimitService(client.connection)
    group = LimitGroup("workflow:w", "")
    slot = Slot(
        run_id="r",
        limit=group.limit,
        label="workflow=w",
        max=1,
        workflow="w",
        queue="default",
        at=utcnow(),
    )
    service._apply(group.slot_key(0), encode_entry(slot), 5)
    service._apply(group.slot_key(0), None, 6)  # given back
    await service._audit()  # an empty group is forgotten
    await service.run_closed("r")  # the dispatcher closes the run: nothing to free
    assert not service.waiting("r")


@pytest.mark.anyio
@pytest.mark.parametrize(("old_max", "new_max"), [(3, 1), (1, 3)])
async def test_a_changed_max_holds_for_runs_that_waited_under_the_old_one(
    client: Client, engine: Engine, limits_env: tuple[Path, Path], old_max: int, new_max: int
) -> None:
    """The engine granted by the max the waiting runs parked with: lowered from 3 to 1, three
    of the backlog ran at once; raised from 1 to 3, the backlog still ran one at a time."""
    log, gates = limits_env
    deployed = {3: wl.capped_at_3, 1: wl.capped_at_1}
    run_ids = [f"capped-{i}" for i in range(8)]
    async with running_worker(client, [deployed[old_max]]):
        for run_id in run_ids:
            await client.start(deployed[old_max], "x", run_id=run_id)

        async def split() -> tuple[list[str], list[str]] | None:
            currents = {r: (await client.describe(r)).current or "" for r in run_ids}
            running = [r for r, c in currents.items() if c.startswith("running")]
            waiting = [r for r, c in currents.items() if "waiting for a slot" in c]
            return (running, waiting) if len(running) + len(waiting) == len(run_ids) else None

        running, waiting = await wait_for(split, what="slots taken and a line")
        assert len(running) == old_max
        for run_id in running:  # those holding a slot end; the rest wait under the old max
            (gates / run_id).touch()
            await client.handle(run_id).result(timeout=10)
    async with running_worker(client, [deployed[new_max]]):
        await wait_for(lambda: _slots_held(client, "workflow:capped", new_max), what="new slots")

        async def bodies_began() -> bool:  # under load a body began after the gate opened
            return sum((gates / f"began-{r}").exists() for r in waiting) >= new_max

        await wait_for(bodies_began, what="the slot holders' bodies at their gate")
        (gates / "all").touch()
        for run_id in waiting:
            await client.handle(run_id).result(timeout=20)
    waited = [s for s in intervals(log)["capped"] if s[2] in waiting]
    assert most_at_once(waited) == new_max, waited


@workflow(queue="qa", concurrency=Limit(max=1, name="shared-api"))
async def on_qa(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("held", wl.held, "api", ctx.run_id)


@workflow(queue="qb", concurrency=Limit(max=1, name="shared-api"))
async def on_qb(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("held", wl.held, "api", ctx.run_id)


async def test_a_slot_granted_to_a_run_no_worker_takes_up_goes_on_to_the_next(
    client: Client, engine: Engine, limits_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared limit's slot granted to a run of a paused queue (or one no worker serves)
    stayed there for good: the runs of the other queues waited for ever."""
    from natflow_engine import _limit_service
    from natflow_engine._queues import pause_queue

    monkeypatch.setattr(_limit_service, "GRANT_TAKEBACK", 4.0)
    _, gates = limits_env
    async with (
        running_worker(client, [on_qa], queue="qa"),
        running_worker(client, [on_qb], queue="qb"),
    ):
        await client.start(on_qa, "x", run_id="qa-1")
        await wait_for(lambda: _slots_held(client, "name:shared-api", 1), what="qa-1's slot")
        await client.start(on_qa, "x", run_id="qa-2")
        await wait_for(lambda: _all_waiting(client, ["qa-2"]), what="qa-2 in line")
        await client.start(on_qb, "y", run_id="qb-1")
        await wait_for(lambda: _all_waiting(client, ["qb-1"]), what="qb-1 in line")
        await pause_queue(client.connection, "qa")
        (gates / "qa-1").touch()  # its slot goes to qa-2, whose queue is paused
        (gates / "qb-1").touch()
        assert await client.handle("qb-1").result(timeout=20) == "api"


_FAMILY = Limit(max=1, name="family", hold_while_waiting=True)


@workflow(concurrency=_FAMILY)
async def family_child(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("kid", str.upper, input)


@workflow(concurrency=_FAMILY)
async def family_parent(ctx: WorkflowContext, input: str) -> str:
    await ctx.step("first", str.lower, input)
    return str(await ctx.child(family_child, input))


async def test_a_parent_that_keeps_its_slot_while_waiting_lets_it_go_for_its_child(
    client: Client, engine: Engine
) -> None:
    """The parent kept the only slot while it waited for its child, which waited for that
    slot: both stalled until the engine took the slot back (and for good once it no longer
    takes back a kept slot)."""
    async with running_worker(client, [family_parent, family_child]):
        handle = await client.start(family_parent, "x", run_id="family-1")
        assert await handle.result(timeout=20) == "X"


async def test_a_run_waiting_for_a_slot_is_paused_at_once_and_waits_again_once_resumed(
    client: Client, engine: Engine, limits_env: tuple[Path, Path]
) -> None:
    """The pause reached the run only once it had its slot: it said "waiting for a slot"
    for as long as the line was long."""
    _, gates = limits_env
    async with running_worker(client, wl.WORKFLOWS):
        holder, queued = await _one_holds_one_waits(client, "holder-p", "queued-p")
        await client.pause("queued-p")

        async def paused() -> bool:
            return (await client.describe("queued-p")).status == "paused"

        await wait_for(paused, what="the waiting run paused")
        assert (await holder.status()).status == "running"  # its slot was never touched
        await client.resume("queued-p")
        await wait_for(lambda: _all_waiting(client, ["queued-p"]), what="in line again")
        (gates / "all").touch()
        assert await holder.result(timeout=10) == "one"
        assert await queued.result(timeout=10) == "one"


async def _one_holds_one_waits(
    client: Client, holder_id: str, queued_id: str
) -> tuple[RunHandle, RunHandle]:
    """A run of ``one_at_a_time`` holding its one slot, and a second waiting for it."""
    holder = await client.start(wl.one_at_a_time, "x", run_id=holder_id)
    await wait_for(lambda: _slots_held(client, "workflow:one_at_a_time", 1), what="a slot")
    queued = await client.start(wl.one_at_a_time, "y", run_id=queued_id)
    await wait_for(lambda: _all_waiting(client, [queued_id]), what="the run to wait")
    return holder, queued
