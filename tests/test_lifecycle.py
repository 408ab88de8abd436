"""Lifecycle events: one JSON message per run status change, for any NATS client."""

from __future__ import annotations

import json

import anyio
import nats
import nats.errors
import pytest
from natflow import Client, LifecycleEvent, NatflowError, RunFailed, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._lifecycle import lifecycle_subject, workflow_token
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_worker


@workflow(name="flaky")
async def flaky(ctx: WorkflowContext, fail: bool) -> str:
    await ctx.step("work", lambda: "done")
    if fail:
        raise ValueError("flaky failed")
    return "ok"


@workflow(name="other")
async def other(ctx: WorkflowContext, fail: bool) -> str:
    if fail:
        raise ValueError("other failed")
    return "ok"


async def _close(client: Client, run_ids: list[str]) -> None:
    for run_id in run_ids:
        with pytest.raises(RunFailed):
            await client.handle(run_id).result(timeout=20)


async def _drain(url: str, durable: str, want: int) -> list[dict[str, object]]:
    """What a plain nats-py subscriber on a durable pull consumer receives: at least
    ``want`` messages (waiting for them), and then whatever else arrives within a second."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "natflow.lifecycle.flaky.failed.*", durable=durable, stream="NATFLOW_LIFECYCLE"
        )
        got: list[dict[str, object]] = []
        with anyio.move_on_after(20):
            while len(got) < want:
                try:
                    for msg in await sub.fetch(1, timeout=1):
                        got.append(json.loads(msg.data))
                        await msg.ack()
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
        try:
            for msg in await sub.fetch(10, timeout=1):
                got.append(json.loads(msg.data))
                await msg.ack()
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        return got
    finally:
        await nc.close()


async def test_a_plain_subscriber_sees_one_workflows_failures_and_catches_up(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [flaky, other]):
        # The subscriber exists from the start (a durable consumer), then goes away.
        assert await _drain(nats_server.url, "pager", 0) == []
        first = [f"f-fail-{i}" for i in range(3)]
        for run_id in first:
            await client.start(flaky, True, run_id=run_id)
        for i in range(2):
            await client.start(flaky, False, run_id=f"f-ok-{i}")
            await client.start(other, True, run_id=f"o-fail-{i}")
        await _close(client, [*first, "o-fail-0", "o-fail-1"])
        seen = await _drain(nats_server.url, "pager", 3)
        assert sorted(m["run_id"] for m in seen) == first
        # Disconnected now; these fail while nobody listens.
        later = ["f-fail-late-1", "f-fail-late-2"]
        for run_id in later:
            await client.start(flaky, True, run_id=run_id)
        await client.start(other, True, run_id="o-fail-late")
        await _close(client, [*later, "o-fail-late"])
        caught_up = await _drain(nats_server.url, "pager", 2)
    assert sorted(m["run_id"] for m in caught_up) == later
    for message in seen + caught_up:
        assert message["workflow"] == "flaky" and message["status"] == "failed"
        assert message["previous"] == "running"
        assert message["error"]["message"] == "flaky failed"  # type: ignore[index]


async def test_client_events_follow_status_changes_in_order(client: Client, engine: Engine) -> None:
    got: list[LifecycleEvent] = []

    async def follow() -> None:
        async for event in client.events("flaky", durable="mine", from_start=True):
            got.append(event)
            if event.status == "completed":
                return

    async with running_worker(client, [flaky]):
        await client.start(flaky, False, run_id="followed")
        with anyio.fail_after(20):
            await follow()
    assert [(e.run_id, e.status) for e in got] == [
        ("followed", "pending"),
        ("followed", "running"),
        ("followed", "completed"),
    ]
    assert got[-1].result == "ok" and got[-1].previous == "running"
    assert len({e.seq for e in got}) == 3
    # The same durable name later goes on after what it has seen.
    async with running_worker(client, [flaky]):
        await client.start(flaky, False, run_id="followed-2")
        got.clear()
        with anyio.fail_after(20):
            await follow()
    assert [(e.run_id, e.status) for e in got] == [
        ("followed-2", "pending"),
        ("followed-2", "running"),
        ("followed-2", "completed"),
    ]
    # Another filter under the same name: refused, not the old filter's events in silence.
    with anyio.fail_after(5), pytest.raises(NatflowError, match="durable name 'mine' follows"):
        await anext(aiter(client.events("flaky", "failed", durable="mine")))


async def test_a_redelivered_status_change_is_published_once(client: Client) -> None:
    from natflow_engine._lifecycle import publish_status
    from natflow_engine._state import RunInfo
    from natflow_engine.events import utcnow

    await client.start("nobody-serves-this", None, run_id="dup-1")
    now = utcnow()
    info = RunInfo(
        run_id="dup-1",
        workflow="odd.name *",
        queue="default",
        status="failed",
        created_at=now,
        updated_at=now,
    )
    for _ in range(3):  # an engine that died before acknowledging, and another replica
        await publish_status(client.connection, "running", info, 42)
    stream = await client.connection.jsm.stream_info("NATFLOW_LIFECYCLE")
    assert stream.state.messages == 1
    assert workflow_token("odd.name *") == "odd%2Ename%20%2A"
    assert lifecycle_subject("odd.name *", "failed", "dup-1") == (
        "natflow.lifecycle.odd%2Ename%20%2A.failed.dup-1"
    )


async def test_client_events_without_a_durable_name_filter_on_status(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [flaky]):
        await client.start(flaky, True, run_id="bad-1")
        await client.start(flaky, False, run_id="good-1")
        with pytest.raises(RunFailed):
            await client.handle("bad-1").result(timeout=20)
        assert await client.handle("good-1").result(timeout=20) == "ok"
        seen: list[LifecycleEvent] = []
        with anyio.move_on_after(3):
            async for event in client.events(status="failed", from_start=True):
                seen.append(event)
    assert [(e.run_id, e.status, e.workflow) for e in seen] == [("bad-1", "failed", "flaky")]
