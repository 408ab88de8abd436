"""A worker started before its server: it retries with backoff, then serves when it comes up."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

from natflow import Client, WorkflowContext, workflow
from natflow_engine._server import EmbeddedServer

from tests.helpers import count_lines, running_worker, spawn_worker, stop, wait_for
from tests.links import free_port
from tests.workflows_proc import COUNTS_ENV, GATE_ENV

RETRY = re.compile(r"retrying in ([0-9.]+) s")


async def test_worker_waits_for_a_late_server_then_serves(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    counts = tmp_path / "counts.txt"
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(tmp_path)}
    worker = spawn_worker(url, "tests.workflows_proc:make_worker", env=env, log=log)
    server = EmbeddedServer(port=port, store_dir=tmp_path / "nats")
    try:

        async def three_retries() -> list[str]:
            lines = log.read_text().splitlines() if log.exists() else []
            retries = [line for line in lines if RETRY.search(line)]
            return retries if len(retries) >= 3 else []

        retries = await wait_for(three_retries, timeout=25, what="three 'retrying in' lines")
        assert worker.poll() is None, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text, text
        # One line per attempt, naming the server and how to start one, with growing delays.
        assert all("natflow dev" in line and url in line for line in retries), retries
        delays = [float(m.group(1)) for line in retries if (m := RETRY.search(line))]
        assert delays == sorted(delays) and delays[-1] > delays[0], delays

        server.start()
        client = await Client.connect(server.url)
        try:
            handle = await client.start("single_step", 21, run_id="late-1")
            assert await handle.result(timeout=20) == 42
            info = await client.describe("late-1")
            assert info.status == "completed"
        finally:
            await client.close()
        assert count_lines(counts) == {"late-1:only": 1}
        stop(worker, signal.SIGTERM)
        assert worker.returncode == 0, log.read_text()
    finally:
        stop(worker)
        server.stop()


async def test_a_second_worker_of_a_live_identity_is_refused_naming_it(
    client: Client, engine: object
) -> None:
    """Two processes of one identity took each other's runs for their own, and step bodies
    ran twice; the second is now refused at its start."""
    import anyio
    import pytest
    from natflow import InvalidInput, Worker
    from natflow_engine._registry import list_workers

    from tests.helpers import running_worker
    from tests.workflows_waits import WORKFLOWS

    other = await Client.connect(client.connection.url)
    async with other, running_worker(client, WORKFLOWS, identity="twin"):

        async def registered() -> bool:
            return [w.identity for w in await list_workers(client.connection)] == ["twin"]

        await wait_for(registered, what="the first twin serving")
        with anyio.fail_after(15), pytest.raises(InvalidInput, match="'twin' is taken"):
            await Worker(other, WORKFLOWS, identity="twin").run()
    # Once the first is gone, the identity serves again.
    async with running_worker(client, WORKFLOWS, identity="twin") as again:
        assert again.identity == "twin"


async def test_shutting_down_a_worker_that_never_ran_returns_at_once(client: Client) -> None:
    """It waited for the end of a run() that never began, for good."""
    import anyio
    from natflow import Worker

    from tests.workflows_waits import WORKFLOWS

    worker = Worker(client, WORKFLOWS)
    with anyio.fail_after(5):
        await worker.shutdown(grace=1)
        await worker.run()  # shut down already: returns at once


async def test_an_error_inside_async_with_worker_leaves_as_itself(client: Client) -> None:
    """anyio's task group wrapped it in an ExceptionGroup: `except RunNotFound` missed."""
    import pytest
    from natflow import RunNotFound, Worker

    from tests.workflows_waits import WORKFLOWS

    with pytest.raises(RunNotFound):
        async with Worker(client, WORKFLOWS):
            await client.describe("no-such-run")


async def test_durations_take_seconds_or_a_timedelta_everywhere(client: Client) -> None:
    """API.md: "as seconds or timedelta wherever one is taken"; shutdown(grace=timedelta)
    was a TypeError, RateLimit(period=timedelta) and connect_timeout=timedelta refused, and
    grace=-5 accepted."""
    from datetime import timedelta

    import anyio
    import pytest
    from natflow import InvalidInput, RateLimit, Worker

    from tests.workflows_waits import WORKFLOWS

    assert RateLimit("api", 60, period=timedelta(minutes=1)).interval == 1.0
    other = await Client.connect(client.connection.url, connect_timeout=timedelta(seconds=2))
    await other.close()
    worker = Worker(client, WORKFLOWS)
    with pytest.raises(InvalidInput, match="grace"):
        await worker.shutdown(grace=-5)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.sleep(0.3)
            await worker.shutdown(grace=timedelta(seconds=1))


async def test_identities_that_are_not_tokens_stay_apart_and_are_named_as_given(
    client: Client, engine: object
) -> None:
    """Each character outside ``[A-Za-z0-9_-]`` became '-': "host.a" and "host-a", or "東京"
    and "大阪" (both "--"), were one identity, and the second worker was refused as the twin
    of one nobody gave. Each now answers to a token of its own (a token stays as it is), and
    a real twin is refused naming the identity as given."""
    import anyio
    import pytest
    from natflow import InvalidInput, Worker
    from natflow_engine._registry import list_workers

    from tests.helpers import running_worker
    from tests.workflows_waits import WORKFLOWS

    given = ["host.a", "host-a", "host a", "東京", "大阪", "x" * 200, "x" * 201]
    tokens = [Worker(client, WORKFLOWS, identity=name).identity for name in given]
    assert len(set(tokens)) == len(given), tokens
    assert tokens[1] == "host-a", "an identity that is a token is kept (leases name it)"
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,128}", token) for token in tokens), tokens
    other = await Client.connect(client.connection.url)
    async with (
        other,
        running_worker(client, WORKFLOWS, identity="東京") as tokyo,
        running_worker(other, WORKFLOWS, identity="大阪") as osaka,
    ):

        async def both() -> bool:
            listed = {w.identity for w in await list_workers(client.connection)}
            return listed == {tokyo.identity, osaka.identity}

        await wait_for(both, what="both workers serving")
        with anyio.fail_after(15), pytest.raises(InvalidInput, match="'東京' is taken"):
            await Worker(other, WORKFLOWS, identity="東京").run()


_STEP_GATE = threading.Event()


def _blocks_until_released() -> str:
    _STEP_GATE.wait(60)
    return "done"


@workflow(name="long_sync_step")
async def long_sync_step(ctx: WorkflowContext) -> str:
    return str(await ctx.step("block", _blocks_until_released))


async def test_a_shutdown_returns_within_its_grace_while_a_sync_step_runs_on(
    client: Client, engine: object
) -> None:
    """It waited for the step's thread however long it ran: shutdown(grace=1) with a 20 s
    step returned after 20 s. The thread runs on (nothing stops a thread); the run goes back
    and another worker takes it up."""
    import time

    import anyio
    from natflow import Worker
    from natflow_engine.events import StepStarted

    _STEP_GATE.clear()
    worker = Worker(client, [long_sync_step])
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            handle = await client.start(long_sync_step, run_id="long-sync")

            async def step_began() -> bool:
                return any(isinstance(e, StepStarted) for e in await client.history("long-sync"))

            await wait_for(step_began, what="the step's thread running")
            began = time.monotonic()
            await worker.shutdown(grace=0.5)
            assert time.monotonic() - began < 8  # the grace, and the executions' unwind
        _STEP_GATE.set()  # the abandoned thread ends; another worker runs the step again
        async with running_worker(client, [long_sync_step]):
            assert await handle.result(timeout=20) == "done"
    finally:
        _STEP_GATE.set()


async def test_a_worker_that_cannot_renew_its_registry_entry_says_so_once(
    client: Client, monkeypatch: object, caplog: object
) -> None:
    """Only at debug: with the store full, `natflow workers` said "no live workers" of two
    live ones, and their logs said nothing."""
    import logging
    import types

    import anyio
    import pytest
    from natflow import _registration
    from natflow_engine import ServerUnavailable

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    assert isinstance(caplog, pytest.LogCaptureFixture)
    from natflow_engine._streams import ensure_streams

    await ensure_streams(client.connection)
    leases = types.SimpleNamespace(ttl=15.0)
    registration = _registration.Registration(
        client.connection,
        "reg-w",
        [],
        {},
        [],
        {},
        leases,
        anyio.Event(),  # type: ignore[arg-type]
    )

    async def full(*_: object) -> None:
        raise ServerUnavailable("the server refused it for lack of storage")

    with caplog.at_level(logging.DEBUG, logger="natflow.worker"):
        monkeypatch.setattr(_registration, "announce", full)
        for _ in range(3):
            await registration.announce()
        monkeypatch.undo()
        await registration.announce()
    warned = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "natflow.worker"
    ]
    assert len(warned) == 1 and "lack of storage" in warned[0].getMessage()
    assert "reg-w is in the registry again" in caplog.text
