"""Durable timers (issue 4): sleeps that wake once and never early, hold no worker, and survive
engine kills, server restarts and engine replicas; delayed starts; the run view of a waiting run.

Against a real nats-server; the engine and worker run in-process unless the test kills or
restarts one, then they are real processes (``natflow engine``, ``natflow worker``).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from natflow import Client, RunCancelled, RunFailed, WorkflowContext, workflow
from natflow._execution import HOLD_TIMERS_UNDER
from natflow_engine._engine import Engine
from natflow_engine._human import when
from natflow_engine._kv import kv_get
from natflow_engine._server import EmbeddedServer
from natflow_engine._timers import TIMERS_BUCKET, Timer, timer_key
from natflow_engine.events import (
    Event,
    RunClaimed,
    RunCompleted,
    RunStarted,
    SignalWaited,
    TimerFired,
    TimerScheduled,
)

from tests.helpers import running_engine, running_worker, spawn_worker, wait_for
from tests.workflows_waits import (
    TARGET,
    WORKFLOWS,
    engine_process,
    held_by,
    nap,
    of,
    registered,
    rss_kb,
    tag,
    wait_once,
    wall_clock,
)


async def sleeping(client: Client, run_id: str) -> TimerScheduled:
    """Wait until the run's (only) timer is in history and the engine mirrored it into KV."""

    async def mirrored() -> TimerScheduled | None:
        scheduled = of(await client.history(run_id), TimerScheduled)
        if not scheduled:
            return None
        key = timer_key(run_id, scheduled[0].seq)
        found = await kv_get(client.connection, TIMERS_BUCKET, key)
        return scheduled[0] if found is not None else None

    timer = await wait_for(mirrored, what=f"the timer of {run_id} in history and KV")
    assert timer is not None
    return timer


def check_slept_once(events: list[Event], result: dict[str, float], seconds: float) -> float:
    """One timer_fired for the sleep, never before due; returns its lateness (s)."""
    scheduled = of(events, TimerScheduled)
    fired = of(events, TimerFired)
    assert len(scheduled) == 1 and len(fired) == 1, [tag(e) for e in events]
    assert fired[0].seq == scheduled[0].seq
    assert of(events, RunCompleted), [tag(e) for e in events]
    late: float = (fired[0].at - scheduled[0].due_at).total_seconds()
    assert late >= 0, f"fired {late:.4f} s before due"
    assert result["after"] - result["before"] >= seconds, result
    assert result["after"] >= scheduled[0].due_at.timestamp(), result
    return late


async def _not(value: Any) -> bool:
    return not await value


async def _held(worker: Any) -> list[str]:
    return list(worker.held_runs)


async def _connected(client: Client) -> bool:
    return bool(client.connection.nc.is_connected)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- 1,000 sleeps -------------------------------------------------------------------------

N_RUNS = 1000
SLEEP = 2.0
SLACK = 0.5  # time allowed for a worker to let a run go after its timer is scheduled


async def test_a_thousand_sleeps_wake_once_never_early_and_hold_no_worker(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    proc = spawn_worker(nats_server.url, TARGET, log=tmp_path / "worker.log")
    processes.append(proc)
    await registered(client, 1)

    async def held() -> list[str]:
        return await held_by(client, proc.pid)

    # Warm up (imports, caches, the first runs' allocations), then measure the idle worker.
    warm = [await client.start(nap, 0.0, run_id=f"warm-{i}") for i in range(20)]
    for handle in warm:
        await handle.result(timeout=20)
    await wait_for(lambda: _not(held()), what="the worker to hold nothing")
    rss_before = rss_kb(proc.pid)

    timers: dict[str, tuple[float, float]] = {}  # run -> (when its timer appeared, due)
    samples: list[tuple[float, float, list[str], int]] = []  # (sent, received, held, rss)

    async def on_timer(msg: Any) -> None:
        run_id = msg.subject.split(".")[2]
        if msg.data and run_id not in timers:
            due = msgspec.json.decode(msg.data, type=Timer).due_at.timestamp()
            timers[run_id] = (time.time(), due)

    async def sample() -> None:
        while True:
            sent = time.time()
            runs = await held()
            samples.append((sent, time.time(), runs, rss_kb(proc.pid)))
            await anyio.sleep(0.1)

    watch = await client.connection.js.subscribe(
        f"$KV.{TIMERS_BUCKET}.>", ordered_consumer=True, cb=on_timer
    )
    ids = [f"sleep-{i}" for i in range(N_RUNS)]
    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        limit = anyio.Semaphore(32)

        async def start(run_id: str) -> None:
            async with limit:
                await client.start(nap, SLEEP, run_id=run_id)

        async with anyio.create_task_group() as starting:
            for run_id in ids:
                starting.start_soon(start, run_id)
        started = time.monotonic() - began

        # Measured at load ~12 on 2 cores (4 busy loops beside other work): starts 11 s, the
        # in-process engine woke timers 18.6 s late at p50 (this process starved), all done
        # in 49.9 s; 55 s was missed once so. Lateness is printed; never-early is asserted.
        with anyio.fail_after(100):
            for run_id in ids:
                await client.handle(run_id).result()
        finished = time.monotonic() - began
        tg.cancel_scope.cancel()
    await watch.unsubscribe()

    # Every run: one timer_fired, never early, a measured sleep of at least 2 s.
    histories: dict[str, list[Event]] = {}
    results: dict[str, dict[str, float]] = {}
    limit = anyio.Semaphore(16)

    async def read(run_id: str) -> None:
        async with limit:
            histories[run_id] = await client.history(run_id)
            results[run_id] = (await client.describe(run_id)).result

    async with anyio.create_task_group() as tg:
        for run_id in ids:
            tg.start_soon(read, run_id)
    lateness = [check_slept_once(histories[r], results[r], SLEEP) for r in ids]
    ctx_late = [
        results[r]["after"] - of(histories[r], TimerScheduled)[0].due_at.timestamp() for r in ids
    ]
    slept = [results[r]["after"] - results[r]["before"] for r in ids]

    # Per history, run r sleeps from its timer_scheduled until its timer_fired. A worker may
    # hold it only while letting it go (SLACK s after timer_scheduled) or once the timer is
    # due within HOLD_TIMERS_UNDER (then the worker itself fires it, on time).
    spans = {
        r: (
            of(histories[r], TimerScheduled)[0].at.timestamp(),
            of(histories[r], TimerScheduled)[0].due_at.timestamp(),
            of(histories[r], TimerFired)[0].at.timestamp(),
        )
        for r in ids
    }
    mirror_lag = [timers[r][0] - spans[r][0] for r in ids if r in timers]
    most_asleep, rss_at_most, held_at_most, violations = 0, rss_before, 0, []
    longest_hold = 0.0  # the longest a held run had been asleep (not yet due) at a sample
    for sent, received, runs, rss in samples:
        asleep = {r for r, (s, due, _) in spans.items() if s < sent and received < due}
        held_asleep = asleep.intersection(runs)
        for r in held_asleep:
            s, due, _ = spans[r]
            if received < due - HOLD_TIMERS_UNDER:
                longest_hold = max(longest_hold, received - s)
                if s < sent - SLACK:
                    violations.append((r, round(sent - s, 3)))
        if len(asleep) >= most_asleep:
            most_asleep, rss_at_most, held_at_most = len(asleep), rss, len(held_asleep)
    rss_max = max(sample[3] for sample in samples)
    rss_after = rss_kb(proc.pid)

    print(
        f"\n{N_RUNS} sleeps of {SLEEP} s: started in {started:.1f} s, all done in {finished:.1f} s"
        f"\ntimer lateness (timer_fired.at - due_at): p50 {pct(lateness, 0.5) * 1000:.0f} ms, "
        f"p99 {pct(lateness, 0.99) * 1000:.0f} ms, max {max(lateness) * 1000:.0f} ms"
        f"\nworkflow-measured lateness (step after the sleep - due_at): "
        f"p50 {pct(ctx_late, 0.5) * 1000:.0f} ms, p99 {pct(ctx_late, 0.99) * 1000:.0f} ms"
        f"\nworkflow-measured sleep: min {min(slept):.3f} s, "
        f"median {statistics.median(slept):.3f} s"
        f"\nengine wake-up lateness: p50 {pct(engine.timers.lateness, 0.5) * 1000:.0f} ms, "
        f"p99 {pct(engine.timers.lateness, 0.99) * 1000:.0f} ms "
        f"({len(engine.timers.lateness)} wake-ups)"
        f"\ntimer_scheduled to timer in KV (dispatcher lag): "
        f"p50 {pct(mirror_lag, 0.5) * 1000:.0f} ms, p99 {pct(mirror_lag, 0.99) * 1000:.0f} ms"
        f"\nworker: {len(samples)} samples; at most {most_asleep} runs asleep (not yet due) at "
        f"once, {held_at_most} of them held then; at most {max(len(s[2]) for s in samples)} "
        f"runs held at once (all due or being started); "
        f"longest a not-yet-due sleeping run was held: {longest_hold * 1000:.0f} ms"
        f"\nworker RSS: before {rss_before / 1024:.1f} MiB, with {most_asleep} asleep "
        f"{rss_at_most / 1024:.1f} MiB, max during {rss_max / 1024:.1f} MiB, "
        f"after all woke and finished {rss_after / 1024:.1f} MiB"
    )
    assert not violations, f"the worker held sleeping runs: {violations[:10]}"
    # A check of the scenario, not of natflow: how many sleep at once follows the start
    # rate; at load ~12 on 2 cores the starts took 11 s and 158 were seen, so 100 (not 200).
    assert most_asleep >= 100, "the test never saw many runs asleep at once"
    assert len(samples) >= 20
    # Memory: a held run costs tens of KiB; a sleeping one must cost the worker nothing.
    assert rss_at_most - rss_before < 20 * 1024, (rss_before, rss_at_most)


# -- engine and server restarts, replicas ---------------------------------------------------


async def test_engine_killed_during_a_sleep_fires_the_timer_once_when_it_comes_back(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    log = tmp_path / "engine.log"
    first = await engine_process(nats_server.url, log, processes)
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(nap, 2.0, run_id="engine-kill-1")
        timer = await sleeping(client, "engine-kill-1")
        await wait_for(lambda: _not(_held(worker)), what="the worker to let the run go")
        first.kill()
        first.wait()
        # The scenario: no engine from before the due time until well after it.
        await anyio.sleep(max(0.0, (timer.due_at - datetime.now(UTC)).total_seconds()) + 1.0)
        events = await client.history("engine-kill-1")
        assert not of(events, TimerFired), [tag(e) for e in events]
        assert (await client.describe("engine-kill-1")).status == "sleeping"
        assert worker.held_runs == []
        restarted = time.time()
        await engine_process(nats_server.url, log, processes)
        result = await handle.result(timeout=20)
    events = await client.history("engine-kill-1")
    check_slept_once(events, result, 2.0)
    fired = of(events, TimerFired)[0]
    print(f"\nfired {fired.at.timestamp() - restarted:.3f} s after the engine was restarted")
    await anyio.sleep(0.5)  # a second, wrong timer_fired would show up by now
    assert len(of(await client.history("engine-kill-1"), TimerFired)) == 1


async def test_server_restart_during_a_sleep_the_timer_still_fires(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    await engine_process(nats_server.url, tmp_path / "engine.log", processes)
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(nap, 3.0, run_id="restart-1")
        timer = await sleeping(client, "restart-1")
        await wait_for(lambda: _not(_held(worker)), what="the worker to let the run go")
        await anyio.to_thread.run_sync(nats_server.restart)
        assert datetime.now(UTC) < timer.due_at, "the restart took longer than the sleep"
        result = await handle.result(timeout=30)
    late = check_slept_once(await client.history("restart-1"), result, 3.0)
    print(f"\ntimer across a server restart fired {late:.3f} s after due")


async def test_a_sleep_begun_right_after_a_server_restart_fires_on_time(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """The engine must see timers scheduled after a restart at once, not when its watches
    notice the restart by themselves (two missed 5 s heartbeats)."""
    await engine_process(nats_server.url, tmp_path / "engine.log", processes)
    async with running_worker(client, WORKFLOWS):
        warm = await client.start(nap, 0.0, run_id="restart-warm")
        await warm.result(timeout=10)
        await anyio.to_thread.run_sync(nats_server.restart)
        await wait_for(lambda: _connected(client), what="the client to reconnect")
        handle = await client.start(nap, 2.0, run_id="restart-after")
        result = await handle.result(timeout=40)
    late = check_slept_once(await client.history("restart-after"), result, 2.0)
    print(f"\ntimer begun after a server restart fired {late:.3f} s after due")
    assert late < 2.0, f"fired {late:.1f} s late"


async def test_two_engine_replicas_fire_each_timer_once(
    client: Client, nats_server: EmbeddedServer
) -> None:
    url = nats_server.url
    async with (
        running_engine(url) as one,
        running_engine(url) as two,
        running_worker(client, WORKFLOWS),
    ):
        handles = [await client.start(nap, 2.0, run_id=f"replicas-{i}") for i in range(30)]
        results = {h.run_id: await h.result(timeout=30) for h in handles}
    replicas = [one, two]
    for run_id, result in results.items():
        check_slept_once(await client.history(run_id), result, 2.0)
    fired = [replica.timers.fired for replica in replicas]
    print(f"\nwake-ups sent by each replica: {fired}")
    assert all(n >= 1 for n in fired), "both replicas should have raced on the timers"


# -- sleep_until, delayed starts, the run view ---------------------------------------------


@workflow(name="nap_until")
async def nap_until(ctx: WorkflowContext, when: str) -> dict[str, float]:
    await ctx.sleep_until("until", datetime.fromisoformat(when))
    return {"after": await ctx.step("after", wall_clock)}


async def test_sleep_until_wakes_at_its_time(client: Client, engine: Engine) -> None:
    when = datetime.now(UTC) + timedelta(seconds=1.5)
    async with running_worker(client, [nap_until]):
        handle = await client.start(nap_until, when.isoformat(), run_id="until-1")
        result = await handle.result(timeout=15)
    assert result["after"] >= when.timestamp()
    events = await client.history("until-1")
    scheduled, fired = of(events, TimerScheduled), of(events, TimerFired)
    assert len(scheduled) == 1 and len(fired) == 1
    assert scheduled[0].due_at == when and fired[0].at >= when


async def test_sleep_until_a_time_with_no_utc_value_fails_the_run_clearly(
    client: Client, engine: Engine
) -> None:
    """datetime.max in New York time: stored as given, the run could then be neither read
    nor cancelled (OverflowError in every conversion to UTC)."""
    async with running_worker(client, [nap_until]):
        handle = await client.start(nap_until, "9999-12-31T23:59:59-05:00", run_id="until-max")
        with pytest.raises(RunFailed, match="has no UTC time"):
            await handle.result(timeout=15)
        # A time in another zone is stored in UTC.
        new_york = timezone(timedelta(hours=-5))
        due = (datetime.now(UTC) + timedelta(seconds=0.5)).astimezone(new_york)
        ny = await client.start(nap_until, due.isoformat(), run_id="until-ny")
        await ny.result(timeout=15)
    scheduled = of(await client.history("until-ny"), TimerScheduled)
    assert scheduled[0].due_at.utcoffset() == timedelta(0)
    assert (await client.describe("until-max")).status == "failed"


@workflow(name="delayed")
async def delayed(ctx: WorkflowContext) -> float:
    return await ctx.step("began", wall_clock)


async def test_start_delay_holds_the_start_then_runs(client: Client, engine: Engine) -> None:
    async with running_worker(client, [delayed]):
        asked = time.time()
        handle = await client.start(delayed, run_id="delayed-1", start_delay=1.0)
        info = await handle.status()
        assert info.status == "pending", info
        start = (await client.history("delayed-1"))[0]
        assert isinstance(start, RunStarted) and start.not_before is not None
        assert info.current == f"starts at {when(start.not_before)}"
        assert start.not_before.timestamp() >= asked + 1.0

        async def still_pending() -> bool:
            return (await handle.status()).status == "pending"

        while time.time() < asked + 0.9:  # pending the whole time until its start
            assert await still_pending()
            await anyio.sleep(0.1)
        began = await handle.result(timeout=15)
    assert began >= asked + 1.0, began - asked
    claimed = of(await client.history("delayed-1"), RunClaimed)
    assert claimed and claimed[0].at >= start.not_before
    print(f"\nstart_delay=1.0: began {began - asked:.3f} s after the start call")


async def test_run_view_shows_what_a_waiting_run_waits_for(client: Client, engine: Engine) -> None:
    async with running_worker(client, WORKFLOWS):
        napping = await client.start(nap, 2.0, run_id="view-sleep")
        waiting = await client.start(wait_once, 30.0, run_id="view-wait")

        async def view(run_id: str, status: str) -> Any:
            info = await client.describe(run_id)
            return info if info.status == status else None

        info = await wait_for(lambda: view("view-sleep", "sleeping"), what="sleeping")
        due = of(await client.history("view-sleep"), TimerScheduled)[0].due_at
        assert info.current == f"sleeping until {when(due)}"
        info = await wait_for(lambda: view("view-wait", "waiting"), what="waiting")
        timeout_at = of(await client.history("view-wait"), SignalWaited)[0].timeout_at
        assert timeout_at is not None
        assert info.current == f"waiting for signal 'x' (timeout at {when(timeout_at)})"
        await client.signal("view-wait", "x", "go")
        assert await waiting.result(timeout=10) == "go"
        await napping.result(timeout=10)
    assert (await client.describe("view-wait")).current is None


async def test_a_closed_run_waits_for_no_timer_in_describe_or_the_list(
    client: Client, engine: Engine
) -> None:
    """A run that slept or waited with a timeout kept that due time once closed (``runs show
    --json``: a due_at beside no current), in its history's summary and in the index."""
    async with running_worker(client, WORKFLOWS):
        napped = await client.start(nap, 0.2, run_id="closed-nap")
        waiting = await client.start(wait_once, 3600.0, run_id="closed-wait")
        await napped.result(timeout=10)

        async def waits() -> bool:
            return (await waiting.status()).status == "waiting"

        await wait_for(waits, what="the wait")
        await client.cancel("closed-wait", reason="no more waiting")
        with pytest.raises(RunCancelled):
            await waiting.result(timeout=10)

    async def listed() -> list[Any]:
        runs = [r for r in await client.list() if r.run_id.startswith("closed-")]
        return runs if len(runs) == 2 and all(r.is_closed for r in runs) else []

    for info in [*await wait_for(listed, what="both runs closed in the list")]:
        described = await client.describe(info.run_id)
        assert (described.status, described.due_at) == (info.status, info.due_at)
        assert info.due_at is None, info


@workflow(name="short_and_past")
async def short_and_past(ctx: WorkflowContext) -> str:
    await ctx.sleep_until("past", ctx.now() - timedelta(hours=1))
    for i in range(3):
        await ctx.sleep(f"short-{i}", 0.1)
    return "woke"


async def test_timer_lateness_counts_from_when_a_timer_could_fire(
    client: Client, engine: Engine
) -> None:
    """A timer was scheduled to be woken 0.6 s before its due time even when that was
    already past, and its lateness counted from then: an hour for a sleep_until an hour
    ago (the timers-late alert fired), half a second for a 0.1 s sleep."""
    async with running_worker(client, [short_and_past]):
        handle = await client.start(short_and_past)
        assert await handle.result(timeout=20) == "woke"
    observed = engine.timers.lateness
    assert observed, "no timer was woken by the engine"
    assert max(observed) < 0.45, observed  # it was 0.5 s for each short one, and an hour
