"""Cancelling and terminating runs: cleanup runs on cancel, nothing more on terminate."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from natflow import (
    Client,
    NatflowError,
    RunCancelled,
    RunNotFound,
    ServerUnavailable,
    WorkflowContext,
    workflow,
)
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import replay_recorded, running_worker, wait_for

cleanups: list[str] = []


def cleanup(run_id: str) -> str:
    cleanups.append(run_id)
    return "cleaned"


async def long_step(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "done"


@workflow(name="cancellable")
async def cancellable(ctx: WorkflowContext, seconds: float) -> str:
    try:
        await ctx.sleep("wait", seconds)
        return "woke"
    except asyncio.CancelledError:
        await ctx.step("cleanup", cleanup, ctx.run_id)
        raise


@workflow(name="busy")
async def busy(ctx: WorkflowContext, seconds: float) -> str:
    try:
        return await ctx.step("long", long_step, seconds)
    finally:
        await ctx.step("cleanup", cleanup, ctx.run_id)


async def test_cancel_a_sleeping_run_runs_its_cleanup(client: Client, engine: Engine) -> None:
    cleanups.clear()
    async with running_worker(client, [cancellable]):
        handle = await client.start(cancellable, 3600, run_id="cancel-1")

        async def sleeping() -> bool:
            return (await handle.status()).status == "sleeping"

        await wait_for(sleeping, what="the run to sleep")
        await client.cancel("cancel-1", reason="customer left")
        with pytest.raises(RunCancelled, match="customer left"):
            await handle.result(timeout=10)
    info = await client.describe("cancel-1")
    assert info.status == "cancelled" and info.closed_at is not None
    assert cleanups == ["cancel-1"]
    kinds = [e.__struct_config__.tag for e in await client.history("cancel-1")]
    assert kinds[-3:] == ["cancel_requested", "step_completed", "run_cancelled"]
    # A replay cancels at the same point of history and asks for the same cleanup step.
    replay = await replay_recorded(client, cancellable, "cancel-1")
    assert replay.ok and replay.cancelled == "customer left"
    await client.cancel("cancel-1")  # a finished run: nothing happens


async def test_terminate_stops_a_busy_run_at_once(client: Client, engine: Engine) -> None:
    cleanups.clear()
    async with running_worker(client, [busy]):
        handle = await client.start(busy, 30, run_id="term-busy")

        async def running() -> bool:
            steps = await client.steps(handle.run_id)
            return [(s.name, s.status) for s in steps] == [("long", "running")]

        await wait_for(running, what="the run to show its step running")
        with anyio.fail_after(10):
            await client.terminate("term-busy", reason="runaway")
            with pytest.raises(RunCancelled, match="was terminated: runaway") as stopped:
                await handle.result()
            assert stopped.value.terminated
    info = await client.describe("term-busy")
    assert info.status == "terminated"
    assert info.error is not None and info.error.type == "RunTerminated", info.error
    assert cleanups == []  # terminate runs no more workflow code
    # The step the run was in is over: cancelled with the run, not shown running forever.
    [step] = await client.steps("term-busy")
    assert (step.name, step.status) == ("long", "cancelled") and step.finished_at is not None


async def test_cancel_a_busy_run_lets_its_finally_run(client: Client, engine: Engine) -> None:
    cleanups.clear()
    async with running_worker(client, [busy]):
        handle = await client.start(busy, 30, run_id="cancel-busy")

        async def running() -> bool:
            steps = await client.steps(handle.run_id)
            return [(s.name, s.status) for s in steps] == [("long", "running")]

        await wait_for(running, what="the run to show its step running")
        await client.cancel("cancel-busy")
        with pytest.raises(RunCancelled, match="was cancelled") as stopped:
            await handle.result(timeout=10)
        assert not stopped.value.terminated
    assert cleanups == ["cancel-busy"]
    steps = {s.name: s.status for s in await client.steps("cancel-busy")}
    assert steps == {"long": "cancelled", "cleanup": "completed"}


async def test_cancel_an_unknown_run(client: Client) -> None:
    with pytest.raises(RunNotFound):
        await client.cancel("no-such-run")


_gate = asyncio.Event()


async def held_at_the_gate() -> str:
    await _gate.wait()
    return "through"


@workflow(name="gate_then_sleep")
async def gate_then_sleep(ctx: WorkflowContext) -> str:
    await ctx.step("gate", held_at_the_gate)
    await ctx.sleep("nap", 3600)
    return "woke"


async def test_a_terminate_stored_while_the_run_is_held_reaches_it_as_it_goes_to_sleep(
    client: Client,
) -> None:
    """No engine runs, so nothing wakes or nudges the run: the request is only stored. The
    worker letting the run go to sleep must see it (it once looked only for runs waiting for
    a signal, and a sleeping run then kept the request until its timer: an hour here)."""
    from natflow_engine import TERMINATE, send

    _gate.clear()
    async with running_worker(client, [gate_then_sleep]):
        handle = await client.start(gate_then_sleep, run_id="held-terminate")

        async def at_the_gate() -> bool:
            return any(s.name == "gate" for s in await client.steps("held-terminate"))

        await wait_for(at_the_gate, what="the run at its gate")
        await send(client.connection, "held-terminate", TERMINATE, b'"stop"', "t-1")
        _gate.set()
        with pytest.raises(RunCancelled):
            await handle.result(timeout=10)
    assert (await handle.status()).status == "terminated"


steps_run: list[str] = []


async def short_step(run_id: str, i: int) -> int:
    steps_run.append(f"{run_id}:{i}")
    await anyio.sleep(0.2)
    return i


@workflow(name="step_chain")
async def step_chain(ctx: WorkflowContext, steps: int) -> int:
    total = 0
    for i in range(steps):
        total += await ctx.step(f"s{i}", short_step, ctx.run_id, i)
    return total


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["cancel", "terminate", "signal"])
async def test_a_new_run_held_without_a_task_takes_a_wake_up_as_it_goes(
    client: Client, engine: Engine, how: str
) -> None:
    """A new run is held from its start in history, without a task, so a wake-up enqueued
    one: the worker holding the run waited for its handling to end (cancel and terminate
    were ignored until the run completed), and, past the lease period, ran a second
    execution beside it, which ran a step again."""
    from natflow_engine._start_consumers import _consumer_exists

    steps_run.clear()
    async with running_worker(client, [step_chain], lease_ttl=2.0):

        async def taken_from_history() -> bool:
            return await _consumer_exists(client.connection, "default", "step_chain")

        await wait_for(taken_from_history, what="the worker's start consumer")
        handle = await client.start(step_chain, 20, run_id=f"chain-{how}")  # held: no task

        async def going() -> bool:
            return len(steps_run) >= 2

        await wait_for(going, what="the run's first steps")
        if how == "signal":  # a wake-up the run does not wait for: it just goes on
            await client.signal(handle.run_id, "unasked", 1)
            assert await handle.result(timeout=30) == sum(range(20))
        else:
            await getattr(client, how)(handle.run_id, "stop")
            with anyio.fail_after(1.5):  # a step or two, not the lease period or the run
                with pytest.raises(RunCancelled):
                    await handle.result()
    assert len(steps_run) == len(set(steps_run)), "a step ran twice"


async def test_a_run_no_worker_has_taken_is_closed_by_a_cancel_or_terminate(
    client: Client, engine: Engine
) -> None:
    """Only a worker applied a cancel: a run of a workflow nobody serves, or one whose start
    is an hour off, stayed pending (and could not be deleted) until one took it."""

    async def closed(run_id: str) -> str | None:
        status = (await client.describe(run_id)).status
        return status if status in ("cancelled", "terminated") else None

    nobody = await client.start("nobody_serves_this", 1, run_id="unserved")
    await client.cancel(nobody.run_id, "typo in the name")
    assert await wait_for(lambda: closed("unserved"), what="the cancel") == "cancelled"
    with pytest.raises(RunCancelled, match="was cancelled: typo in the name"):
        await nobody.result(timeout=5)
    await client.delete("unserved")
    async with running_worker(client, [cancellable]):
        later = await client.start(cancellable, 1, run_id="an-hour-off", start_delay=3600)
        await client.terminate(later.run_id, "not needed")
        assert await wait_for(lambda: closed("an-hour-off"), what="the terminate") == "terminated"
    assert cleanups.count("an-hour-off") == 0  # no workflow code ran


seen_cancelled: list[str] = []


@workflow(name="minds_cancels")
async def minds_cancels(ctx: WorkflowContext, seconds: float) -> str:
    try:
        await ctx.sleep("nap", seconds)
    except asyncio.CancelledError:
        seen_cancelled.append(ctx.run_id)
        ctx.logger.warning("cancelled while napping")
        raise
    return "rested"


async def test_a_run_let_go_of_while_it_sleeps_sees_no_cancellation(
    client: Client, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker lets go of a sleeping run (and of every run when it stops): the workflow's
    code is closed with natflow's own eviction, not a cancellation, so cancel handlers run
    only for a cancel (they ran, and logged live, at every sleep)."""
    async with running_worker(client, [minds_cancels]):
        handle = await client.start(minds_cancels, 1.5, run_id="napper")
        assert await handle.result(timeout=20) == "rested"
        assert seen_cancelled == []
        assert "cancelled while napping" not in caplog.text
        # A real cancel still reaches the handler.
        other = await client.start(minds_cancels, 60, run_id="napper-2")
        await wait_for(
            lambda: _status_is(client, "napper-2", "sleeping"), timeout=10, what="asleep"
        )
        await client.cancel("napper-2")
        with pytest.raises(RunCancelled):
            await other.result(timeout=20)
        assert seen_cancelled == ["napper-2"]


async def _status_is(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


async def test_a_start_that_fails_for_want_of_the_server_says_to_retry_with_a_run_id(
    nats_server: EmbeddedServer,
) -> None:
    """nats-py sends what it buffered while reconnecting once the server is back: a start
    that raised may land after all, and retried without a run id it made a second run."""
    client = await Client.connect(nats_server.url)
    async with client:
        await client.start("anything", 1, run_id="warm")  # streams known: the start is next
        client._runs.history.retry_budget = 1.0  # the default rides out 30 s
        nats_server.stop()
        with anyio.fail_after(20), pytest.raises(NatflowError, match="run_id=") as raised:
            await client.start("anything", 2)
        assert isinstance(raised.value, ServerUnavailable | TimeoutError)
        with anyio.fail_after(20), pytest.raises(NatflowError) as again:
            await client.start("anything", 3, run_id="chosen")
        assert "run_id=" not in str(again.value)
        # A read that times out while the connection is down says so, not only what it was.
        with anyio.fail_after(20), pytest.raises(TimeoutError, match="connection is down"):
            await client.describe("warm")


cleanup_gate = anyio.Event()
cleanups: list[str] = []


async def gated_cleanup(tag: str) -> str:
    cleanups.append(tag)
    if tag == "first":
        await cleanup_gate.wait()
    cleanups.append(f"{tag} done")
    return tag


@workflow(name="cleans_up_twice")
async def cleans_up_twice(ctx: WorkflowContext) -> str:
    try:
        await ctx.sleep("nap", 3600)
    finally:
        await ctx.step("cleanup", gated_cleanup, "first")
        await ctx.step("cleanup", gated_cleanup, "second")
    return "never"


async def test_a_second_cancel_does_not_cut_the_first_ones_cleanup_short(
    client: Client, engine: Engine
) -> None:
    global cleanup_gate
    cleanup_gate = anyio.Event()
    cleanups.clear()
    async with running_worker(client, [cleans_up_twice]):
        handle = await client.start(cleans_up_twice, run_id="twice")
        await wait_for(lambda: _status_is(client, "twice", "sleeping"), what="the nap")
        await client.cancel("twice", "first")

        async def cleaning() -> bool:
            return cleanups == ["first"]

        await wait_for(cleaning, what="the cleanup running")
        await client.cancel("twice", "again")

        async def both_taken() -> bool:
            kinds = [type(e).__name__ for e in await client.history("twice")]
            return kinds.count("CancelRequested") == 2

        await wait_for(both_taken, what="the second cancel in history")
        cleanup_gate.set()
        with pytest.raises(RunCancelled):
            await handle.result(timeout=10)
    assert cleanups == ["first", "first done", "second", "second done"]
