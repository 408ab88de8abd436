"""Schedules (issue 14) against a real nats-server: fires on time and exactly once with
several engine replicas, catch-up after an outage, overlap policies with a workflow slower
than the interval, pause, trigger, backfill, and schedules declared by ``@workflow(cron=)``.

The engine runs in-process unless a test stops it or runs replicas; then each replica is a
real ``natflow engine`` process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest
from natflow import (
    Client,
    InvalidInput,
    NatflowError,
    RunInfo,
    RunNotFound,
    WorkflowContext,
    workflow,
)
from natflow_engine._cron import fire_token
from natflow_engine._kv import kv_put
from natflow_engine._schedules import (
    Schedule,
    ScheduleFire,
    ScheduleSpec,
    change_schedule,
    fire_run_id,
    get_schedule,
)
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import SCHEDULES_BUCKET
from natflow_engine.events import RunStarted
from prometheus_client import REGISTRY

from tests.helpers import running_worker, stop, wait_for
from tests.workflows_triggers import WORKFLOWS, nightly, slow_tick, tick
from tests.workflows_waits import engine_process


async def schedule_runs(client: Client, schedule_id: str) -> list[RunInfo]:
    """The runs the schedule's fires started (its recent record, each run read from its
    history; the run index is a projection that a concurrent scan may see half-moved)."""
    info = await client.schedules.describe(schedule_id)
    runs = []
    for fire in info.recent_runs:
        if fire.action == "started" and fire.run_id is not None:
            try:
                runs.append(await client.describe(fire.run_id))
            except RunNotFound:  # decided, start not made yet
                continue
    return sorted(runs, key=fire_of)


def _sample(name: str, **labels: str) -> float:
    """A metric of this process's registry (the engine runs in-process here)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def fire_of(run: RunInfo) -> datetime:
    assert run.trigger is not None and run.trigger.fire_time is not None
    return run.trigger.fire_time


def lateness(runs: list[RunInfo]) -> list[float]:
    return sorted((r.created_at - fire_of(r)).total_seconds() for r in runs)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))]


async def test_a_schedule_fires_on_time_and_its_runs_show_it(
    client: Client, engine: object
) -> None:
    started_before = _sample("natflow_schedule_fires_total", action="started")
    async with running_worker(client, WORKFLOWS):
        info = await client.schedules.create("ticker", tick, every=1)
        assert info.workflow == "tick" and info.spec.every == 1 and not info.paused
        gaps = {b - a for a, b in itertools.pairwise(info.next_fire_times)}
        assert gaps == {timedelta(seconds=1)}

        async def three_done() -> list[RunInfo]:
            runs = await schedule_runs(client, "ticker")
            done = [r for r in runs if r.status == "completed"]
            return runs if len(done) >= 3 else []

        runs = await wait_for(three_done, timeout=15, what="three scheduled runs")
        for run in runs:
            assert run.run_id == f"ticker-{fire_token(fire_of(run))}"
            assert run.trigger is not None and run.trigger.kind == "schedule"
            assert run.created_at >= fire_of(run), "a fire started early"
        assert _sample("natflow_schedule_fires_total", action="started") >= started_before + 3
        assert _sample("natflow_schedule_lateness_seconds_count") >= 3
        described = await client.schedules.describe("ticker")
        started = [f for f in described.recent_runs if f.action == "started"]
        assert {f.run_id for f in started} >= {r.run_id for r in runs}
        assert described.next_fire_times[0] > fire_of(runs[-1])

        # Backfilling fires that already ran starts nothing new: same derived run ids.
        first, last = fire_of(runs[0]), fire_of(runs[2])
        handles = await client.schedules.backfill("ticker", first, last)
        assert [h.run_id for h in handles] == [r.run_id for r in runs[:3]]

        paused = await client.schedules.pause("ticker", note="maintenance")
        assert paused.paused and paused.note == "maintenance" and paused.next_fire_times == []
        count = len(await schedule_runs(client, "ticker"))
        await anyio.sleep(2.5)  # two fire times pass while paused
        assert len(await schedule_runs(client, "ticker")) <= count + 1  # one was in flight

        handle = await client.schedules.trigger("ticker")
        assert re.fullmatch(r"ticker-\d{8}T\d{9}Zt[0-9a-f]{4}", handle.run_id), handle.run_id
        assert await handle.result(timeout=10) == handle.run_id
        # Triggers at once (two operators, a loop): each its own run, none handed twice.
        many = await asyncio.gather(*(client.schedules.trigger("ticker") for _ in range(5)))
        assert len({h.run_id for h in many}) == 5
        assert len({h.run_id for h in many} - {r.run_id for r in await client.list(limit=100)}) < 5

        names = [s.schedule_id for s in await client.schedules.list()]
        assert names == ["nightly", "ticker"]  # nightly: declared by @workflow(cron=)
        await client.schedules.delete("ticker")
        with pytest.raises(NatflowError, match="no schedule 'ticker'"):
            await client.schedules.describe("ticker")


async def test_schedule_arguments_are_checked_before_anything_is_written(client: Client) -> None:
    with pytest.raises(NatflowError, match="invalid cron"):
        await client.schedules.create("bad", tick, cron="0 25 * * *")
    with pytest.raises(NatflowError, match="exactly one of cron= or every="):
        await client.schedules.create("bad", tick)
    with pytest.raises(NatflowError, match="invalid schedule id"):
        await client.schedules.create("has space", tick, every=5)
    await client.schedules.create("dup", tick, every=60)
    with pytest.raises(NatflowError, match="exists"):
        await client.schedules.create("dup", tick, every=60)
    updated = await client.schedules.update("dup", cron="0 3 * * *", timezone="Europe/Berlin")
    assert updated.spec.cron == "0 3 * * *" and updated.spec.every is None
    berlin = [t.astimezone(ZoneInfo("Europe/Berlin")) for t in updated.next_fire_times]
    assert {(t.hour, t.minute) for t in berlin} == {(3, 0)}


async def test_a_workflow_with_cron_gets_its_schedule_when_a_worker_starts(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, WORKFLOWS):
        info = await wait_for(lambda: _describe(client, "nightly"), what="schedule nightly")
    assert info.spec.cron == "0 3 * * *" and info.spec.timezone == "Europe/Berlin"
    assert info.spec.queue == "sched"
    assert nightly.schedule is not None
    new_spec = msgspec.structs.replace(nightly.schedule, cron="0 4 * * *")
    changed = dataclasses.replace(nightly, schedule=new_spec)
    async with running_worker(client, [changed]):
        info = await wait_for(
            lambda: _describe(client, "nightly", cron="0 4 * * *"), what="updated schedule"
        )
    assert info.workflow == "nightly"


async def _describe(client: Client, sid: str, cron: str | None = None) -> object:
    try:
        info = await client.schedules.describe(sid)
    except NatflowError:
        return None
    return info if cron is None or info.spec.cron == cron else None


@pytest.mark.slow
async def test_every_second_with_two_engine_replicas_fires_each_time_exactly_once(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    for i in range(2):
        await engine_process(nats_server.url, tmp_path / f"engine{i}.log", processes)
    async with running_worker(client, WORKFLOWS):
        info = await client.schedules.create("replicated", tick, every=1)
        assert info.created_at is not None
        created = info.created_at  # fires come after this moment
        await anyio.sleep(10.5)
        await client.schedules.pause("replicated")
        ended = datetime.now(UTC)

        await anyio.sleep(0.5)  # a fire decided just before the pause gets its run
    # Every fire time from the first after the schedule's creation to the pause has its run,
    # started once (history holds one run_started), none early; the schedule knows no other.
    first = created.replace(microsecond=0) + timedelta(seconds=1)
    fires = [first + timedelta(seconds=i) for i in range(int((ended - first).total_seconds()))]
    assert len(fires) >= 9
    runs = [await client.describe(fire_run_id("replicated", fire)) for fire in fires]
    for run in runs:
        starts = [e for e in await client.history(run.run_id) if isinstance(e, RunStarted)]
        assert len(starts) == 1
    recorded = [r.run_id for r in await schedule_runs(client, "replicated")]
    assert recorded[: len(runs)] == [r.run_id for r in runs]
    assert len(recorded) <= len(runs) + 1  # plus the fire that met the pause, if any
    late = lateness(runs)
    assert late[0] >= 0, "a fire started before its time"
    print(
        f"\nschedule lateness over {len(late)} fires, 2 replicas: "
        f"p50 {percentile(late, 0.5):.3f} s, p99 {percentile(late, 0.99):.3f} s, "
        f"max {late[-1]:.3f} s"
    )
    assert percentile(late, 0.5) < 1.0


@pytest.mark.slow
async def test_fires_missed_while_no_engine_ran_are_caught_up_oldest_first_or_recorded_missed(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    log = tmp_path / "engine.log"
    proc = await engine_process(nats_server.url, log, processes)
    async with running_worker(client, WORKFLOWS):
        await client.schedules.create(
            "outage", tick, every=1, catchup_window=2.5, overlap="allow_all"
        )
        await wait_for(lambda: _runs_at_least(client, "outage", 2), timeout=10, what="two fires")
        stop(proc, signal.SIGKILL)
        down_at = datetime.now(UTC)
        await anyio.sleep(5.2)  # five fire times pass with no engine
        await engine_process(nats_server.url, log, processes)
        back_at = datetime.now(UTC)

        async def dealt_with() -> object:
            info = await client.schedules.describe("outage")
            return info if info.missed and info.recent_runs[0].fire_time > back_at else None

        info = await wait_for(dealt_with, timeout=15, what="the catch-up")
        await client.schedules.pause("outage")
    outage = sorted(
        (f for f in info.recent_runs if down_at < f.fire_time < back_at),
        key=lambda f: f.fire_time,
    )
    assert len(outage) >= 5
    missed = [f for f in outage if f.action == "missed"]
    caught = [f for f in outage if f.action == "started"]
    assert missed and caught and len(missed) + len(caught) == len(outage)
    assert max(f.fire_time for f in missed) < min(f.fire_time for f in caught)  # older ones missed
    for f in missed:  # the window, and a pass's 1 s of tolerance
        assert (f.at - f.fire_time).total_seconds() > 3.5
    for f in caught:
        assert (f.at - f.fire_time).total_seconds() <= 3.5
    assert set(info.missed) >= {f.fire_time for f in missed}
    # started on recovery, oldest first: each run's start follows the one of the fire before
    started = {r.run_id: r.created_at for r in await schedule_runs(client, "outage")}
    times = [started[f.run_id] for f in caught if f.run_id in started]
    assert len(times) == len(caught) and times == sorted(times)


async def _runs_at_least(client: Client, sid: str, n: int) -> bool:
    return len(await schedule_runs(client, sid)) >= n


@pytest.mark.slow
async def test_overlap_skip_and_buffer_one_with_a_workflow_slower_than_the_interval(
    client: Client, engine: object
) -> None:
    async with running_worker(client, WORKFLOWS):
        await client.schedules.create("skipper", slow_tick, every=1, overlap="skip")
        await client.schedules.create("buffered", slow_tick, every=1, overlap="buffer_one")
        await anyio.sleep(8)
        for sid in ("skipper", "buffered"):
            await client.schedules.pause(sid)

        async def closed(sid: str) -> list[RunInfo]:
            runs = await schedule_runs(client, sid)
            return runs if runs and all(r.is_closed for r in runs) else []

        skipped_runs = await wait_for(lambda: closed("skipper"), timeout=15, what="skip runs")
        buffered_runs = await wait_for(lambda: closed("buffered"), timeout=15, what="buffer runs")
        skip_info = await client.schedules.describe("skipper")
        buffer_info = await client.schedules.describe("buffered")

    # skip: never two runs at once; fires during a run are skipped, never started later
    for before, after in itertools.pairwise(skipped_runs):
        assert before.closed_at is not None and after.created_at >= before.closed_at
        assert (after.created_at - fire_of(after)).total_seconds() < 1.0  # started on time
    actions = {f.action for f in skip_info.recent_runs}
    assert actions == {"started", "skipped"}
    assert 2 <= len(skipped_runs) <= 4

    # buffer_one: one fire waits for the open run and starts as soon as it closes
    for before, after in itertools.pairwise(buffered_runs):
        assert before.closed_at is not None and after.created_at >= before.closed_at
        assert (after.created_at - before.closed_at).total_seconds() < 1.5
    assert {"started", "buffered", "skipped"} <= {f.action for f in buffer_info.recent_runs}
    late_starts = [r for r in buffered_runs if (r.created_at - fire_of(r)).total_seconds() > 1]
    assert late_starts, "no buffered fire was started after its time"
    assert len(buffered_runs) >= len(skipped_runs)


@pytest.mark.slow
@pytest.mark.anyio  # explicit: the marker added at collection comes too late for parametrize
@pytest.mark.parametrize(
    ("overlap", "ended"), [("cancel_other", "cancelled"), ("terminate_other", "terminated")]
)
async def test_overlap_cancel_or_terminate_other_stops_the_open_run_for_the_new_fire(
    client: Client, engine: object, overlap: str, ended: str
) -> None:
    async with running_worker(client, WORKFLOWS):
        await client.schedules.create("replacer", slow_tick, every=1, overlap=overlap)
        await wait_for(lambda: _runs_at_least(client, "replacer", 3), timeout=15, what="3 fires")
        await client.schedules.pause("replacer")

        async def all_closed() -> list[RunInfo]:
            runs = await schedule_runs(client, "replacer")
            return runs if all(r.is_closed for r in runs) else []

        runs = await wait_for(all_closed, timeout=15, what="the runs to close")
    *replaced, last = runs
    assert len(replaced) >= 2
    for run in replaced:
        assert run.status == ended, run
        assert run.error is not None and "schedule replacer" in run.error.message
    assert last.status == "completed"


async def test_a_start_decided_by_a_replica_that_died_is_made_by_another(
    client: Client, engine: object
) -> None:
    # What a replica leaves when it dies between storing its decision and starting the run.
    await client.schedules.create("orphan", tick, every=86400)
    decided_at = datetime.now(UTC) - timedelta(seconds=3)
    fire = decided_at.replace(microsecond=0) - timedelta(seconds=1)
    run_id = fire_run_id("orphan", fire)
    left = ScheduleFire(fire_time=fire, action="started", at=decided_at, run_id=run_id)
    await change_schedule(
        client.connection,
        "orphan",
        lambda s: msgspec.structs.replace(s, pending=[left], open_runs=[run_id]),
    )
    async with running_worker(client, WORKFLOWS):
        assert await wait_for(lambda: _result(client, run_id), what="the orphaned start") == run_id

    async def cleared() -> bool:
        found = await get_schedule(client.connection, "orphan")
        return found is not None and found[0].pending == []

    await wait_for(cleared, what="pending cleared")


async def _result(client: Client, run_id: str) -> object:
    try:
        return await client.handle(run_id).result(timeout=5)
    except NatflowError:  # not started yet
        return None


async def test_schedule_values_of_the_wrong_type_or_out_of_range_are_refused_unwritten(
    client: Client,
) -> None:
    bad: list[tuple[dict[str, object], str]] = [
        ({"every": 10**12}, "every must be at most a hundred years"),  # past the year 9999
        ({"every": 1e300}, "every must be at most a hundred years"),
        ({"cron": "0 2 * * *", "catchup_window": timedelta(days=365 * 200)}, "catchup_window"),
        ({"every": 60, "paused": "yes"}, "paused"),  # msgspec checks no types of a struct...
        ({"every": 60, "note": 5}, "note"),  # ...built in code
        ({"every": 60, "timezone": 5}, "timezone"),
    ]
    for arguments, named in bad:
        with pytest.raises(InvalidInput, match=named):
            await client.schedules.create("bad", tick, **arguments)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="two datetimes"):
        await client.schedules.backfill("bad", "2026-11-27", "2026-11-28")  # type: ignore[arg-type]
    # An input that leaves no room in the entry for the schedule's fires (it was stored,
    # and the schedule stopped once its recent fires filled the rest).
    big = "x" * (client.connection.max_payload - 64 * 1024)
    with pytest.raises(InvalidInput, match="keeps its input with its recent fires"):
        await client.schedules.create("bad", tick, big, every=60)
    await client.schedules.create("small", tick, "x", every=3600)
    with pytest.raises(InvalidInput, match="keeps its input with its recent fires"):
        await client.schedules.update("small", input=big)
    assert [s.schedule_id for s in await client.schedules.list()] == ["small"]


async def test_a_stored_schedule_natflow_cannot_read_or_compute_leaves_the_engine_running(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    conn = client.connection
    await client.schedules.create("good", tick, every=1)
    now = datetime.now(UTC)
    unreadable = {"schedule_id": "typo", "workflow": "tick", "paused": "yes"}
    huge = Schedule(  # as a hand-written entry (or an older natflow) could store it
        schedule_id="huge",
        workflow="tick",
        spec=ScheduleSpec(every=1e12),
        created_at=now,
        updated_at=now,
        cursor=now,
    )
    await kv_put(conn, SCHEDULES_BUCKET, "typo", msgspec.json.encode(unreadable))
    # not UTF-8: msgspec raises UnicodeDecodeError, not DecodeError, for it
    await kv_put(conn, SCHEDULES_BUCKET, "garbled", b'{"schedule_id": "\xff"}')
    await kv_put(conn, SCHEDULES_BUCKET, "huge", msgspec.json.encode(huge))
    log = tmp_path / "engine.log"
    engine = await engine_process(nats_server.url, log, processes)

    async def good_fired() -> bool:
        assert engine.poll() is None, log.read_text()[-3000:]
        return bool((await client.schedules.describe("good")).recent_runs)

    await wait_for(good_fired, timeout=20, what="the readable schedule to fire")

    async def all_quarantined() -> bool:  # each as the engine meets it, in no fixed order
        text = log.read_text()
        return all(f"quarantined (kv_schedules) {b}" in text for b in ("typo", "garbled", "huge"))

    await wait_for(all_quarantined, timeout=10, what="the three bad entries quarantined")
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert [s.schedule_id for s in await client.schedules.list()] == ["good", "huge"]
    with pytest.raises(NatflowError, match=r"cannot read .* `natflow schedules delete typo`"):
        await client.schedules.describe("typo")
    for bad in ("typo", "garbled", "huge"):
        await client.schedules.delete(bad)
    assert [s.schedule_id for s in await client.schedules.list()] == ["good"]
    assert engine.poll() is None


async def test_a_fire_logs_the_run_it_started_as_a_field(
    client: Client, engine: object, caplog: pytest.LogCaptureFixture
) -> None:
    """--log-json lines about a run carry its run_id (README); the schedule's did not."""
    caplog.set_level(logging.INFO, logger="natflow.schedules")
    await client.schedules.create("logged", tick, every=1)

    async def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "started run" in r.getMessage()]

    record = (await wait_for(logged, timeout=10, what="a fire's log line"))[0]
    assert getattr(record, "run_id", "").startswith("logged-"), record.__dict__
    assert getattr(record, "workflow", None) == "tick"


async def _hourly(ctx: WorkflowContext) -> None:
    return None


dotted = workflow(name="reports.daily", every=3600)(_hourly)
dashed = workflow(name="reports-daily", every=7200)(_hourly)


async def test_workflows_whose_names_differ_only_in_odd_characters_keep_two_schedules(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """Both declared schedule "reports-daily": each worker took the other's schedule over,
    and a worker allowed one workflow's schedule could write the other's. An older natflow's
    schedule under that id is replaced, not left to fire beside the new one."""
    assert dotted.schedule is not None
    await client.schedules.create("reports-daily", "reports.daily", every=3600)  # as declared
    async with running_worker(client, [dotted, dashed]):

        async def both() -> list[tuple[str, str, float | None]] | None:
            found = [
                (i.schedule_id, i.workflow, i.spec.every) for i in await client.schedules.list()
            ]
            return found if len(found) == 2 and found[0][1] != found[1][1] else None

        found = await wait_for(both, what="two schedules")
    assert sorted(found) == sorted(
        [(dotted.schedule_id, "reports.daily", 3600), ("reports-daily", "reports-daily", 7200)]
    )
    assert dotted.schedule_id.startswith("reports-daily-h")
