"""Two workers on one run at once: one recording per step, one winner, a quiet loser."""

from __future__ import annotations

import logging
from collections import Counter

import anyio
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow._execution import Outcome, RunExecution, StepRuntime
from natflow._pulse import Pulse
from natflow_engine._leases import Leases
from natflow_engine._runs import Runs
from natflow_engine._tasks import Task, enqueue
from natflow_engine.events import RunClaimed, RunCompleted, StepCompleted, StepStarted
from nats.aio.msg import Msg

from tests.helpers import running_worker, wait_for

RUN = "contested-1"


def stepping_back(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "stepping back" in r.getMessage()]


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing above INFO from natflow's run handling, and no traceback anywhere."""
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info is not None or r.exc_text
    ]
    assert not loud, [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("first_lease", "release_when", "loser_says"),
    [
        # A's heartbeat is slow: it finds out from its next (fenced) append.
        (30.0, "b_step_started", "another worker took it over; stepping back"),
        # Same, but A's step ends right after B's claim, before B appends anything more:
        # A's append then meets B's claim, which sits at the position A is appending to.
        (30.0, "b_claimed", "another worker took it over; stepping back"),
        # A's heartbeat is quick: it finds out from its lease before its step ends.
        (3.0, "a_stepped_back", "lease taken by another worker; stepping back"),
    ],
    ids=["fenced-append", "fenced-append-right-after-claim", "lease-renewal"],
)
async def test_two_workers_mid_flight_record_each_step_once(
    client: Client,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    first_lease: float,
    release_when: str,
    loser_says: str,
) -> None:
    caplog.set_level(logging.INFO)

    async def unreachable(self: Pulse, msg: Msg) -> None:
        """A's pings go unanswered (its heartbeat connection cut off, say): a worker handed
        the run's task cannot learn that A still holds it, and takes the run over."""

    monkeypatch.setattr(Pulse, "on_ping", unreachable)
    gates = [anyio.Event(), anyio.Event()]  # one per entry into 'hold': A's, then B's
    entered: list[str] = []

    async def hold(value: int) -> int:
        gate = gates[len(entered)]
        entered.append("hold")
        await gate.wait()
        return value * 10

    def add(value: int, n: int) -> int:
        return value + n

    @workflow(name="contested")
    async def contested(ctx: WorkflowContext, input: int) -> list[int]:
        held = await ctx.step("hold", hold, input)
        first = await ctx.step("add", add, held, 1)
        second = await ctx.step("add", add, first, 1)
        return [held, first, second]

    async def claims() -> list[str]:
        return [e.worker for e in await client.history(RUN) if isinstance(e, RunClaimed)]

    async with running_worker(client, [contested], identity="worker-a", lease_ttl=first_lease):
        handle = await client.start(contested, 4, run_id=RUN)

        async def a_in_step() -> bool:
            history = await client.history(RUN)
            return any(isinstance(e, StepStarted) for e in history)

        await wait_for(a_in_step, what="worker A inside step 'hold'")
        # Force a second worker onto the same run: a task for it on a queue only B serves.
        assert await enqueue(client.connection, "other", Task(run_id=RUN, workflow="contested"))
        async with running_worker(client, [contested], queue="other", identity="worker-b"):

            async def b_claimed() -> bool:
                return await claims() == ["worker-a", "worker-b"] and len(entered) == 2

            await wait_for(b_claimed, what="worker B to claim the run and enter 'hold'")
            if release_when == "b_step_started":

                async def b_step_started() -> bool:
                    history = await client.history(RUN)
                    return sum(isinstance(e, StepStarted) for e in history) == 2

                await wait_for(b_step_started, what="worker B's step_started")
            elif release_when == "a_stepped_back":

                async def a_stepped_back() -> bool:
                    return bool(stepping_back(caplog))

                await wait_for(a_stepped_back, what="worker A to see its lease taken")
            # A's step body returns first: recording it must be refused, and A step back.
            gates[0].set()

            async def loser_logged_or_run_closed() -> bool:
                return bool(stepping_back(caplog)) or (await client.describe(RUN)).is_closed

            await wait_for(loser_logged_or_run_closed, what="worker A to step back")
            gates[1].set()
            assert await handle.result(timeout=10) == [40, 41, 42]

    history = await client.history(RUN)
    completed = Counter((e.name, e.occurrence) for e in history if isinstance(e, StepCompleted))
    assert completed == Counter({("hold", 1): 1, ("add", 1): 1, ("add", 2): 1}), [
        (type(e).__name__, e.id, getattr(e, "name", getattr(e, "worker", ""))) for e in history
    ]
    assert sum(isinstance(e, RunCompleted) for e in history) == 1
    assert await claims() == ["worker-a", "worker-b"]
    assert (await client.describe(RUN)).worker == "worker-b"
    lines = stepping_back(caplog)
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.INFO, f"run {RUN}: {loser_says}")
    ]
    assert_quiet(caplog)


async def test_simultaneous_claims_have_one_winner(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Two executions that read the same history claim at once: one runs, one steps back."""
    caplog.set_level(logging.INFO)
    calls: list[int] = []

    def body(value: int) -> int:
        calls.append(value)
        return value + 1

    @workflow(name="raced")
    async def raced(ctx: WorkflowContext, input: int) -> int:
        return await ctx.step("only", body, input)

    await client.start(raced, 3, run_id="raced-1")
    store = client._runs.history
    executions = [
        RunExecution(
            workflow=raced,
            history=await store.read("raced-1"),
            store=store,
            conn=client.connection,
            identity=f"exec-{i}",
            runtime=StepRuntime(),
        )
        for i in (1, 2)
    ]
    outcomes: list[Outcome] = []

    async def drive(execution: RunExecution) -> None:
        outcomes.append(await execution.execute())

    async with anyio.create_task_group() as tg:
        for execution in executions:
            tg.start_soon(drive, execution)

    assert sorted(o.value for o in outcomes) == ["completed", "lost"], outcomes
    history = await client.history("raced-1")
    assert sum(isinstance(e, RunClaimed) for e in history) == 1
    assert sum(isinstance(e, StepCompleted) for e in history) == 1
    assert (await client.describe("raced-1")).result == 4
    lines = stepping_back(caplog)
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.INFO, "run raced-1: claimed by another worker first; stepping back")
    ]
    assert calls == [3], "the loser of the claim ran the step body anyway"
    assert_quiet(caplog)


async def test_simultaneous_starts_of_one_id_report_one_creation(client: Client) -> None:
    """Two starters of one run id: exactly one is told it created the run."""
    other = await Client.connect(client.connection.url)
    try:
        results: list[tuple[str, bool]] = []

        async def start(c: Client, value: bytes) -> None:
            results.append(await Runs(c.connection).start("anything", "default", value, "dup-2"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(start, client, b"1")
            tg.start_soon(start, other, b"2")
    finally:
        await other.close()
    assert sorted(created for _, created in results) == [False, True], results


@pytest.mark.anyio
@pytest.mark.parametrize("writer", ["gone", "free"])
async def test_a_lease_written_over_by_a_worker_that_let_the_run_go_is_written_back(
    client: Client, caplog: pytest.LogCaptureFixture, writer: str
) -> None:
    """A worker handed the run's task (a redelivery read before the holder's claim landed)
    writes its lease beside its own claim, which loses; it lets the run go. The holder's
    heartbeat finds its lease written over, asks the writer, and keeps the run: stepping
    back would leave the run to no one until its task came back, and run the step again."""
    caplog.set_level(logging.INFO)
    gate = anyio.Event()
    calls: list[int] = []

    async def hold(value: int) -> int:
        calls.append(value)
        await gate.wait()
        return value * 10

    @workflow(name="overwritten")
    async def overwritten(ctx: WorkflowContext, input: int) -> int:
        return await ctx.step("hold", hold, input)

    run_id = f"overwritten-{writer}"
    leases = Leases(client.connection)
    async with running_worker(client, [overwritten], identity="holder", lease_ttl=1.5):
        handle = await client.start(overwritten, 4, run_id=run_id)

        async def inside() -> bool:
            return bool(calls)

        await wait_for(inside, what="the holder inside its step")
        found = await leases.get(run_id)
        assert found is not None and found[0].worker == "holder"
        if writer == "gone":  # the writer's process is gone: nothing answers its pings
            other = "gone-worker"
            await leases.acquire(run_id, other, found[0].queue, found[0].ack_subject, 1.5)
        else:  # alive, serving other runs: it answers that it does not hold this one
            other = "other-worker"
            async with running_worker(client, [overwritten], identity=other, queue="unused"):
                await leases.acquire(run_id, other, found[0].queue, found[0].ack_subject, 1.5)
                await wait_for(lambda: written_back(caplog), what="the lease written back")

        await wait_for(lambda: written_back(caplog), what="the lease written back")
        found = await leases.get(run_id)
        assert found is not None and found[0].worker == "holder"
        gate.set()
        assert await handle.result(timeout=10) == 40
    history = await client.history(run_id)
    assert [e.worker for e in history if isinstance(e, RunClaimed)] == ["holder"]
    assert calls == [4]
    assert not stepping_back(caplog)
    assert_quiet(caplog)


async def written_back(caplog: pytest.LogCaptureFixture) -> bool:
    return any("written back" in r.getMessage() for r in caplog.records)


async def test_a_run_let_go_answers_free_before_its_task_is_acknowledged(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that lets a waiting run go is asked by the worker its next task reaches (a
    wake-up enqueued right after): the answer must be "free" from the acknowledgement on, or
    that worker leaves the run for a whole lease period."""

    @workflow(name="napping")
    async def napping(ctx: WorkflowContext, input: int) -> int:
        await ctx.sleep("long", 3600)
        return input

    heard: list[bool] = []
    ack_sync = Msg.ack_sync

    async def acking(self: Msg, timeout: float = 1.0) -> Msg:
        if self.subject.endswith(".nap-1"):
            heard.append(worker._holds("nap-1"))
        return await ack_sync(self, timeout=timeout)

    monkeypatch.setattr(Msg, "ack_sync", acking)
    async with running_worker(client, [napping]) as worker:
        await client.start(napping, 1, run_id="nap-1")

        async def let_go() -> bool:
            return bool(heard)

        await wait_for(let_go, what="the run let go")
    assert heard == [False]
