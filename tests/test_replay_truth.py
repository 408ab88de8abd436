"""``ctx.is_replaying``, ``ctx.logger`` and ``ctx.patched`` tell the truth at both ends of replay.

Replay is over exactly when the workflow reaches the end of its recorded history, whatever
kind of command history recorded last.
"""

from __future__ import annotations

import logging

import pytest
from natflow import Client, RunCancelled, RunFailed, WorkflowContext, workflow
from natflow.testing import Replayer
from natflow_engine._engine import Engine
from natflow_engine.events import PatchMarked, SignalWaited, StepCompleted, TimerScheduled

from tests.helpers import running_worker, wait_for

SEEN: list[tuple[str, bool]] = []


def ok(value: str) -> str:
    return value


@workflow(name="fresh_truth")
async def fresh_truth(ctx: WorkflowContext) -> list[bool]:
    first = ctx.is_replaying
    ctx.logger.info("fresh run begins")
    patched = ctx.patched("fresh-change")
    await ctx.step("a", ok, "a")
    return [first, patched]


async def test_a_new_run_is_not_replaying_logs_its_first_line_and_is_patched(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="natflow.workflow")
    async with running_worker(client, [fresh_truth]):
        handle = await client.start(fresh_truth, run_id="fresh-1")
        assert await handle.result(timeout=10) == [False, True]
    lines = [r.getMessage() for r in caplog.records if "fresh run begins" in r.getMessage()]
    assert lines == ["[fresh-1] fresh run begins"]
    assert any(isinstance(e, PatchMarked) for e in await client.history("fresh-1"))


@workflow(name="parked")
async def parked(ctx: WorkflowContext) -> str:
    SEEN.append(("start", ctx.is_replaying))
    await ctx.step("a", ok, "a")
    SEEN.append(("before nap", ctx.is_replaying))
    ctx.logger.info("before nap")
    await ctx.sleep("nap", 60)
    return "done"


async def test_code_before_a_recorded_sleep_is_still_replay(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash after the sleep was recorded: the line before it is not logged again."""
    async with running_worker(client, [parked]):
        await client.start(parked, run_id="parked-1")

        async def sleeping() -> bool:
            return any(isinstance(e, TimerScheduled) for e in await client.history("parked-1"))

        await wait_for(sleeping, what="the sleep recorded")
    SEEN.clear()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="natflow.workflow")
    replay = await Replayer([parked]).replay_run(client, "parked-1")
    assert replay.ok and not replay.finished
    assert SEEN == [("start", True), ("before nap", True)]
    assert not [r for r in caplog.records if "before nap" in r.getMessage()]


@workflow(name="versioned")
async def versioned_v1(ctx: WorkflowContext) -> str:
    await ctx.step("a", ok, "a")
    go = await ctx.wait_for_signal("go")
    return f"v1 {go}"


@workflow(name="versioned")
async def versioned_v2(ctx: WorkflowContext) -> str:
    await ctx.step("a", ok, "a")
    if ctx.patched("p"):
        await ctx.step("new", ok, "new")
    go = await ctx.wait_for_signal("go")
    return f"v2 {go}"


async def test_a_v1_run_parked_on_a_signal_keeps_the_old_path_on_v2(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [versioned_v1]):
        await client.start("versioned", run_id="ver-old")

        async def waiting() -> bool:
            return any(isinstance(e, SignalWaited) for e in await client.history("ver-old"))

        await wait_for(waiting, what="the v1 run waiting for 'go'")
    async with running_worker(client, [versioned_v2]):
        await client.signal("ver-old", "go", "now")
        assert await client.handle("ver-old").result(timeout=10) == "v2 now"
        fresh = await client.start("versioned", run_id="ver-new")
        await client.signal("ver-new", "go", "too")
        assert await fresh.result(timeout=10) == "v2 too"
    old = [e.name for e in await client.history("ver-old") if isinstance(e, StepCompleted)]
    new = [e.name for e in await client.history("ver-new") if isinstance(e, StepCompleted)]
    assert old == ["a"], "the v1 run took the patched path while replaying v1 history"
    assert new == ["a", "new"]


@workflow(name="versioned")
async def versioned_v3(ctx: WorkflowContext) -> list[object]:
    """v2's change kept, its ``patched("p")`` guard removed; and a change of its own."""
    await ctx.step("a", ok, "a")
    await ctx.step("new", ok, "new")
    go = await ctx.wait_for_signal("go")
    ctx.logger.info("v3 after go")
    return [go, ctx.patched("later"), ctx.is_replaying]


async def test_a_patch_guard_removed_once_every_run_took_it_leaves_no_run_replaying(
    client: Client, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that recorded the marker of a ``patched()`` call since removed was "replaying"
    for good: no log line, ``is_replaying`` true and a new change read as an old run's."""
    async with running_worker(client, [versioned_v2]):
        await client.start("versioned", run_id="ver-guarded")

        async def waiting() -> bool:
            return any(isinstance(e, SignalWaited) for e in await client.history("ver-guarded"))

        await wait_for(waiting, what="the v2 run waiting for 'go'")
    caplog.set_level(logging.INFO, logger="natflow.workflow")
    async with running_worker(client, [versioned_v3]):
        await client.signal("ver-guarded", "go", "now")
        assert await client.handle("ver-guarded").result(timeout=10) == ["now", True, False]
    assert [r.getMessage() for r in caplog.records if "v3 after go" in r.getMessage()] == [
        "[ver-guarded] v3 after go"
    ]


BODIES: list[str] = []


def side_effect(value: str) -> str:
    BODIES.append(value)
    return value


@workflow(name="never_ran")
async def never_ran(ctx: WorkflowContext) -> str:
    return await ctx.step("first", side_effect, "first")


async def test_a_cancel_sent_before_any_worker_ran_the_run_stops_it_before_its_first_step(
    client: Client, engine: Engine
) -> None:
    BODIES.clear()
    handle = await client.start(never_ran, run_id="cancel-early")
    await client.cancel("cancel-early", reason="changed my mind")
    async with running_worker(client, [never_ran]):
        with pytest.raises(RunCancelled, match="changed my mind"):
            await handle.result(timeout=10)
    assert BODIES == []
    kinds = [e.__struct_config__.tag for e in await client.history("cancel-early")]
    # No worker had taken it: the engine closed it at once (_unclaimed).
    assert kinds == ["run_started", "run_cancelled"]


@workflow(name="napper")
async def napper(ctx: WorkflowContext) -> str:
    await ctx.sleep("nap", 1.0)
    return "rested"


async def test_a_timer_due_while_no_worker_runs_says_it_waits_for_a_worker(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [napper]):
        handle = await client.start(napper, run_id="nap-1")

        async def sleeping() -> bool:
            return (await handle.status()).status == "sleeping"

        await wait_for(sleeping, what="the run sleeping")

    async def listed_pending() -> bool:
        return [r.run_id for r in await client.list(status="pending")] == ["nap-1"]

    await wait_for(listed_pending, what="list(status='pending') to find the due run")
    info = await handle.status()
    assert info.status == "pending", info
    assert info.current is not None
    assert info.current.startswith("timer 'nap' due since "), info.current
    assert info.current.endswith(", waiting for a worker"), info.current
    (listed,) = await client.list(status="pending")
    assert listed.current == info.current
    async with running_worker(client, [napper]):
        assert await handle.result(timeout=10) == "rested"
    assert (await handle.status()).status == "completed"


MARKS: list[tuple[str, bool]] = []


@workflow(name="every_kind")
async def every_kind(ctx: WorkflowContext) -> str:
    MARKS.append(("start", ctx.is_replaying))
    await ctx.step("a", ok, "a")
    MARKS.append(("after a", ctx.is_replaying))
    ctx.patched("p")
    MARKS.append(("after patch", ctx.is_replaying))
    await ctx.sleep("nap", 0.05)
    MARKS.append(("after nap", ctx.is_replaying))
    go = await ctx.wait_for_signal("go")
    MARKS.append(("after go", ctx.is_replaying))
    return str(go)


# History cut after the last event of each kind: where each mark the code reaches stands.
ENDS_AFTER = {
    "step_completed": {"start": True, "after a": False, "after patch": False},
    "patch_marked": {"start": True, "after a": True, "after patch": False},
    "timer_scheduled": {"start": True, "after a": True, "after patch": True},
    "timer_fired": {"start": True, "after a": True, "after patch": True, "after nap": False},
    "signal_waited": {"start": True, "after a": True, "after patch": True, "after nap": True},
    "signal_received": {
        "start": True,
        "after a": True,
        "after patch": True,
        "after nap": True,
        "after go": False,
    },
}


async def test_replay_ends_at_the_last_recorded_thing_whatever_its_kind(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [every_kind]):
        handle = await client.start(every_kind, run_id="kinds-1")

        async def waiting() -> bool:
            return (await handle.status()).status == "waiting"

        await wait_for(waiting, what="the run waiting for 'go'")
        await client.signal("kinds-1", "go", 1)
        assert await handle.result(timeout=10) == "1"
    events = await client.history("kinds-1")
    tags = [e.__struct_config__.tag for e in events]
    replayer = Replayer([every_kind])
    for kind, expected in ENDS_AFTER.items():
        cut = len(tags) - tags[::-1].index(kind)  # just after the last event of that kind
        MARKS.clear()
        result = replayer.replay(events[:cut], "kinds-1")
        assert result.ok, (kind, result.divergence)
        assert dict(MARKS) == expected, kind


@workflow(name="cancel_kind")
async def cancel_kind(ctx: WorkflowContext) -> str:
    MARKS.append(("start", ctx.is_replaying))
    try:
        return str(await ctx.wait_for_signal("never"))
    finally:
        MARKS.append(("cleanup", ctx.is_replaying))


async def test_replay_ends_at_a_recorded_cancel(client: Client, engine: Engine) -> None:
    async with running_worker(client, [cancel_kind]):
        handle = await client.start(cancel_kind, run_id="cancel-kind")

        async def waiting() -> bool:
            return any(isinstance(e, SignalWaited) for e in await client.history("cancel-kind"))

        await wait_for(waiting, what="the run waiting")  # a worker took it: it cancels it
        await client.cancel("cancel-kind")
        with pytest.raises(RunCancelled):
            await handle.result(timeout=10)
    events = await client.history("cancel-kind")
    assert events[-2].__struct_config__.tag == "cancel_requested"
    MARKS.clear()
    result = Replayer([cancel_kind]).replay(events[:-1], "cancel-kind")
    assert result.ok and result.cancelled == "cancelled"
    assert MARKS == [("start", True), ("cleanup", False)]


@workflow(name="odd_change")
async def odd_change(ctx: WorkflowContext, change: object) -> bool:
    return ctx.patched(change)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("change", [5, "x" * 2_000_000])
async def test_a_change_id_no_history_can_hold_fails_the_run_at_the_call(
    client: Client, change: object
) -> None:
    """An int was recorded as the marker and left the history unreadable (the run held as
    corrupt); 2 MB was refused by the server at every try, the run retried for good."""
    async with running_worker(client, [odd_change]):
        handle = await client.start(odd_change, change)
        with pytest.raises(RunFailed, match="InvalidInput: invalid step name"):
            await handle.result(timeout=10)
