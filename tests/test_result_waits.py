"""``RunHandle.result()`` waits on through a server outage, hears the end at the reconnect,
keeps its own deadline, and ends at once with a natflow error when its client is closed."""

from __future__ import annotations

import time

import anyio
import pytest
from natflow import Client, NatflowError, WorkflowContext, _handle, workflow
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_worker, wait_for


@workflow(name="waits_for_go")
async def waits_for_go(ctx: WorkflowContext, x: int) -> int:
    return x + int(await ctx.wait_for_signal("go"))


async def _waiting(client: Client, run_id: str) -> bool:
    return (await client.describe(run_id)).status == "waiting"


async def test_a_wait_goes_on_through_an_outage_and_keeps_its_deadline(
    client: Client,
    nats_server: EmbeddedServer,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each look during the outage fails (a request timeout, itself a TimeoutError): the
    wait raised TimeoutError("did not finish within 120 s") at the first of them."""
    monkeypatch.setattr(_handle, "_SAFETY_NET", 1.0)  # it looks every second meanwhile
    waiter = await Client.connect(nats_server.url)
    async with waiter, running_worker(client, [waits_for_go]):
        await client.start(waits_for_go, 1, run_id="through")
        await wait_for(lambda: _waiting(client, "through"), what="the run waiting")
        waiter._runs.history.retry_budget = 0.5  # looks fail fast while the server is away
        results: list[object] = []

        async def wait() -> None:
            results.append(await waiter.handle("through").result(timeout=120))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.3)
            nats_server.stop()
            await anyio.sleep(7)  # past a request's 5 s: looks fail meanwhile
            nats_server.start()
            await wait_for(lambda: _waiting(client, "through"), timeout=30, what="back")
            await client.signal("through", "go", 41)
        assert results == [42]
        # Its own deadline still holds, the server away or not.
        await client.start(waits_for_go, 1, run_id="short")
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 1"):
            await waiter.handle("short").result(timeout=1)
        assert time.monotonic() - began < 4


async def test_a_wait_ends_at_once_with_a_natflow_error_when_its_client_closes(
    client: Client, engine: Engine
) -> None:
    """It waited on for its whole safety net (30 s), then raised nats-py's own error."""
    await client.start("nobody-serves-this", 1, run_id="forever")
    other = await Client.connect(client.connection.url.replace("***@", ""))
    caught: list[BaseException] = []
    ended = anyio.Event()

    async def wait() -> None:
        try:
            await other.handle("forever").result()
        except BaseException as exc:  # what the waiter sees, whatever it is
            caught.append(exc)
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.5)
        with anyio.fail_after(10):
            await other.close()
            await ended.wait()
    assert isinstance(caught[0], NatflowError), repr(caught[0])
    assert "closed" in str(caught[0])
    with anyio.fail_after(5), pytest.raises(NatflowError, match="closed"):
        await other.describe("forever")


async def test_a_watch_goes_on_within_seconds_of_a_server_restart(
    client: Client, nats_server: EmbeddedServer, engine: Engine
) -> None:
    """The watch's ordered consumer noticed the restart by two missed heartbeats at nats-py's
    default 5 s apart: the run's next events came 10-17 s late."""
    seen: list[str] = []
    async with running_worker(client, [waits_for_go]):
        await client.start(waits_for_go, 1, run_id="watched")
        await wait_for(lambda: _waiting(client, "watched"), what="the run waiting")

        async def watch() -> None:
            async for event in client.watch("watched"):
                seen.append(event.__struct_config__.tag)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)

            async def caught_up() -> bool:
                return "signal_waited" in seen

            await wait_for(caught_up, what="the watch catching up")
            nats_server.restart()

            async def back() -> bool:
                try:
                    return await _waiting(client, "watched")
                except NatflowError:  # still reconnecting
                    return False

            await wait_for(back, what="the client back")
            await client.signal("watched", "go", 2)

            async def completed() -> bool:
                return "run_completed" in seen

            await wait_for(completed, timeout=5, what="the watch hearing the run complete")
            tg.cancel_scope.cancel()


async def test_a_list_goes_on_through_a_short_outage(
    client: Client, nats_server: EmbeddedServer, engine: Engine
) -> None:
    """As a run's own reads do (a cluster's election is a few seconds of this): the list
    raised ServerUnavailable at once."""
    async with running_worker(client, [waits_for_go]):
        await client.start(waits_for_go, 1, run_id="listed")
        await wait_for(lambda: _waiting(client, "listed"), what="the run waiting")
    nats_server.stop()
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, _start_soon, nats_server)
        runs = await client.list()
    assert [run.run_id for run in runs] == ["listed"]


def _start_soon(server: EmbeddedServer) -> None:
    time.sleep(1)
    server.start()


async def test_a_cancelled_result_or_events_wait_ends_however_the_cancel_lands(
    client: Client,
) -> None:
    """Python 3.11's asyncio.wait_for inside nats-py lost a cancel landing as its call
    completed: about 2 % of task.cancel() calls left result() (and events()) waiting for
    good. Cancels here land anywhere in the first few milliseconds, where the calls are."""
    import asyncio
    import random

    handle = await client.start("served_by_nobody", {}, run_id="never", queue="nobody")
    lost: list[str] = []
    for i in range(300):
        if i % 2:
            task = asyncio.ensure_future(handle.result())
        else:
            task = asyncio.ensure_future(anext(aiter(client.events(workflow="nobody_at_all"))))
        await asyncio.sleep(random.uniform(0, 0.006))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        if not done:
            lost.append("result" if i % 2 else "events")
            task.cancel()
            await asyncio.wait([task], timeout=3)
    assert lost == []
