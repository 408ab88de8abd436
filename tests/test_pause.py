"""Pausing and resuming runs and queues."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import anyio
import anyio.lowlevel
import pytest
from natflow import Client, NatflowError, Worker, WorkflowContext, events, workflow
from natflow_engine._cli import main as cli_main
from natflow_engine._engine import Engine
from natflow_engine._queues import queue_consumers, queue_paused
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import utcnow

from tests.helpers import running_worker, wait_for

executions: Counter[str] = Counter()
step_two_entered = anyio.Event()
step_two_gate = anyio.Event()


def count(name: str) -> str:
    executions[name] += 1
    return name


async def gated_two() -> str:
    step_two_entered.set()
    await step_two_gate.wait()
    return count("two")


@workflow(name="three_steps")
async def three_steps(ctx: WorkflowContext) -> list[str]:
    one = await ctx.step("one", count, "one")
    two = await ctx.step("two", gated_two)
    three = await ctx.step("three", count, "three")
    return [one, two, three]


@workflow(name="napper")
async def napper(ctx: WorkflowContext) -> object:
    await ctx.step("before", count, "before")
    await ctx.sleep("nap", 1)
    await ctx.step("after", count, "after")
    return await ctx.wait_for_signal("go")


@workflow(name="steady")
async def steady(ctx: WorkflowContext) -> int:
    for _ in range(5):
        await ctx.step("tick", count, "tick")
    return 5


async def slow_tick() -> str:
    await anyio.sleep(0.2)
    return count("slow")


@workflow(name="ticking", queue="incidents")
async def ticking(ctx: WorkflowContext) -> int:
    for _ in range(15):
        await ctx.step("tick", slow_tick)
    return 15


@workflow(name="queued", queue="incidents")
async def queued(ctx: WorkflowContext) -> str:
    return await ctx.step("only", count, "queued")


@workflow(name="pause_child")
async def pause_child(ctx: WorkflowContext, word: str) -> str:
    return word.upper()


@workflow(name="go_then_child")
async def go_then_child(ctx: WorkflowContext) -> str:
    word = await ctx.wait_for_signal("go")
    return str(await ctx.child(pause_child, word))


@workflow(name="go_then_return")
async def go_then_return(ctx: WorkflowContext) -> object:
    return await ctx.wait_for_signal("go")


async def status(client: Client, run_id: str) -> str:
    return (await client.describe(run_id)).status


async def test_pause_during_step_two_holds_step_three_until_resume(
    client: Client, engine: Engine
) -> None:
    global step_two_entered, step_two_gate
    executions.clear()
    step_two_entered, step_two_gate = anyio.Event(), anyio.Event()
    async with running_worker(client, [three_steps]):
        handle = await client.start(three_steps, run_id="paused-3")
        with anyio.fail_after(10):
            await step_two_entered.wait()
        await client.pause("paused-3", reason="incident 42")
        await wait_for(lambda: _has(client, "paused-3", events.RunPaused), what="the pause")
        step_two_gate.set()  # the running step finishes and is recorded
        await wait_for(lambda: _completed_steps(client, "paused-3", 2), what="step two")
        held_until = time.monotonic() + 5.0
        while time.monotonic() < held_until:
            assert executions["three"] == 0
            assert await status(client, "paused-3") == "paused"
            await anyio.sleep(0.1)
        info = await client.describe("paused-3")
        assert info.current == "paused: incident 42"
        await client.resume("paused-3")
        assert await handle.result(timeout=20) == ["one", "two", "three"]
    assert executions == Counter(one=1, two=1, three=1)
    kinds = [type(e).__name__ for e in await client.history("paused-3")]
    assert kinds.count("RunPaused") == 1 and kinds.count("RunResumed") == 1
    assert kinds.index("RunPaused") < kinds.index("StepCompleted", kinds.index("RunPaused"))


async def test_a_sleep_due_while_paused_fires_right_after_resume(
    client: Client, engine: Engine
) -> None:
    executions.clear()
    async with running_worker(client, [napper]):
        handle = await client.start(napper, run_id="napping")
        await wait_for(lambda: _has(client, "napping", events.TimerScheduled), what="the nap")
        await client.pause("napping")
        await wait_for(lambda: _is(client, "napping", "paused"), what="the pause")
        await client.signal("napping", "go", "kept")  # accepted while paused
        await anyio.sleep(2.5)  # the 1 s nap falls due meanwhile
        assert executions["after"] == 0
        assert not await _has(client, "napping", events.TimerFired)
        resumed_at = utcnow()
        await client.resume("napping")
        assert await handle.result(timeout=20) == "kept"
    fired = [e for e in await client.history("napping") if isinstance(e, events.TimerFired)]
    assert len(fired) == 1
    assert fired[0].at - resumed_at < timedelta(seconds=1.0)
    assert executions == Counter(before=1, after=1)


async def test_a_run_paused_before_any_worker_took_it_starts_no_step(
    client: Client, engine: Engine
) -> None:
    """The pause waits in the signal stream (no worker held the run to be nudged); the
    worker that takes the run looks for signals beside its claim, before any step."""
    executions.clear()
    handle = await client.start(steady, run_id="paused-early")
    await client.pause("paused-early")
    async with running_worker(client, [steady]):
        await wait_for(lambda: _is(client, "paused-early", "paused"), what="the pause")
        await anyio.sleep(2.0)
        assert executions["tick"] == 0
        await client.resume("paused-early")
        assert await handle.result(timeout=20) == 5
    assert executions["tick"] == 5


async def test_a_paused_queue_starts_no_run_until_resumed(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    executions.clear()

    def cli(*args: str) -> int:
        return cli_main(["--url", nats_server.url, *args])

    # A queue no worker served has no task consumer yet: nothing would hold its pause.
    assert await anyio.to_thread.run_sync(cli, "queues", "pause", "nobody-serves") == 1
    async with running_worker(client, [queued]):
        # The pause is held by the queue's task consumer, which the worker makes as it starts.
        await wait_for(lambda: _served(client, "incidents"), what="its task consumer")
        assert await anyio.to_thread.run_sync(cli, "queues", "pause", "incidents") == 0
        assert await queue_paused(client.connection, "incidents")
        handle = await client.start(queued, run_id="queued-1")
        await anyio.sleep(2.0)
        assert await status(client, "queued-1") == "pending"
        assert executions["queued"] == 0
        assert await anyio.to_thread.run_sync(cli, "queues", "resume", "incidents") == 0
        assert await handle.result(timeout=20) == "queued"
    assert not await queue_paused(client.connection, "incidents")


async def test_cli_pauses_and_resumes_a_run(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    def cli(*args: str) -> int:
        return cli_main(["--url", nats_server.url, *args])

    async with running_worker(client, [napper]):
        handle = await client.start(napper, run_id="cli-paused")
        await wait_for(lambda: _has(client, "cli-paused", events.TimerScheduled), what="nap")
        assert await anyio.to_thread.run_sync(cli, "runs", "pause", "cli-paused") == 0
        await wait_for(lambda: _is(client, "cli-paused", "paused"), what="the pause")
        assert await anyio.to_thread.run_sync(cli, "runs", "resume", "cli-paused") == 0
        await client.signal("cli-paused", "go", 1)
        assert await handle.result(timeout=20) == 1


async def _served(client: Client, queue: str) -> bool:
    """Whether a worker made the queue's task consumers yet (what a pause acts on)."""
    return bool(await queue_consumers(client.connection, queue))


async def _has(client: Client, run_id: str, kind: type) -> bool:
    return any(isinstance(e, kind) for e in await client.history(run_id))


async def _is(client: Client, run_id: str, wanted: str) -> bool:
    return await status(client, run_id) == wanted


async def _completed_steps(client: Client, run_id: str, n: int) -> bool:
    return sum(s.status == "completed" for s in await client.steps(run_id)) >= n


async def test_pausing_a_queue_stops_the_runs_its_workers_hold(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    executions.clear()

    def cli(*args: str) -> int:
        return cli_main(["--url", nats_server.url, *args])

    async with running_worker(client, [ticking], lease_ttl=1.5):
        handle = await client.start(ticking, run_id="ticking-1")
        await wait_for(lambda: _ran(1), what="the first tick")
        assert await anyio.to_thread.run_sync(cli, "queues", "pause", "incidents") == 0

        async def stopped() -> bool:  # within a heartbeat (lease_ttl / 3), plus the step
            before = executions["slow"]
            await anyio.sleep(0.6)
            return executions["slow"] == before

        await wait_for(stopped, timeout=5, what="the held run to stop starting steps")
        frozen = executions["slow"]
        await anyio.sleep(2.0)
        assert executions["slow"] == frozen < 15
        assert await anyio.to_thread.run_sync(cli, "queues", "resume", "incidents") == 0
        assert await handle.result(timeout=30) == 15
    assert executions["slow"] == 15


async def _ran(n: int) -> bool:
    return executions["slow"] >= n


async def test_a_signal_taken_in_while_paused_starts_no_child_and_ends_no_run_until_resume(
    client: Client, engine: Engine
) -> None:
    """The signal reached the workflow while paused and it ran on: it started its child,
    or returned and the run completed, though it was never resumed."""
    async with running_worker(client, [go_then_child, go_then_return, pause_child]) as worker:
        handles = {
            "p-child": await client.start(go_then_child, run_id="p-child"),
            "p-return": await client.start(go_then_return, run_id="p-return"),
        }
        for run_id in handles:
            await paused_with_a_signal_kept(client, worker, run_id)
        assert await client.list(workflow="pause_child") == []
        for run_id, handle in handles.items():
            await client.resume(run_id)
            assert await handle.result(timeout=20) == ("KEPT" if run_id == "p-child" else "kept")


async def paused_with_a_signal_kept(client: Client, worker: Worker, run_id: str) -> None:
    """Pause the waiting run, signal it, and see the signal taken in and the run let go."""
    await wait_for(lambda: _is(client, run_id, "waiting"), what="the wait")
    await client.pause(run_id)
    await wait_for(lambda: _is(client, run_id, "paused"), what="the pause")
    await client.signal(run_id, "go", "kept")
    await wait_for(lambda: _has(client, run_id, events.SignalReceived), what="the intake")

    async def let_go() -> bool:
        return run_id not in worker.held_runs

    await wait_for(let_go, what="the paused run let go")
    kinds = [type(e).__name__ for e in await client.history(run_id)]
    assert kinds[-1] == "SignalReceived", kinds
    assert await status(client, run_id) == "paused"


async def test_an_ended_run_cannot_be_paused_and_a_paused_one_is_deleted_after_resume(
    client: Client, engine: Engine
) -> None:
    """Pausing a completed run returned in silence (the CLI says it ended); deleting a paused
    run said only "cancel it first", and a cancelled paused run stays paused until resumed."""
    async with running_worker(client, [steady, go_then_return]):
        await (await client.start(steady, run_id="ended-1")).result(timeout=10)
        with pytest.raises(NatflowError, match="already ended \\(completed\\); nothing to pause"):
            await client.pause("ended-1")
        await client.resume("ended-1")  # nothing to resume: left as it is
        await client.start(go_then_return, run_id="held-1")
        await wait_for(lambda: _is(client, "held-1", "waiting"), what="the wait")
        await client.pause("held-1")
        await wait_for(lambda: _is(client, "held-1", "paused"), what="the pause")
        with pytest.raises(NatflowError, match="cancel it first and resume it"):
            await client.delete("held-1")


async def listed_as(client: Client, workflow: str, status: str) -> list[str]:
    return [r.run_id for r in await client.list(workflow=workflow, status=status)]


async def test_the_run_index_says_what_a_run_waits_for_after_a_signal_or_resume_changed_nothing(
    client: Client, engine: Engine
) -> None:
    """The index folds run-level events alone: the claim that took a signal of another name,
    or a resume, made it "running" for good, and list(status="waiting") missed the run."""
    async with running_worker(client, [go_then_return, long_napper]):
        await client.start(go_then_return, run_id="idx-wait")
        await wait_for(lambda: _is(client, "idx-wait", "waiting"), what="the wait")
        await client.signal("idx-wait", "other", 1)  # taken in; the run waits on
        await wait_for(lambda: _has(client, "idx-wait", events.RunSuspended), what="the note")

        async def listed_waiting() -> bool:
            return "idx-wait" in await listed_as(client, "go_then_return", "waiting")

        await wait_for(listed_waiting, what="the index saying waiting")

        await client.start(long_napper, run_id="idx-nap")
        await wait_for(lambda: _has(client, "idx-nap", events.TimerScheduled), what="the nap")
        await client.pause("idx-nap")
        await wait_for(lambda: _is(client, "idx-nap", "paused"), what="the pause")
        await client.resume("idx-nap")

        async def listed_sleeping() -> bool:
            return "idx-nap" in await listed_as(client, "long_napper", "sleeping")

        await wait_for(listed_sleeping, what="the index saying sleeping")
        await client.signal("idx-wait", "go", "done")
        await client.cancel("idx-nap")


@workflow(name="long_napper")
async def long_napper(ctx: WorkflowContext) -> None:
    await ctx.sleep("nap", 3600)
