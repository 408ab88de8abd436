"""Child runs: started once, outcomes recorded in the parent once, parent_close policies."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from natflow import (
    Client,
    InvalidInput,
    RunCancelled,
    RunFailed,
    RunNotFound,
    WorkflowContext,
    workflow,
)
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import dead_letters
from natflow_engine.events import ChildCompleted, ChildFailed, ChildStarted, RunStarted

from tests.helpers import count_lines, running_worker, spawn_worker, stop, wait_for
from tests.test_cli import natflow
from tests.workflows_children import (
    COUNTS_ENV,
    GATE_ENV,
    WORKFLOWS,
    family,
    grandparent,
    kid,
    leaver,
    napper,
)

DEFAULT_TARGET = "tests.workflows_children:make_worker"
OTHER_TARGET = "tests.workflows_children:make_other_worker"


def kinds(events: list[object]) -> list[str]:
    return [e.__struct_config__.tag for e in events]  # type: ignore[attr-defined]


async def status_of(client: Client, run_id: str) -> str:
    return (await client.describe(run_id)).status


async def test_a_parent_gets_each_childs_outcome_once(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    async with (
        running_worker(client, WORKFLOWS),
        running_worker(client, [kid], queue="other"),
    ):
        handle = await client.start(family, 4, run_id="fam-1")

        async def napping() -> bool:
            try:
                return await status_of(client, "fam-1-c4") == "sleeping"
            except RunNotFound:  # not started yet
                return False

        await wait_for(napping, what="the napping child to sleep")
        await client.cancel("fam-1-c4", reason="not needed")
        result = await handle.result(timeout=20)
    assert result == [40, 50, "failed: StepError", "cancelled", 90]
    history = await client.history("fam-1")
    counted = Counter(kinds(history))
    assert counted["child_started"] == 4
    assert counted["child_completed"] == 2 and counted["child_failed"] == 2
    started = [e for e in history if e.__struct_config__.tag == "child_started"]
    assert [e.child_run_id for e in started] == [f"fam-1-c{i}" for i in range(1, 5)]  # type: ignore[attr-defined]
    other = await client.describe("fam-1-c2")
    assert other.queue == "other" and other.parent == "fam-1"
    for i in range(1, 5):
        assert (await client.describe(f"fam-1-c{i}")).parent == "fam-1"
    # The run view shows the parent of a child and the children of a parent.
    shown = (await natflow(nats_server.url, "runs", "show", "fam-1")).stdout.decode()
    rows = [line.split() for line in shown.splitlines() if line.startswith("fam-1-c")]
    assert rows == [
        ["fam-1-c1", "kid", "default", "completed"],
        ["fam-1-c2", "kid", "other", "completed"],
        ["fam-1-c3", "kid", "default", "failed"],
        ["fam-1-c4", "napper", "default", "cancelled"],
    ], shown
    child = (await natflow(nats_server.url, "runs", "show", "fam-1-c2")).stdout.decode()
    assert "parent    fam-1" in child, child


async def test_cancelling_a_parent_cancels_its_children_and_theirs(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(grandparent, run_id="gp-1")

        async def grandchild_sleeps() -> bool:
            try:
                return await status_of(client, "gp-1-c1-c1") == "sleeping"
            except RunNotFound:  # not started yet
                return False

        await wait_for(grandchild_sleeps, what="the grandchild to sleep")
        waiting = await client.describe("gp-1")
        assert waiting.status == "waiting", waiting
        assert waiting.current == "waiting for child run gp-1-c1 (sleepy_parent)", waiting
        await client.cancel("gp-1", reason="stop all")
        with pytest.raises(RunCancelled):
            await handle.result(timeout=10)

        async def all_cancelled() -> bool:
            return all(
                [await status_of(client, r) == "cancelled" for r in ("gp-1-c1", "gp-1-c1-c1")]
            )

        await wait_for(all_cancelled, timeout=15, what="child and grandchild cancelled")
    # The child's outcome met a closed parent: not sent, so not dead-lettered either.
    assert not [d for d in await dead_letters(client.connection) if d.name == "$child"]

    # The parent's view says how its child ended, from the child's own summary (its history
    # holds no outcome: the child was open when the parent closed).
    async def shown_cancelled() -> bool:
        shown = (await natflow(nats_server.url, "runs", "show", "gp-1")).stdout.decode()
        rows = [line.split() for line in shown.splitlines() if line.startswith("gp-1-c1")]
        return rows == [["gp-1-c1", "sleepy_parent", "default", "cancelled"]]

    await wait_for(shown_cancelled, timeout=10, what="the parent's view of its child")


async def test_a_parent_whose_worker_is_killed_while_its_children_run(
    client: Client, engine: Engine, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Real worker processes; the parent's worker (which also runs the default-queue
    children) is SIGKILLed while every child is in flight."""
    counts = tmp_path / "counts.txt"
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    url = nats_server.url
    first = spawn_worker(url, DEFAULT_TARGET, env=env, log=tmp_path / "default-1.log")
    other = spawn_worker(url, OTHER_TARGET, env=env, log=tmp_path / "other.log")
    second = None
    try:
        handle = await client.start("family", 4, run_id="famk")
        kids = [f"famk-c{i}" for i in (1, 2, 3)]

        async def children_in_flight() -> bool:
            try:
                states = [await status_of(client, k) for k in kids]
                napping = await status_of(client, "famk-c4")
                return states == ["running"] * 3 and napping == "sleeping"
            except RunNotFound:  # not started yet
                return False

        await wait_for(children_in_flight, timeout=30, what="all four children in flight")
        stop(first, signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        await client.cancel("famk-c4", reason="not needed")
        for k in kids:
            (gates / k).touch()
        second = spawn_worker(url, DEFAULT_TARGET, env=env, log=tmp_path / "default-2.log")
        assert await handle.result(timeout=40) == [40, 50, "failed: StepError", "cancelled", 90]
    finally:
        for proc in (first, other, second):
            if proc is not None:
                stop(proc)
    assert count_lines(counts) == Counter({f"{k}:kid": 1 for k in kids})
    history = await client.history("famk")
    started = Counter(e.child_run_id for e in history if isinstance(e, ChildStarted))
    ended = Counter(e.child_run_id for e in history if isinstance(e, ChildCompleted | ChildFailed))
    every = Counter({f"famk-c{i}": 1 for i in range(1, 5)})
    assert started == every and ended == every
    for i in range(1, 5):
        starts = [e for e in await client.history(f"famk-c{i}") if isinstance(e, RunStarted)]
        assert len(starts) == 1 and starts[0].parent == "famk"


async def test_parent_close_terminate_terminates_the_child(client: Client, engine: Engine) -> None:
    await parent_closes(client, "terminate", "terminated")


async def test_parent_close_abandon_leaves_the_child_running(
    client: Client, engine: Engine
) -> None:
    await parent_closes(client, "abandon", "sleeping")


async def parent_closes(client: Client, policy: str, child_status: str) -> None:
    run_id = f"leave-{policy}"
    async with running_worker(client, WORKFLOWS):
        with pytest.raises(RunFailed, match="boom"):
            await (await client.start(leaver, policy, run_id=run_id)).result(timeout=10)

        async def child_settled() -> bool:
            return await status_of(client, f"{run_id}-c1") == child_status

        await wait_for(child_settled, timeout=15, what=f"the child {child_status}")
    if policy == "abandon":  # nothing was sent to it
        assert not [
            e
            for e in await client.history(f"{run_id}-c1")
            if e.__struct_config__.tag == "cancel_requested"
        ]


@workflow(name="bad_policy")
async def bad_policy(ctx: WorkflowContext) -> None:
    await ctx.child("kid", 1, parent_close="explode")


async def test_a_bad_parent_close_policy_is_named(client: Client, engine: Engine) -> None:
    async with running_worker(client, [bad_policy]):
        with pytest.raises(RunFailed, match="parent_close must be"):
            await (await client.start(bad_policy, run_id="bad-policy")).result(timeout=10)
    assert InvalidInput.__name__ in (await client.describe("bad-policy")).error.type  # type: ignore[union-attr]


async def test_children_under_a_codec(nats_server: EmbeddedServer, engine: Engine) -> None:
    """With values sealed, the child's input and result and its error still reach the
    parent opened (the result is opened by the parent's worker and sealed again)."""
    from natflow import AesGcmCodec

    codec = AesGcmCodec({"k1": bytes(range(32))}, current="k1")
    sealed = await Client.connect(nats_server.url, codec=codec)
    try:
        async with (
            running_worker(sealed, WORKFLOWS),
            running_worker(sealed, [kid], queue="other"),
        ):
            handle = await sealed.start(family, 4, run_id="fam-sealed")

            async def napping() -> bool:
                try:
                    return await status_of(sealed, "fam-sealed-c4") == "sleeping"
                except RunNotFound:  # not started yet
                    return False

            await wait_for(napping, what="the napping child to sleep")
            await sealed.cancel("fam-sealed-c4")
            assert await handle.result(timeout=20) == [
                40,
                50,
                "failed: StepError",
                "cancelled",
                90,
            ]
        # At rest the parent's record of each child's outcome is sealed too (the worker
        # opens a result to hand it on, and it was recorded in plaintext).
        keyless = await Client.connect(nats_server.url)
        async with keyless:
            events = await keyless.history("fam-sealed")
        results = [bytes(e.result) for e in events if isinstance(e, ChildCompleted)]
        errors = [e.error for e in events if isinstance(e, ChildFailed) and e.error]
        assert results and all(r.startswith(b'{"$natflow_encrypted"') for r in results), results
        assert errors and all(e.sealed for e in errors), errors
    finally:
        await sealed.close()


@workflow(name="squatter")
async def squatter(ctx: WorkflowContext) -> str:
    try:
        await ctx.child("kid", 1, run_id="squatted")
    except RunFailed as failed:
        return failed.error.message
    return "started"


async def test_a_child_id_taken_by_another_workflow_fails_the_child_not_the_parent(
    client: Client, engine: Engine
) -> None:
    await client.start("napper", 3600, run_id="squatted")
    async with running_worker(client, [squatter]):
        message = await (await client.start(squatter, run_id="squat-1")).result(timeout=10)
    assert "exists as a run of workflow 'napper'" in message, message


@workflow
async def adoptee(ctx: WorkflowContext, x: int) -> int:
    return x + 1


@workflow(name="claims_a_kid")
async def claims_a_kid(ctx: WorkflowContext, child_id: str) -> str:
    try:
        return str(await ctx.child(adoptee, 1, run_id=child_id))
    except RunFailed as failed:
        return failed.error.message


async def test_a_child_id_taken_by_a_run_of_the_same_workflow_fails_the_child_not_the_parent(
    client: Client, engine: Engine
) -> None:
    """The start found the run and took it for its child, but its outcome goes to its own
    parent (or nobody): the parent waited for good, "waiting for child run ..."."""
    async with running_worker(client, [adoptee, claims_a_kid]):
        assert await (await client.start(adoptee, 5, run_id="top-kid")).result(timeout=10) == 6
        first = await client.start(claims_a_kid, "shared-kid", run_id="claims-1")
        assert await first.result(timeout=10) == "2"  # the first to name it has it
        again = await client.start(claims_a_kid, "shared-kid", run_id="claims-2")
        top = await client.start(claims_a_kid, "top-kid", run_id="claims-3")
        message = await again.result(timeout=10)
        assert "exists as a child of run 'claims-1'" in message, message
        message = await top.result(timeout=10)
        assert "exists as a top-level run" in message, message


async def test_a_forged_child_outcome_is_rejected_and_the_parent_carries_on(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(grandparent, run_id="forged-1")

        async def waiting() -> bool:
            try:
                return await status_of(client, "forged-1-c1-c1") == "sleeping"
            except RunNotFound:  # not started yet
                return False

        await wait_for(waiting, what="the grandchild to sleep")
        await client.connection.nc.publish("natflow.signal.forged-1.$control.child", b'{"x": 1}')

        async def rejected() -> bool:
            return "signal_rejected" in kinds(await client.history("forged-1"))

        await wait_for(rejected, what="the forged outcome rejected")
        await client.cancel("forged-1-c1-c1")  # the real outcome still arrives
        with pytest.raises(RunFailed):
            await handle.result(timeout=10)  # sleepy_parent: RunCancelled raised, not caught
    events = await client.history("forged-1")
    assert [e.status for e in events if isinstance(e, ChildFailed)] == ["failed"]


async def test_a_parent_with_a_long_run_id_still_gets_children(
    client: Client, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child's id is the parent's with ``-c<n>``: past 128 characters the child's start
    failed (InvalidInput naming a run nobody chose); it is shortened with a digest, as a
    restart's and an on_complete run's are."""
    from tests.workflows_children import COUNTS_ENV, fanout

    monkeypatch.setenv(COUNTS_ENV, str(tmp_path / "counts.txt"))
    async with running_worker(client, WORKFLOWS):
        short = await client.start(fanout, 2, run_id="p")
        handle = await client.start(fanout, 2, run_id="p" * 126)
        assert await handle.result(timeout=20) == await short.result(timeout=20)
    children = [e.child_run_id for e in await client.history(handle.run_id)
                if isinstance(e, ChildStarted)]  # fmt: skip
    assert len(children) == 2 and all(len(c) == 128 for c in children), children


@workflow(name="gives_up_on_its_child")
async def gives_up_on_its_child(ctx: WorkflowContext, policy: str) -> str:
    """Stops waiting for a child (cancels the task awaiting it), then goes on waiting for a
    signal: the child gets its parent_close policy now, not at the parent's end."""
    import asyncio

    waiting = asyncio.ensure_future(ctx.child(napper, 3600, parent_close=policy))
    await ctx.sleep("a moment", 0.2)
    waiting.cancel()
    return str(await ctx.wait_for_signal("done"))


async def test_a_child_let_go_of_gets_its_parent_close_policy_at_once(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [gives_up_on_its_child, napper]):
        for rule, ends_as in (("cancel", "cancelled"), ("terminate", "terminated")):
            parent = await client.start(gives_up_on_its_child, rule, run_id=f"giver-{rule}")
            child = f"giver-{rule}-c2"  # its command comes after the sleep

            async def child_ended(child: str = child, ends_as: str = ends_as) -> bool:
                try:
                    return (await client.describe(child)).status == ends_as
                except RunNotFound:
                    return False

            await wait_for(child_ended, timeout=15, what=f"the child {ends_as}, parent waiting")
            assert (await client.describe(parent.run_id)).status == "waiting"
            await client.signal(parent.run_id, "done", "ok")
            assert await parent.result(timeout=15) == "ok"
