"""The durable core, in one process against a real nats-server."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from natflow import (
    Client,
    NatflowError,
    RunFailed,
    RunInfo,
    RunNotFound,
    StepError,
    WorkflowContext,
    workflow,
)
from natflow_engine import InvalidInput, ensure_streams
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import TERMINAL_EVENTS, Event, StepStarted

from tests.helpers import replay_recorded, running_worker, wait_for

calls: list[str] = []


def record(name: str, value: int) -> int:
    calls.append(name)
    return value


@workflow
async def three_steps(ctx: WorkflowContext, input: dict[str, int]) -> dict[str, int]:
    a = await ctx.step("one", record, "one", input["x"])
    b = await ctx.step("two", record, "two", a + 1)
    c = await ctx.step("three", record, "three", b + 1)
    return {"sum": a + b + c}


async def test_three_step_history_is_plain_json(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [three_steps]):
        handle = await client.start(three_steps, {"x": 1}, run_id="three-1")
        assert await handle.result(timeout=10) == {"sum": 6}

    # Read with a plain nats-py client: no natflow code.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    sub = await js.subscribe("natflow.history.three-1.>", ordered_consumer=True)
    events = []
    while True:
        try:
            msg = await sub.next_msg(timeout=0.5)
        except nats.errors.TimeoutError:
            break
        events.append(json.loads(msg.data))
    await nc.close()
    kinds = [e["type"] for e in events]
    # The last step's outcome is stored with the run's end, in one message.
    assert kinds == [
        "run_started",
        "run_claimed",
        "step_completed",
        "step_completed",
        "run_completed",
    ]
    end = events[-1]
    carried = end.pop("last_step")
    assert [e["name"] for e in events if e["type"] == "step_completed"] == ["one", "two"]
    assert carried["type"] == "step_completed" and carried["name"] == "three"
    assert all(e["v"] == 1 and e["id"] == f"three-1:{i}" for i, e in enumerate(events[:-1], 1))
    assert (carried["v"], carried["id"]) == (1, "three-1:5")
    assert (end["v"], end["id"], end["result"]) == (2, "three-1:6", {"sum": 6})
    # natflow reads it back as one event per position.
    assert [type(e).__name__ for e in await client.history("three-1")] == [
        "RunStarted",
        "RunClaimed",
        "StepCompleted",
        "StepCompleted",
        "StepCompleted",
        "RunCompleted",
    ]


@workflow
async def fan_out(ctx: WorkflowContext, n: int) -> list[int]:
    async def branch(i: int) -> int:
        first = await ctx.step("first", fast_or_slow, i)
        return await ctx.step("second", fast_or_slow, first + 100)

    results = await ctx.parallel(*(branch(i) for i in range(n)))
    rnd = ctx.random().randint(0, 10**6)
    return [*results, rnd]


async def fast_or_slow(i: int) -> int:
    await anyio.sleep(0.001 * ((i * 7) % 5))  # completion order differs from call order
    return i


async def test_parallel_branches_replay_to_the_same_results(client: Client) -> None:
    async with running_worker(client, [fan_out]):
        live = await client.start(fan_out, 6, run_id="fan-1")
        result = await live.result(timeout=10)
    assert result[:6] == [100, 101, 102, 103, 104, 105]
    # A fresh execution of the same history (as after a crash) must agree step by step.
    replay = await replay_recorded(client, fan_out, "fan-1")
    assert replay.ok and replay.finished, replay
    assert replay.result == result


def explode() -> None:
    raise KeyError("missing")


@workflow
async def handles_error(ctx: WorkflowContext) -> str:
    try:
        await ctx.step("explode", explode)
    except StepError as error:
        return f"{error.error.type}: {error.error.message}"
    return "no error"


@workflow
async def fails(ctx: WorkflowContext) -> None:
    await ctx.step("explode", explode)


async def test_step_errors_are_recorded_and_catchable(client: Client) -> None:
    async with running_worker(client, [handles_error, fails]):
        assert await (await client.start(handles_error)).result(timeout=10) == "KeyError: 'missing'"
        handle = await client.start(fails, run_id="fails-1")
        with pytest.raises(RunFailed) as caught:
            await handle.result(timeout=10)
    assert caught.value.error.type == "StepError"
    assert "KeyError" in caught.value.error.message
    assert "raise KeyError" in caught.value.error.traceback
    steps = await client.steps("fails-1")
    assert steps[0].status == "failed" and steps[0].error is not None
    assert steps[0].error.type == "KeyError" and "explode" in steps[0].error.traceback
    assert (await client.describe("fails-1")).status == "failed"


async def test_same_run_id_started_twice_at_once_makes_one_run(client: Client) -> None:
    calls.clear()
    other = await Client.connect(client.connection.url)
    try:
        async with anyio.create_task_group() as tg:
            handles = []

            async def start(c: Client) -> None:
                handles.append(await c.start(three_steps, {"x": 1}, run_id="dup-1"))

            tg.start_soon(start, client)
            tg.start_soon(start, other)
        assert {h.run_id for h in handles} == {"dup-1"}
        async with running_worker(client, [three_steps]):
            assert await client.handle("dup-1").result(timeout=10) == {"sum": 6}
    finally:
        await other.close()
    history = await client.history("dup-1")
    assert sum(type(e).__name__ == "RunStarted" for e in history) == 1
    assert calls == ["one", "two", "three"]


class OrderIn(msgspec.Struct):
    order_id: str
    total: float


@dataclass
class Payment:
    amount: int
    currency: str


@workflow
async def echo(ctx: WorkflowContext, input: object) -> object:
    return input


@workflow
async def typed(ctx: WorkflowContext, input: OrderIn) -> dict[str, object]:
    return {"id": input.order_id, "total": input.total}


@workflow
async def typed_dc(ctx: WorkflowContext, input: Payment) -> str:
    return f"{input.amount} {input.currency}"


async def test_bad_input_is_rejected_and_nothing_is_written(client: Client) -> None:
    for bad in ["a.b", "a b", "a*", "a>", "", "x" * 129]:
        with pytest.raises(InvalidInput, match="run_id"):
            await client.start(three_steps, {"x": 1}, run_id=bad)
    with pytest.raises(InvalidInput, match=r"\$\.total"):
        await client.start(typed, {"order_id": "o1", "total": "lots"}, run_id="typed-1")
    with pytest.raises(InvalidInput, match="amount"):
        await client.start(typed_dc, {"currency": "EUR"}, run_id="typed-2")
    client.connection.max_value_bytes = 1_000_000
    with pytest.raises(InvalidInput, match="max_value_bytes"):
        await client.start(echo, {"x": "y" * 2_000_000}, run_id="big-1")
    with pytest.raises(InvalidInput, match="cannot be encoded"):
        await client.start(echo, {"x": object()}, run_id="weird-1")
    # JSON has no NaN: msgspec wrote it as null, and the workflow got None.
    with pytest.raises(InvalidInput, match=r"holds inf at \['x'\]\[1\]"):
        await client.start(echo, {"x": [1.0, float("inf")]}, run_id="nan-1")
    for run_id in ["typed-1", "typed-2", "big-1", "weird-1", "nan-1"]:
        with pytest.raises(RunNotFound):
            await client.describe(run_id)


async def test_typed_input_reaches_the_workflow(client: Client) -> None:
    async with running_worker(client, [typed, typed_dc]):
        h = await client.start(typed, OrderIn(order_id="o9", total=9.5))
        assert await h.result(timeout=10) == {"id": "o9", "total": 9.5}
        h = await client.start(typed_dc, Payment(amount=3, currency="EUR"))
        assert await h.result(timeout=10) == "3 EUR"


class Unencodable:
    pass


def make_unencodable() -> Unencodable:
    return Unencodable()


def make_huge() -> str:
    return "z" * 2_000_000


def make_nan() -> dict[str, float]:
    return {"mean": float("nan")}


@workflow
async def bad_results(ctx: WorkflowContext) -> list[str]:
    out = []
    steps = (("weird", make_unencodable), ("huge", make_huge), ("mean", make_nan))
    for name, fn in steps:
        try:
            await ctx.step(name, fn)
        except StepError as error:
            out.append(error.error.message)
    return out


async def test_bad_step_results_fail_the_step_with_a_clear_error(client: Client) -> None:
    client.connection.max_value_bytes = 1_000_000
    async with running_worker(client, [bad_results]):
        messages = await (await client.start(bad_results)).result(timeout=10)
    assert "step 'weird'" in messages[0] and "Unencodable" in messages[0]
    assert "step 'huge'" in messages[1] and "max_value_bytes" in messages[1]
    assert "step 'mean'" in messages[2] and "holds nan at ['mean']" in messages[2]


async def test_unknown_run_and_describe(client: Client) -> None:
    with pytest.raises(RunNotFound, match="nope"):
        await client.describe("nope")
    with pytest.raises(RunNotFound):
        await client.steps("nope")
    with pytest.raises(RunNotFound):  # it waited for good
        await anext(aiter(client.watch("nope")))


async def test_arguments_of_the_wrong_kind_are_invalid_input_not_a_python_error(
    client: Client,
) -> None:
    """Each of these raised TypeError, ValueError or OverflowError from deep inside, or (an
    unknown status for events) waited for good."""
    with pytest.raises(InvalidInput, match="start_delay must be at most a hundred years"):
        await client.start("anything", start_delay=10**12)
    for limit in ("5", None, 1.5, True):
        with pytest.raises(InvalidInput, match="limit must be an int"):
            await client.list(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="workflow must be"):
        await client.list(workflow=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown run status 'bogus'"):
        await anext(aiter(client.events(status="bogus")))
    for from_step in (5, ("add",), ("add", 0)):
        with pytest.raises(InvalidInput, match="from_step is a step name"):
            await client.restart("nope", from_step=from_step)  # type: ignore[arg-type]
    for timeout in (0, -1, float("nan")):
        with pytest.raises(InvalidInput, match="connect_timeout must be"):
            await Client.connect(client.connection.url, connect_timeout=timeout)


async def test_result_with_no_time_left_still_gives_a_finished_runs_result(client: Client) -> None:
    async with running_worker(client, [other]):
        handle = await client.start(other)
        assert await handle.result(timeout=10) == 1
        assert await handle.result(timeout=0) == 1  # was TimeoutError "did not finish"


@workflow
async def nobody_serves_me(ctx: WorkflowContext) -> str:
    return await ctx.step("hi", record, "hi", 1) and "served"


@workflow
async def other(ctx: WorkflowContext) -> int:
    return 1


async def test_a_run_nobody_serves_stays_pending_until_a_worker_knows_it(client: Client) -> None:
    handle = await client.start(nobody_serves_me, run_id="lonely-1")
    async with running_worker(client, [other]):
        # Its task waits on its own subject; the worker of `other` is never handed it.
        await wait_for(
            lambda: consumer_exists(client, "natflow-queue-default~other"),
            what="the other worker's consumer",
        )
        info = await client.connection.jsm.stream_info("NATFLOW_TASKS", subjects_filter=">")
        assert info.state.subjects == {"natflow.task.default.nobody_serves_me.lonely-1": 1}
        assert (await handle.status()).status == "pending"
    async with running_worker(client, [nobody_serves_me]):
        assert await handle.result(timeout=10) == "served"


async def consumer_exists(client: Client, name: str) -> bool:
    try:
        await client.connection.jsm.consumer_info("NATFLOW_TASKS", name)
    except nats.js.errors.NotFoundError:
        return False
    return True


@workflow
async def instant(ctx: WorkflowContext) -> str:
    return "done"


async def test_workers_of_one_queue_serving_different_workflows_get_only_their_tasks(
    client: Client,
) -> None:
    """Issue 9: on one consumer per queue a task bounced between two such workers, 1 s per
    bounce. Now each workflow has its own consumer: every task is delivered exactly once."""
    async with running_worker(client, [other]), running_worker(client, [instant]):
        began = time.monotonic()
        handles = [await client.start(instant, run_id=f"instant-{n}") for n in range(20)]
        for handle in handles:
            assert await handle.result(timeout=10) == "done"
        took = time.monotonic() - began
        delivered = 0
        for consumer in await client.connection.jsm.consumers_info("NATFLOW_TASKS"):
            delivered += consumer.delivered.consumer_seq
            assert consumer.num_redelivered == 0, consumer
        assert delivered == 20, delivered
        assert took < 8, f"20 instant runs took {took:.1f} s"


async def test_engine_lists_runs_and_recovers_a_lost_enqueue(client: Client) -> None:
    from natflow_engine.events import RunStarted, utcnow

    await ensure_streams(client.connection)
    # A client that died between creating the run and enqueueing its task:
    await client._runs.history.append(
        "orphan-1",
        RunStarted(
            id="orphan-1:1",
            at=utcnow(),
            workflow="three_steps",
            queue="default",
            input=msgspec.Raw(b'{"x": 2}'),
        ),
        0,
    )
    engine = Engine(client.connection)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        async with running_worker(client, [three_steps]):
            # The engine looks at a start once its grace (START_GRACE, 5 s) has passed.
            assert await client.handle("orphan-1").result(timeout=20) == {"sum": 9}
            h = await client.start(three_steps, {"x": 1}, run_id="listed-1")
            await h.result(timeout=10)

            async def both_listed() -> bool:
                runs = await client.list(workflow="three_steps", status="completed")
                return {"orphan-1", "listed-1"} <= {r.run_id for r in runs}

            await wait_for(both_listed, what="runs in the index")
        tg.cancel_scope.cancel()
    runs = await client.list(limit=1)
    assert [r.run_id for r in runs] == ["listed-1"]


async def test_watch_streams_events_live(client: Client) -> None:
    async with running_worker(client, [three_steps]):
        h = await client.start(three_steps, {"x": 1}, run_id="watched-1")
        seen = []
        with anyio.fail_after(10):
            async for event in client.watch(h.run_id):
                seen.append(type(event).__name__)
                if event.__struct_config__.tag == "run_completed":
                    break
    assert seen[0] == "RunStarted" and seen[-1] == "RunCompleted"


async def test_determinism_helpers_repeat_on_replay(client: Client) -> None:
    @workflow(name="helpers")
    async def helpers(ctx: WorkflowContext) -> list[str]:
        first = [str(ctx.uuid4()), str(ctx.random().random()), ctx.now().isoformat()]
        await ctx.step("s", record, "s", 1)
        return [*first, str(ctx.uuid4()), ctx.now().isoformat(), str(ctx.patched("p1"))]

    async with running_worker(client, [helpers]):
        result = await (await client.start(helpers, run_id="helpers-1")).result(timeout=10)
    assert result[-1] == "True"
    replay = await replay_recorded(client, helpers, "helpers-1")
    assert replay.ok and replay.result == result


async def test_starting_an_existing_run_id_as_another_workflow_names_both(client: Client) -> None:
    """Issue 9: this used to return the other workflow's run without a word."""
    first = await client.start(three_steps, {"x": 1}, run_id="taken-id")
    with pytest.raises(NatflowError, match=r"'three_steps'.*'other'"):
        await client.start(other, run_id="taken-id")
    again = await client.start(three_steps, {"x": 5}, run_id="taken-id")  # same workflow: fine
    assert again.run_id == first.run_id
    history = await client.history("taken-id")
    assert [type(e).__name__ for e in history] == ["RunStarted"]


async def test_list_rejects_an_unknown_status_and_a_limit_below_one(client: Client) -> None:
    """Issue 9: ``status="bogus"`` used to return [] as if no run matched."""
    with pytest.raises(InvalidInput, match=r"bogus.*pending"):
        await client.list(status="bogus")
    with pytest.raises(InvalidInput, match="at least 1"):
        await client.list(limit=0)
    assert await client.list(status="terminated") == []


@pytest.mark.anyio
@pytest.mark.parametrize("feed", ["stored", "subject"])
async def test_result_is_what_history_holds_not_what_the_subject_carried(
    client: Client, feed: str
) -> None:
    """A final event that the stream refused (here: a stale writer's, fenced by the expected
    last sequence) still reaches plain subscribers of the run's subject; result() must not
    take it for the run's outcome, on the stored feed (never republished) or, without it, on
    the run's subject (read back from history)."""
    from natflow_engine import run_level_subject
    from natflow_engine.events import RunCompleted, encode_event, utcnow

    await ensure_streams(client.connection)
    if feed == "subject":
        _without_stored_feed(client)
    run_id = f"fenced-{feed}"
    handle = await client.start("nobody_serves_this", {"x": 1}, run_id=run_id)
    forged = RunCompleted(id="forged", at=utcnow(), result=msgspec.Raw(b'"not recorded"'))
    stale = {"Nats-Expected-Last-Subject-Sequence": "999999"}
    nc = client.connection.nc
    subscriptions = len(nc._subs)

    async def publish_stale_completion() -> None:
        await wait_for(lambda: _true(len(nc._subs) > subscriptions), what="result() to listen")
        await nc.flush()  # the server has the subscription: the forged event reaches it
        await nc.publish(run_level_subject(run_id), encode_event(forged), headers=stale)

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_stale_completion)
        with pytest.raises(TimeoutError):
            await handle.result(timeout=1.5)
    assert (await handle.status()).status == "pending"
    assert len(await client.history(run_id)) == 1  # the stream kept only the start


@workflow
async def done_when_told(ctx: WorkflowContext) -> str:
    return str(await ctx.wait_for_signal("go"))


def _without_stored_feed(client: Client) -> None:
    """As on a history stream that does not republish stored events (an older one this
    connection may not update): result() listens on the run-level subject itself."""
    from natflow_engine._streams import _STORED_FEED

    client.connection.streams_ready = True
    client.connection.extras[_STORED_FEED] = False


async def test_result_looks_again_soon_when_the_final_event_is_not_readable_yet(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the stored feed, a final event can reach the run's subject before a read of
    history shows it (a stream under load). result() must keep looking within moments, not
    wait for its 30 s safety net. The lag is made here by serving two stale reads after the
    run has ended."""
    from natflow_engine.events import TERMINAL_EVENTS

    await ensure_streams(client.connection)
    _without_stored_feed(client)
    runs = client._runs
    real_last = runs.history.last
    stale: list[object] = []
    looks: list[str] = []

    async def last(run_id: str) -> Any:
        looks.append(run_id)
        found = await real_last(run_id)
        if found is not None and isinstance(found[0], TERMINAL_EVENTS) and len(stale) < 2:
            stale.append(found[0])  # the reads right after: lagging, one event behind
            return (await runs.history.read(run_id)).events[-2], found[1] - 1
        return found

    monkeypatch.setattr(runs.history, "last", last)
    async with running_worker(client, [done_when_told]):
        handle = await client.start(done_when_told, run_id="lagging-1")
        await wait_for(lambda: _waiting(client, "lagging-1"), what="the run to wait for its signal")
        before = len(looks)
        async with anyio.create_task_group() as tg:

            async def tell() -> None:
                # result() subscribes before its first look: the run ends after both.
                await wait_for(lambda: _true(len(looks) > before), what="result() to look")
                await client.signal("lagging-1", "go", "now")

            tg.start_soon(tell)
            with anyio.fail_after(5):  # well under the 30 s safety net
                assert await handle.result() == "now"
    assert len(stale) == 2, "the lagging reads were never served"


@pytest.mark.anyio
@pytest.mark.parametrize("feed", ["stored", "subject"])
async def test_result_reads_a_runs_last_event_not_its_whole_history(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch, feed: str
) -> None:
    """result() used to read and fold the whole history of a run it was asked about, then
    read it again when the run ended (a client waiting on many runs read each twice, a long
    run's every event each time). The run's last stored event tells whether it has ended,
    and how: one message per look. On the stored feed the final event heard is the outcome:
    one look in all, where the run's subject needs a second to confirm what it carried."""
    await ensure_streams(client.connection)
    if feed == "subject":
        _without_stored_feed(client)
    runs = client._runs
    described: list[str] = []
    glances: list[str] = []
    real_describe, real_last = runs.describe, runs.history.last

    signalling = False

    async def describe(run_id: str, *, explain: bool = True) -> RunInfo:
        if not signalling:
            described.append(run_id)
        return await real_describe(run_id, explain=explain)

    async def glance(run_id: str) -> Any:
        if not signalling:  # sending a signal looks at the run's last event too
            glances.append(run_id)
        return await real_last(run_id)

    async with running_worker(client, [done_when_told]):
        handle = await client.start(done_when_told, run_id="glance-1")
        await wait_for(lambda: _waiting(client, "glance-1"), what="the run to wait")
        monkeypatch.setattr(runs, "describe", describe)
        monkeypatch.setattr(runs.history, "last", glance)
        got: list[str] = []

        async def wait_result() -> None:
            got.append(await handle.result(timeout=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_result)
            await wait_for(
                lambda: _true(bool(described or glances)), what="result() to look at the run"
            )
            assert described == [], "result() read the whole history of a run still open"
            signalling = True
            await client.signal("glance-1", "go", "now")
            signalling = False
    assert got == ["now"]
    assert described == []
    assert len(glances) == 1 if feed == "stored" else len(glances) >= 2


async def _true(value: bool) -> bool:
    return value


async def test_result_looks_again_when_an_event_from_before_it_subscribed_is_not_stored(
    client: Client, engine: Engine
) -> None:
    """The final event published just before result() subscribes reaches no subscriber, and a
    stream under load may store it only after result()'s first read (the lifecycle test
    waited 30 s for it on a loaded box). Nothing more is published then: result() must look
    again by itself soon, not at its 30 s safety net. The lag is one stale read here."""
    store = client._runs.history
    real_last = store.last
    stale: list[tuple[Event, int]] = []

    async def last(run_id: str) -> tuple[Event, int] | None:
        found = await real_last(run_id)
        if found is not None and isinstance(found[0], TERMINAL_EVENTS) and not stale:
            stale.append(found)  # read before the stream stored it: the event before it
            return (await store.read(run_id)).events[-2], found[1] - 1
        return found

    async with running_worker(client, [done_when_told]):
        handle = await client.start(done_when_told, run_id="unheard-1")
        await wait_for(lambda: _waiting(client, "unheard-1"), what="the run to wait for its signal")
        await client.signal("unheard-1", "go", "now")
        await wait_for(
            lambda: _status_is(client, "unheard-1", "completed"), what="the run to complete"
        )
    store.last = last  # type: ignore[method-assign]
    try:
        with anyio.fail_after(5):  # well under the 30 s safety net
            assert await handle.result() == "now"
    finally:
        store.last = real_last  # type: ignore[method-assign]
    assert len(stale) == 1, "the stale read was never served"


async def _status_is(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


async def _waiting(client: Client, run_id: str) -> bool:
    return (await client.describe(run_id)).status == "waiting"


def test_a_step_shows_when_it_really_started_and_a_duration_rounds_once() -> None:
    """A step_started is written once a step has run a while (at that time): it replaced
    the start its outcome carries, so every step over half a second showed a Took half a
    second short. 0.9995 s showed as "1000 ms"."""
    from datetime import UTC, datetime, timedelta

    from natflow_engine._human import duration
    from natflow_engine._state import fold_steps
    from natflow_engine.events import StepCompleted, StepStarted

    began = datetime(2026, 11, 28, 5, 0, tzinfo=UTC)
    noticed, done = began + timedelta(seconds=0.5), began + timedelta(seconds=3)
    [step] = fold_steps(
        [
            StepStarted(id="r:2", at=noticed, seq=1, name="three", occurrence=1),
            StepCompleted(
                id="r:3", at=done, seq=1, name="three", occurrence=1, result=msgspec.Raw(b"3"),
                started_at=began, attempt=1,
            ),
        ]
    )  # fmt: skip
    assert step.started_at == began and step.finished_at == done
    assert [duration(s) for s in (0.35, 0.9995, 59.96)] == ["350 ms", "1.0 s", "1 min"]


async def test_a_step_cut_short_shows_when_its_body_began(client: Client, engine: Engine) -> None:
    """A step still running when its run ended has no outcome: its step_started carries its
    real start (the event is written half a second later), so its Took is not short."""
    async with running_worker(client, [ends_beside_a_slow_step]):
        handle = await client.start(ends_beside_a_slow_step, run_id="cut-1")
        with pytest.raises(RunFailed):
            await handle.result(timeout=15)
    steps = {s.name: s for s in await client.steps("cut-1")}
    began = next(e for e in await client.history("cut-1") if isinstance(e, StepStarted)).started_at
    assert began is not None and steps["slow"].started_at == began
    assert steps["slow"].started_at <= steps["boom"].started_at + timedelta(seconds=0.2)


async def _slow() -> str:
    await anyio.sleep(30)
    return "never"


async def _boom() -> str:
    await anyio.sleep(1.2)
    raise RuntimeError("boom")


@workflow(name="ends_beside_a_slow_step")
async def ends_beside_a_slow_step(ctx: WorkflowContext) -> list[str]:
    return await ctx.parallel(ctx.step("slow", _slow), ctx.step("boom", _boom))
