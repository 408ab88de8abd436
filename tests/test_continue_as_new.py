"""Continue-as-new: a run goes on over fresh stretches of its history under the same id."""

from __future__ import annotations

import signal
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
from natflow import Client, RunCancelled, RunFailed, WorkflowContext, workflow
from natflow_engine import HistoryStore, ensure_streams
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_STREAM
from natflow_engine._timers import TIMERS_BUCKET
from natflow_engine.events import (
    RunContinued,
    RunStarted,
    SignalReceived,
    StepCompleted,
    encode_event,
)

from tests.helpers import (
    add_older_stream,
    count_lines,
    running_engine,
    running_worker,
    spawn_worker,
    stop,
    wait_for,
)
from tests.workflows_continue import (
    COUNTS_ENV,
    WORKFLOWS,
    Loop,
    bad_continuer,
    grower,
    hoarder,
    kid_looper,
    looper,
    napping_looper,
    stubborn,
    swallower,
    take_one,
)

TARGET = "tests.workflows_continue:make_worker"


async def test_a_loop_goes_on_over_stretches_and_each_signal_arrives_once(
    client: Client, engine: Engine
) -> None:
    """Signals sent all through a run that switches stretches every 3 steps (so many land
    around a switch: moved into the old stretch and carried, or left for the new one) each
    reach the workflow exactly once; a resent signal id is not delivered twice."""
    notes = 15
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(
            looper, Loop(total=45, per_stretch=3, notes=notes), run_id="l-1"
        )
        for i in range(notes):
            await client.signal("l-1", "note", i, signal_id=f"note-{i}")
            if i % 5 == 0:
                await client.signal("l-1", "note", i, signal_id=f"note-{i}")  # a resend
            await anyio.sleep(0.02)
        result = await handle.result(timeout=60)
    assert result["done"] == 45
    assert result["stretches"] == 15
    assert sorted(result["notes"]) == list(range(notes)), result["notes"]
    info = await client.describe("l-1")
    assert info.status == "completed" and info.stretch == 15
    events = await client.history("l-1")
    first = events[0]
    assert isinstance(first, RunContinued) and first.stretch == 15
    assert first.run_started_at is not None and info.created_at == first.run_started_at
    # History holds the last stretch only: its steps, none of the older stretches'.
    steps = [e for e in events if isinstance(e, StepCompleted)]
    assert len(steps) == 3 and min(s.seq for s in steps) == first.base_seq + 1
    # Every id of every note reached history once, over all stretches: the last stretch
    # holds those still untaken (carried) or sent after its switch.
    received = [e for e in events if isinstance(e, SignalReceived)] + list(first.signals)
    assert len({e.signal_seq for e in received}) == len(received)
    steps_view = await client.steps("l-1")
    assert [s.name for s in steps_view] == ["tick"] * 3


async def test_older_step_events_are_ignored_then_purged_by_the_engine(
    nats_server: EmbeddedServer,
) -> None:
    """A continuation's rollup drops the run's older run-level events at once; its older step
    events (on ``.step``) stay until the engine purges them, and readers ignore them meanwhile."""
    client = await Client.connect(nats_server.url)
    try:
        async with running_worker(client, WORKFLOWS):  # no engine yet
            handle = await client.start(looper, Loop(total=6, per_stretch=3), run_id="purge-1")
            assert (await handle.result(timeout=30))["stretches"] == 2
        jsm = client.connection.jsm
        run_subjects = "natflow.history.purge-1.*"
        stale = await jsm.stream_info(HISTORY_STREAM, subjects_filter=run_subjects)
        # 3 steps a stretch; the last stretch's last step is stored with the run's end.
        assert (stale.state.subjects or {}).get("natflow.history.purge-1.step") == 5
        events = await client.history("purge-1")
        assert isinstance(events[0], RunContinued)
        assert len([e for e in events if isinstance(e, StepCompleted)]) == 3
        # Ids go on from the older stretch's events, its last step (recorded as the
        # workflow continued right after it) counted: one id per position, none reused.
        positions = [int(e.id.rpartition(":")[2]) for e in events]
        first = events[0].events_before + 1
        assert positions == list(range(first, first + len(events)))
        assert first == 1 + 1 + 3 + 1  # start, claim, 3 steps, then the continuation

        async def purged() -> bool:
            info = await jsm.stream_info(
                HISTORY_STREAM, subjects_filter="natflow.history.purge-1.*"
            )
            return (info.state.subjects or {}).get("natflow.history.purge-1.step") == 2

        async with running_engine(nats_server.url):
            await wait_for(purged, timeout=15, what="the older stretch's steps purged")
        assert events == await client.history("purge-1")
    finally:
        await client.close()


async def test_a_child_started_in_a_later_stretch_gets_its_own_id(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        result = await (await client.start(kid_looper, [], run_id="kl-1")).result(timeout=30)
    assert result == [10, 20, 30]
    kids = [await client.describe(f"kl-1-c{i}") for i in (1, 2, 3)]
    assert [k.status for k in kids] == ["completed"] * 3
    assert [k.result for k in kids] == [10, 20, 30]
    assert all(k.parent == "kl-1" for k in kids)


async def test_timers_of_an_older_stretch_do_not_outlive_it(client: Client, engine: Engine) -> None:
    """Stretch 1 continues with a one-hour sleep pending: its timer leaves the timer index,
    and stretch 2's own sleep (a later position) wakes the run."""
    kv = await client.connection.js.key_value(TIMERS_BUCKET)

    async def timer_keys() -> list[str]:
        try:
            return [k for k in await kv.keys() if k.startswith("nap-1.")]
        except Exception:  # no keys at all
            return []

    async with running_worker(client, WORKFLOWS):
        handle = await client.start(napping_looper, 1, run_id="nap-1")

        async def sleeping_in_stretch_2() -> bool:
            info = await client.describe("nap-1")
            return info.stretch == 2 and info.status == "sleeping"

        await wait_for(sleeping_in_stretch_2, what="stretch 2 sleeping")
        start = (await client.history("nap-1"))[0]
        assert isinstance(start, RunContinued)

        async def only_new_timers() -> bool:
            keys = await timer_keys()
            return bool(keys) and all(int(k.rpartition(".")[2]) > start.base_seq for k in keys)

        await wait_for(only_new_timers, what="only stretch 2's timer indexed")
        assert await handle.result(timeout=20) == 2
    await wait_for(lambda: _none(timer_keys), what="no timer left")


async def _none(keys: object) -> bool:
    return not await keys()  # type: ignore[operator]


async def test_bad_input_to_continue_as_new_is_named(client: Client, engine: Engine) -> None:
    async with running_worker(client, WORKFLOWS):
        with pytest.raises(RunFailed) as failed:
            await (await client.start(bad_continuer, 1, run_id="bad-c")).result(timeout=20)
        # An except Exception around it does not stop the continuation.
        assert await (await client.start(swallower, 0, run_id="sw-1")).result(timeout=20) == 1
    assert failed.value.error.type == "InvalidInput"
    assert "ctx.continue_as_new" in failed.value.error.message
    assert "not a number" in failed.value.error.message or "int" in failed.value.error.message
    assert (await client.describe("bad-c")).stretch == 1  # nothing was rolled up
    assert (await client.describe("sw-1")).stretch == 2


async def test_a_large_new_input_is_stored_by_reference_and_one_over_the_limit_named(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        done = await (await client.start(grower, "x" * 100, run_id="grow-1")).result(20)
        assert done == "100000 characters"
        first = (await HistoryStore(client.connection).read("grow-1")).events[0]
        assert isinstance(first, RunContinued) and bytes(first.input).startswith(b'{"$natflow_ref"')
        client.connection.max_value_bytes = 50_000  # the worker shares this connection
        with pytest.raises(RunFailed, match="max_value_bytes"):
            await (await client.start(grower, "y" * 100, run_id="grow-2")).result(20)
    assert (await client.describe("grow-2")).stretch == 3  # 100, 1,000, 10,000: then refused


async def test_many_untaken_signals_are_carried_by_reference_in_one_small_event(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(hoarder, 40, run_id="hoard-1")

        async def waiting() -> bool:
            return (await client.describe("hoard-1")).status == "waiting"

        await wait_for(waiting, what="hoard-1 waiting for go")
        for i in range(40):
            await client.signal("hoard-1", "note", f"{i:04d}" + "n" * 5000)
        await client.signal("hoard-1", "go")
        assert await handle.result(timeout=30) == [5004] * 40
    first = (await HistoryStore(client.connection).read("hoard-1")).events[0]
    assert isinstance(first, RunContinued) and len(first.signals) == 40
    assert len(encode_event(first)) < 64 * 1024


async def test_signals_carried_over_several_stretches_are_taken_one_per_stretch(
    client: Client, engine: Engine
) -> None:
    """With two or more signals carried, the next stretch took one, continued, and was
    blocked: replay took the signals left over as history the workflow no longer asked for."""
    handle = await client.start(take_one, [], run_id="take-1")
    for i in range(4):
        await client.signal("take-1", "s", i)  # all moved in by the first stretch
    async with running_worker(client, WORKFLOWS):
        assert await handle.result(timeout=30) == [0, 1, 2, 3]
    assert (await client.describe("take-1")).stretch == 4


async def test_a_cancelled_workflow_cannot_continue_as_new_instead(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(stubborn, 1, run_id="stub-1")

        async def sleeping() -> bool:
            return (await client.describe("stub-1")).status == "sleeping"

        await wait_for(sleeping, what="stub-1 sleeping")
        await client.cancel("stub-1", reason="enough")
        with pytest.raises(RunCancelled):
            await handle.result(timeout=20)
    assert (await client.describe("stub-1")).stretch == 1


async def test_a_worker_killed_mid_loop_resumes_in_its_stretch(
    client: Client, engine: Engine, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    counts = tmp_path / "counts"
    env = {COUNTS_ENV: str(counts)}
    first = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "w1.log")
    second = None
    try:
        handle = await client.start(looper, Loop(total=60, per_stretch=7), run_id="kill-1")

        async def some_ticks() -> bool:
            return sum(count_lines(counts).values()) >= 25

        await wait_for(some_ticks, timeout=30, what="25 ticks")
        stop(first, signal.SIGKILL)
        killed_at = sum(count_lines(counts).values())
        second = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "w2.log")
        result = await handle.result(timeout=60)
    finally:
        stop(first)
        if second is not None:
            stop(second, signal.SIGTERM)
    assert result["done"] == 60 and result["stretches"] == 9
    ran = Counter(line.rsplit(":", 1)[1] for line in counts.read_text().splitlines())
    assert set(ran) == {str(n) for n in range(60)}
    # Only the step in flight at the kill may have run twice.
    assert sum(ran.values()) <= 61, (killed_at, ran)
    assert (await client.describe("kill-1")).stretch == 9


async def test_an_older_history_stream_is_updated_to_allow_rollups(
    nats_server: EmbeddedServer,
) -> None:
    """A store created by a natflow before continue-as-new has no allow_rollup_hdrs on its
    history stream: ensure_streams turns it on in place (messages kept)."""
    client = await Client.connect(nats_server.url)
    try:
        jsm = client.connection.jsm
        await add_older_stream(client, HISTORY_STREAM, allow_rollup_hdrs=False)
        await client.connection.js.publish("natflow.history.kept.run", b"{}")
        await ensure_streams(client.connection)
        info = await jsm.stream_info(HISTORY_STREAM)
        assert info.config.allow_rollup_hdrs is True
        assert info.state.messages == 1
    finally:
        await client.close()


def test_a_continued_stretch_is_a_start_to_every_reader() -> None:
    """Readers that look for a run's first event as its start (fold, wake, replay) take a
    run_continued for one: it is a kind of run_started."""
    assert issubclass(RunContinued, RunStarted)


async def test_a_continued_run_is_shown_and_restarted_from_its_last_stretch(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    from tests.test_cli import natflow

    async with running_worker(client, WORKFLOWS):
        done = await (
            await client.start(looper, Loop(total=7, per_stretch=3), run_id="rs-1")
        ).result(20)
        assert done["stretches"] == 3
        shown = (await natflow(nats_server.url, "runs", "show", "rs-1")).stdout.decode()
        assert "stretch   3 (2 before, continued as new)" in shown, shown
        # The last stretch ran one tick (the 7th); restart from it: the new run begins with
        # that stretch's start, so it runs that tick again and ends alike.
        again = await client.restart("rs-1", from_step=("tick", 1))
        assert await again.result(timeout=20) == done
    info = await client.describe(again.run_id)
    assert info.restarted_from == "rs-1" and info.stretch == 3
    assert info.created_at > (await client.describe("rs-1")).created_at


@workflow(name="key_drawer")
async def key_drawer(ctx: WorkflowContext, keys: list[str]) -> list[str]:
    keys.append(str(ctx.uuid4()))  # say, an idempotency key for this stretch's work
    if len(keys) < 3:
        ctx.continue_as_new(keys)
    return keys


async def test_each_stretch_draws_its_own_random_values_and_old_stretches_keep_theirs(
    client: Client,
) -> None:
    """Every stretch was seeded by the run id alone: ctx.uuid4() gave one key in all."""
    from natflow._replay import WorkflowState
    from natflow_engine import History

    async with running_worker(client, [key_drawer]):
        handle = await client.start(key_drawer, [], run_id="keys")
        keys = await handle.result(timeout=15)
    assert len(set(keys)) == 3, keys
    # A stretch written before (no ``reseeded``) replays with the run id's seed, as it ran.
    last = (await client.history("keys"))[0]
    assert isinstance(last, RunContinued) and last.reseeded
    older = msgspec.structs.replace(last, reseeded=False)
    fresh = WorkflowState(key_drawer, History("keys", [RunStarted(**{
        f: getattr(last, f) for f in RunStarted.__struct_fields__})]))  # fmt: skip
    assert WorkflowState(key_drawer, History("keys", [older])).seed == fresh.seed
    assert WorkflowState(key_drawer, History("keys", [last])).seed != fresh.seed


def test_a_continuation_carries_the_most_recent_signal_ids_not_the_last_in_sort_order() -> None:
    """The ids carried were the alphabetically largest: a late duplicate of a recent
    ``order-42`` was delivered again after a continuation that kept ``z...`` ids instead."""
    from natflow._replay import WorkflowState
    from natflow_engine import History

    now = datetime.now(UTC)
    start = RunContinued(
        id="sig:1", at=now, workflow="take_one", queue="default", signal_ids=["z-1", "z-2"]
    )
    received = [
        SignalReceived(
            id=f"sig:{n}", at=now, signal_seq=n, name="s", payload=msgspec.Raw(b"1"), signal_id=i
        )
        for n, i in enumerate(["order-42", "a-7"], start=2)
    ]
    state = WorkflowState(take_one, History("sig", [start, *received]))
    assert state.recent_signal_ids(2) == ["order-42", "a-7"]
    assert state.recent_signal_ids(3) == ["z-2", "order-42", "a-7"]


def test_a_continued_run_keeps_its_priority() -> None:
    """The next stretch's run_continued named no priority: a run started with priority=10
    waited for a limit's slot behind runs of none once it continued."""
    from natflow._continuation import next_stretch
    from natflow._replay import WorkflowState
    from natflow_engine import History

    start = RunStarted(
        id="pri:1",
        at=datetime.now(UTC),
        workflow="take_one",
        queue="default",
        input=msgspec.Raw(b"[]"),
        priority=10,
    )
    state = WorkflowState(take_one, History("pri", [start]))
    following = next_stretch(state, "pri", b"[1]", "pri:2", 1)
    assert following.priority == 10 and following.run_started_at == start.at
