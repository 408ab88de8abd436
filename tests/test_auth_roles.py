"""Roles as NATS permissions (ops/auth): a real nats-server with a user of each role.

Each role can do its job end to end, and what it may not do is refused by the server and
raised as ``PermissionDenied`` naming the subject.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from natflow import (
    Client,
    InvalidInput,
    PermissionDenied,
    RunNotFound,
    ServerUnavailable,
    Worker,
    WorkflowContext,
    workflow,
)
from natflow_engine import HISTORY_STREAM, Runs, record_sync_mode, stored_feed
from natflow_engine._append_batch import HISTORY_SENDING, appender
from natflow_engine._auth import permissions_conf, role_permissions
from natflow_engine._cli_runs import _wait_and_show
from natflow_engine._history import HistoryStore
from natflow_engine._registry import list_workers
from natflow_engine._schedule_ops import Schedules
from natflow_engine._schedules import ScheduleSpec
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import PAUSE, RESUME, control_request
from natflow_engine._streams import SYNC_MODE_KEY, signal_subject, stream_configs
from natflow_engine._triggers import event_run_id, recent_events
from natflow_engine.events import RunCompleted, utcnow

from tests.console_helpers import http, served_console
from tests.helpers import running_engine, running_worker, wait_for
from tests.opsconf import OPS, render_ops
from tests.test_cli import assert_one_clear_error

OPS_AUTH = OPS / "auth"

# Denials the server reports only on the side (nats-py's call would time out after 5 s);
# natflow fails requests, publishes and JetStream API calls the moment the denial arrives
# (the 2 s bound of the issue: test_denials_are_fast). The batch reads of KV buckets
# (list_workers) still wait out their 5 s read timeout before naming the denial, hence the
# budget.
DENIAL_BUDGET = 12.0


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    config = render_ops(OPS_AUTH / "nats.conf", tmp_path / "auth")
    server = EmbeddedServer(config, store_dir=tmp_path / "auth-log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def creds(user: str) -> dict[str, Any]:
    password = {"billing_worker": "billing-secret"}.get(user, f"{user}-secret")
    return {"user": user, "password": password}


async def connect_as(server: EmbeddedServer, user: str) -> Client:
    return await Client.connect(server.url, **creds(user))


@workflow(name="guarded")
async def guarded(ctx: WorkflowContext, x: int) -> dict[str, Any]:
    doubled = await ctx.step("double", lambda v: v * 2, x)
    approval = await ctx.wait_for_signal("approve", timeout=30)
    return {"doubled": doubled, "approval": approval}


@workflow(name="billing_flow", queue="billing")
async def billing_flow(ctx: WorkflowContext, x: int) -> int:
    return int(await ctx.step("bill", lambda v: v + 1, x))


@workflow(name="roles_daily", every=86400)
async def roles_daily(ctx: WorkflowContext) -> str:
    return "tick"


@workflow(name="roles_on_order", on_event="roles.order")
async def roles_on_order(ctx: WorkflowContext, order: dict[str, int]) -> int:
    return order["n"] + 1


@workflow(name="roles_big")
async def roles_big(ctx: WorkflowContext, blob: str) -> str:
    echoed = await ctx.step("echo", lambda b: b, blob)
    return str(echoed) + str(await ctx.wait_for_signal("more", timeout=30))


@pytest.fixture
async def deployment(auth_server: EmbeddedServer) -> AsyncIterator[dict[str, Client]]:
    """Engine and worker under their roles, and a connection for every other user."""
    async with running_engine(auth_server.url, **creds("engine")):
        clients = {
            u: await connect_as(auth_server, u)
            for u in ("worker", "client", "signaller", "viewer", "billing_worker")
        }
        try:
            async with running_worker(clients["worker"], [guarded], queue="default"):
                yield clients
        finally:
            for c in clients.values():
                await c.close()


async def denied(action: Callable[[], Awaitable[object]], subject: str) -> float:
    """Run ``action``; it must raise PermissionDenied naming ``subject``. Returns the seconds
    it took."""
    began = time.monotonic()
    with anyio.fail_after(DENIAL_BUDGET), pytest.raises(PermissionDenied) as caught:
        await action()
    # nats-py lower-cases the server's text; a subject natflow knows is named as sent.
    assert subject.lower() in str(caught.value).lower(), caught.value
    return time.monotonic() - began


def test_ops_permissions_are_what_natflow_auth_prints() -> None:
    """ops/auth/permissions.conf and the queue-limited worker in nats.conf are generated."""
    assert (OPS_AUTH / "permissions.conf").read_text() == permissions_conf()
    billing = role_permissions("worker", queues=["billing"], workflows=["billing_flow"]).to_conf()
    config = " ".join((OPS_AUTH / "nats.conf").read_text().split())
    assert " ".join(billing.split()) in config


def test_natflow_auth_prints_a_role_limited_to_queues() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "natflow_engine",
            "auth",
            "worker",
            "--queue",
            "billing",
            "--workflow",
            "billing_flow",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    expected = role_permissions("worker", queues=["billing"], workflows=["billing_flow"]).to_conf()
    assert done.stdout == f"permissions: {expected}\n"
    assert "natflow-queue-billing" in done.stdout
    assert "natflow-queue-default" not in done.stdout
    signaller = role_permissions("signaller", control=["cancel"], domain="hub")
    assert "natflow.signal.*.$control.cancel" in signaller.publish
    assert "natflow.signal.*.$control.terminate" not in signaller.publish
    assert "$JS.hub.API.STREAM.INFO.NATFLOW_SIGNALS" in signaller.publish


async def test_each_role_does_its_job(deployment: dict[str, Client]) -> None:
    client, viewer = deployment["client"], deployment["viewer"]
    handle = await client.start(guarded, 21, run_id="roles-1")
    await wait_for(
        lambda: _status_is(viewer, "roles-1", "waiting"), timeout=15, what="the run to wait"
    )
    await deployment["signaller"].signal("roles-1", "approve", {"by": "signaller"})
    assert await handle.result(timeout=15) == {"doubled": 42, "approval": {"by": "signaller"}}
    # The engine indexes the run's end a moment after the result is in history.
    await wait_for(lambda: _listed(viewer, "roles-1"), timeout=15, what="roles-1 indexed")
    assert [r.run_id for r in await viewer.list()] == ["roles-1"]
    assert (await viewer.describe("roles-1")).status == "completed"
    # The registry names the user the worker connected as, as the server knows it.
    assert [(w.user, w.account) for w in await list_workers(viewer.connection)] == [
        ("worker", "$G")
    ]
    # A worker may not read the registry: a natflow error, not nats-py's timeout.
    await denied(
        lambda: list_workers(deployment["worker"].connection),
        "$JS.API.DIRECT.GET.KV_natflow_workers",
    )

    cancelled = await client.start(guarded, 1, run_id="roles-2")
    await wait_for(lambda: _status_is(viewer, "roles-2", "waiting"), timeout=15, what="waiting")
    await client.cancel("roles-2", "no longer needed")
    await wait_for(lambda: _status_is(viewer, "roles-2", "cancelled"), timeout=15, what="cancel")
    assert cancelled.run_id == "roles-2"


async def _status_is(reader: Client, run_id: str, status: str) -> bool:
    try:
        return (await reader.describe(run_id)).status == status
    except RunNotFound:
        return False


async def test_signaller_may_signal_and_nothing_else(
    deployment: dict[str, Client], auth_server: EmbeddedServer
) -> None:
    client, signaller = deployment["client"], deployment["signaller"]
    await client.start(guarded, 1, run_id="sig-1")
    await wait_for(lambda: _status_is(client, "sig-1", "waiting"), timeout=15, what="waiting")

    # natflow signal, as the signaller: it read the run first and was refused that.
    done = await anyio.run_process(
        [sys.executable, "-m", "natflow_engine", "--url", auth_server.url, "--user",
         "signaller", "--password", creds("signaller")["password"],
         "signal", "sig-1", "approve", '"yes"'],
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    # Its refused look at the run is natflow's to handle: it printed a WARNING of the denial.
    assert b"permissions violation" not in done.stderr, done.stderr.decode()
    shown = await anyio.run_process(
        [sys.executable, "-m", "natflow_engine", "--url", auth_server.url, "--user",
         "signaller", "--password", creds("signaller")["password"], "runs", "show", "sig-1"],
        check=False,
    )  # fmt: skip
    assert_one_clear_error(shown, "direct.get.natflow_history")  # one line (README), no warning
    await wait_for(lambda: _status_is(client, "sig-1", "completed"), timeout=15, what="done")
    await client.start(guarded, 2, run_id="sig-0")
    await wait_for(lambda: _status_is(client, "sig-0", "waiting"), timeout=15, what="waiting")
    await signaller.signal("sig-0", "approve", "yes")  # works, without reading the run
    await wait_for(lambda: _status_is(client, "sig-0", "completed"), timeout=15, what="done")

    forged = RunCompleted(id="sig-1:99", at=utcnow())
    history_cut = next(c for c in stream_configs() if c.name == "NATFLOW_HISTORY")
    history_cut.max_msgs = 1  # a change that would destroy histories
    store = HistoryStore(signaller.connection)
    conn = signaller.connection
    times = [
        await denied(lambda: store.append("sig-1", forged, 0), "natflow.history.sig-1.run"),
        await denied(lambda: signaller.history("sig-1"), "$JS.API.DIRECT.GET.NATFLOW_HISTORY"),
        await denied(
            lambda: Worker(signaller, [guarded]).run(),
            "$JS.API.CONSUMER.CREATE.NATFLOW_TASKS.natflow-queue-default",
        ),
        await denied(
            lambda: conn.admin("deleting", lambda: conn.jsm.delete_stream("NATFLOW_HISTORY")),
            "$JS.API.STREAM.DELETE.NATFLOW_HISTORY",
        ),
        await denied(
            lambda: conn.admin("purging", lambda: conn.jsm.purge_stream("NATFLOW_SIGNALS")),
            "$JS.API.STREAM.PURGE.NATFLOW_SIGNALS",
        ),
        await denied(
            lambda: conn.admin("changing", lambda: conn.jsm.update_stream(history_cut)),
            "$JS.API.STREAM.UPDATE.NATFLOW_HISTORY",
        ),
        await denied(lambda: signaller.cancel("sig-1"), "natflow.signal.sig-1.$control.cancel"),
        await denied(
            lambda: signaller.terminate("sig-1", "x"), "natflow.signal.sig-1.$control.terminate"
        ),
    ]
    assert max(times) < 2.0, times  # issue 16: each refusal named within 2 s
    # Nothing it tried changed the run.
    assert (await client.describe("sig-1")).result == {"doubled": 2, "approval": "yes"}


async def test_signaller_cannot_cancel_by_the_old_reserved_name(
    deployment: dict[str, Client], auth_server: EmbeddedServer
) -> None:
    """The reserved name on the ordinary signal subject (which `natflow.signal.*.*` allows)
    is dead-lettered, not honoured: cancel is a permission of its own."""
    client = deployment["client"]
    await client.start(guarded, 1, run_id="sig-2")
    await wait_for(lambda: _status_is(client, "sig-2", "waiting"), timeout=15, what="waiting")
    nc = await nats.connect(auth_server.url, **creds("signaller"))
    try:
        js = nc.jetstream()
        await js.publish("natflow.signal.sig-2.$cancel", b'"forged"')
        await js.publish("natflow.signal.sig-2.$terminate", b'"forged"')
        await js.publish("natflow.signal.sig-2.approve", b'"after"')
    finally:
        await nc.close()
    await wait_for(lambda: _status_is(client, "sig-2", "completed"), timeout=15, what="done")
    events = [type(e).__name__ for e in await client.history("sig-2")]
    assert "CancelRequested" not in events
    assert events.count("SignalRejected") == 2


async def test_worker_limited_to_a_queue_cannot_take_another(
    deployment: dict[str, Client], auth_server: EmbeddedServer
) -> None:
    client, billing = deployment["client"], deployment["billing_worker"]
    await client.start(guarded, 5, run_id="q-1")  # queue "default"
    refused = Worker(billing, [guarded])
    await denied(refused.run, "$JS.API.CONSUMER.CREATE.NATFLOW_TASKS.natflow-queue-default")
    with anyio.fail_after(5):  # a worker whose start failed has nothing to wait for
        await refused.shutdown(grace=0)
    # Even by hand, a pull from the default queue's consumer is refused.
    errors: list[str] = []

    async def on_error(error: Exception) -> None:
        errors.append(str(error))

    nc = await nats.connect(auth_server.url, error_cb=on_error, **creds("billing_worker"))
    try:
        sub = await nc.jetstream().pull_subscribe_bind("natflow-queue-default", "NATFLOW_TASKS")
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        assert any("natflow-queue-default" in e for e in errors), errors
    finally:
        await nc.close()
    # Its own queue works.
    async with running_worker(billing, [billing_flow]):
        handle = await client.start(billing_flow, 1, run_id="q-2")
        assert await handle.result(timeout=15) == 2


async def test_viewer_reads_but_cannot_start_signal_or_cancel(
    deployment: dict[str, Client],
) -> None:
    client, viewer = deployment["client"], deployment["viewer"]
    await client.start(guarded, 3, run_id="view-1")
    await wait_for(lambda: _status_is(viewer, "view-1", "waiting"), timeout=15, what="waiting")
    assert (await viewer.describe("view-1")).workflow == "guarded"
    await wait_for(
        lambda: _listed(viewer, "view-1"), timeout=10, what="the run in the engine's index"
    )
    await denied(lambda: viewer.start(guarded, 1, run_id="view-2"), "natflow.history.view-2.run")
    await denied(lambda: viewer.signal("view-1", "approve", 1), "natflow.signal.view-1.approve")
    await denied(lambda: viewer.cancel("view-1"), "natflow.signal.view-1.$control.cancel")
    assert (await viewer.describe("view-1")).status == "waiting"


async def _listed(reader: Client, run_id: str) -> bool:
    return run_id in [r.run_id for r in await reader.list()]


async def test_denials_are_fast(deployment: dict[str, Client]) -> None:
    signaller = deployment["signaller"]
    store = HistoryStore(signaller.connection)
    took = await denied(
        lambda: store.append("nope", RunCompleted(id="nope:1", at=utcnow()), 0),
        "natflow.history.nope.run",
    )
    assert took < 2.0


async def test_a_frontend_starts_through_the_engine_and_cannot_write_history(
    deployment: dict[str, Client], auth_server: EmbeddedServer
) -> None:
    frontend = await Client.connect(auth_server.url, start_via_engine=True, **creds("frontend"))
    try:
        handle = await frontend.start(guarded, 4, run_id="front-1")
        again = await frontend.start(guarded, 4, run_id="front-1")  # idempotent by run id
        assert again.run_id == handle.run_id
        await wait_for(lambda: _status_is(frontend, "front-1", "waiting"), timeout=15, what="w")
        await frontend.signal("front-1", "approve", "ok")
        assert await handle.result(timeout=15) == {"doubled": 8, "approval": "ok"}
        with pytest.raises(InvalidInput, match="workflow"):
            await frontend.start("", 1)
        direct = await Client.connect(auth_server.url, **creds("frontend"))
        try:
            forged = RunCompleted(id="front-1:99", at=utcnow())
            await denied(
                lambda: HistoryStore(direct.connection).append("front-2", forged, 0),
                "natflow.history.front-2.run",
            )
        finally:
            await direct.close()
    finally:
        await frontend.close()


async def test_natflow_start_as_a_frontend_goes_through_the_engine_with_via_engine(
    deployment: dict[str, Client], auth_server: EmbeddedServer
) -> None:
    """The CLI wrote history only: a frontend was refused and told to grant history writes,
    what its role exists to forbid."""
    password = creds("frontend")["password"]
    base = [sys.executable, "-m", "natflow_engine", "--url", auth_server.url, "--user",
            "frontend", "--password", password, "start", "guarded", "--input", "5"]  # fmt: skip
    refused = await anyio.run_process([*base, "--run-id", "front-cli-0"], check=False)
    assert_one_clear_error(refused, "natflow.history.front-cli-0.run", "--via-engine")
    done = await anyio.run_process(
        [*base, "--run-id", "front-cli-1", "--via-engine", "--json"], check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {"run_id": "front-cli-1", "created": True}
    client = deployment["client"]
    await wait_for(lambda: _status_is(client, "front-cli-1", "waiting"), timeout=15, what="w")
    await client.signal("front-cli-1", "approve", "ok")
    assert await client.handle("front-cli-1").result(timeout=15) == {
        "doubled": 10,
        "approval": "ok",
    }


async def test_a_frontend_without_an_engine_is_told_to_start_one(
    auth_server: EmbeddedServer,
) -> None:
    frontend = await Client.connect(auth_server.url, start_via_engine=True, **creds("frontend"))
    try:
        with pytest.raises(ServerUnavailable, match="no natflow engine answers start requests"):
            await frontend.start(guarded, 1)
    finally:
        await frontend.close()


async def test_a_client_before_the_streams_exist_is_told_who_creates_them(
    auth_server: EmbeddedServer,
) -> None:
    client = await connect_as(auth_server, "client")
    try:
        with anyio.fail_after(DENIAL_BUDGET), pytest.raises(PermissionDenied) as caught:
            await client.start(guarded, 1)
        assert "does not exist and this connection may not create it" in str(caught.value)
        assert "natflow init" in str(caught.value)
    finally:
        await client.close()


async def _declared(viewer: Client) -> bool:
    # A worker declares its event triggers before it creates its schedules.
    return "roles_daily" in {s.schedule_id for s in await viewer.schedules.list()}


async def test_schedules_events_and_the_console_under_their_roles(
    deployment: dict[str, Client], auth_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What issues 14 and 15 added works under the roles: a worker writes its schedule and
    event triggers, a client emits events and manages schedules, a viewer reads schedules,
    events and every console page; a queue-limited worker writes only its own workflow's
    schedule. Nothing but the provoked denials is refused."""
    caplog.set_level(logging.WARNING, logger="natflow.connection")
    worker, client, viewer = deployment["worker"], deployment["client"], deployment["viewer"]
    async with running_worker(worker, [roles_daily, roles_on_order]):
        await wait_for(lambda: _declared(viewer), timeout=15, what="the worker's schedule")
        seq = await client.emit("roles.order", {"n": 41}, event_id="order-1")
        run_id = event_run_id("roles.order", "order-1", seq, "roles_on_order")
        await wait_for(lambda: _listed(viewer, run_id), timeout=15, what="the event's run")
        assert await viewer.handle(run_id).result(timeout=15) == 42
        await client.schedules.create("roles-hourly", roles_daily, every=3600)
        fired = await client.schedules.trigger("roles-hourly")
        assert await fired.result(timeout=15) == "tick"
        described = await viewer.schedules.describe("roles-hourly")
        assert described.recent_runs[0].run_id == fired.run_id
        assert (await recent_events(viewer.connection))[0].runs == {"roles_on_order": run_id}
        async with served_console(auth_server.url, **creds("viewer")) as base:
            for path in ("/runs", f"/runs/{run_id}", "/workers", "/dead-letters", "/start"):
                status, body, _ = await http(base + path)
                assert status == 200, (path, body[-2000:])
            assert "roles_on_order" in (await http(base + f"/runs/{run_id}"))[1]
    await denied(lambda: viewer.schedules.pause("roles-hourly"), "$KV.natflow_schedules.roles")
    await denied(lambda: viewer.emit("roles.order", {"n": 1}), "natflow.event.roles.order")
    billing = Schedules(deployment["billing_worker"].connection)
    spec = ScheduleSpec(every=86400, queue="billing")
    assert await billing.create("billing_flow", "billing_flow", b"1", spec)
    await denied(
        lambda: billing.create("roles-other", "billing_flow", b"1", spec),
        "natflow_schedules.roles-other",
    )
    provoked = ("$kv.natflow_schedules.roles", "natflow.event.roles.order", "roles-other")
    refused = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    unexpected = [m for m in refused if not any(p in m.lower() for p in provoked)]
    assert not unexpected, unexpected


def test_pause_and_resume_are_control_grants_of_their_own() -> None:
    """Pause and resume travel on the run's control subject like cancel: the client role has
    them, the signaller only when given, and each one alone."""
    assert signal_subject("r-1", PAUSE) == "natflow.signal.r-1.$control.pause"
    assert control_request("natflow.signal.r-1.$control.resume") == RESUME
    client = role_permissions("client").publish
    for kind in ("cancel", "terminate", "pause", "resume"):
        assert f"natflow.signal.*.$control.{kind}" in client
    signaller = role_permissions("signaller", control=["pause"]).publish
    assert "natflow.signal.*.$control.pause" in signaller
    assert "natflow.signal.*.$control.resume" not in signaller
    viewer = role_permissions("viewer").publish
    assert not any("$control" in s for s in viewer)
    assert "$JS.API.STREAM.INFO.NATFLOW_LIFECYCLE" in viewer  # client.events
    assert "natflow.lifecycle.>" in role_permissions("engine").publish


async def test_a_role_that_may_not_update_streams_cannot_record_the_sync_mode_and_says_so_once(
    deployment: dict[str, Client], caplog: pytest.LogCaptureFixture
) -> None:
    worker = deployment["worker"]
    caplog.set_level(logging.DEBUG, logger="natflow.streams")
    for _ in range(3):  # the engine would ask every few seconds
        await record_sync_mode(worker.connection, sync_always=False)
    refused = [r for r in caplog.records if "record the server's sync mode" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    info = await worker.connection.jsm.stream_info(HISTORY_STREAM)
    assert SYNC_MODE_KEY not in (info.config.metadata or {})  # nothing written
    # This process still knows the mode, and batches its own appends by it.
    assert not appender(worker.connection, HISTORY_STREAM, sending=HISTORY_SENDING).pays
    # The refusal failed that call alone: the worker's own calls in flight on its connection
    # (its queue's consumer, looked up while it ran) were not taken for the denied one.
    client, viewer = deployment["client"], deployment["viewer"]
    await client.start(guarded, 5, run_id="roles-sync")
    await wait_for(lambda: _status_is(viewer, "roles-sync", "waiting"), timeout=15, what="waiting")


@workflow(name="roles_plain")
async def roles_plain(ctx: WorkflowContext, x: int) -> int:
    return x + 1


@contextlib.asynccontextmanager
async def feedless(tmp_path: Path) -> AsyncIterator[tuple[Client, Client]]:
    """A server whose permissions were written before the stored feed (no natflow.stored.*),
    its engine, and a worker and a client connected in their roles."""
    config = render_ops(OPS_AUTH / "nats.conf", tmp_path / "auth")
    granted = config.parent / "permissions.conf"
    lines = granted.read_text().splitlines(keepends=True)
    granted.write_text("".join(line for line in lines if '"natflow.stored.*"' not in line))
    server = EmbeddedServer(config, store_dir=tmp_path / "auth-log")
    server.start()
    try:
        async with running_engine(server.url, **creds("engine")):
            worker, client = await connect_as(server, "worker"), await connect_as(server, "client")
            try:
                yield worker, client
            finally:
                await worker.close()
                await client.close()
    finally:
        server.stop()


async def test_a_client_refused_the_stored_feed_still_sees_its_runs_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Permissions written before the stored feed (no natflow.stored.*): result() notices
    the refusal, says once what to grant, and listens on the run's own subject from then on,
    confirming the end by a read, as before the feed."""
    caplog.set_level(logging.WARNING, logger="natflow.streams")
    async with feedless(tmp_path) as (worker, client), running_worker(worker, [roles_plain]):
        for n in (1, 2):
            handle = await client.start(roles_plain, n, run_id=f"feedless-{n}")
            assert await handle.result(timeout=15) == n + 1
            assert not stored_feed(client.connection)
    said = [r for r in caplog.records if "may not subscribe to natflow.stored" in r.getMessage()]
    assert len(said) == 1


async def test_runs_wait_refused_the_stored_feed_sees_the_run_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`natflow runs wait` on a connection refused the stored feed listens on the run's own
    subject instead (it waited for its 30 s re-read, hearing nothing)."""
    async with feedless(tmp_path) as (worker, client):
        await client.start(roles_plain, 4, run_id="wait-feedless")
        conn = client.connection
        code: list[int] = []

        async def wait() -> None:
            code.append(await _wait_and_show(conn, Runs(conn), "wait-feedless", True))

        with anyio.fail_after(12):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await wait_for(lambda: _refused(client), what="the refusal")
                async with running_worker(worker, [roles_plain]):
                    await wait_for(lambda: _done(code), what="the wait")
        assert code == [0]
        assert '"completed"' in capsys.readouterr().out


async def _refused(client: Client) -> bool:
    return not stored_feed(client.connection)


async def _done(code: list[int]) -> bool:
    return bool(code)


async def test_a_burst_of_result_calls_refused_the_stored_feed_all_see_their_runs_end(
    tmp_path: Path,
) -> None:
    """Forty result() calls subscribe to the stored feed at once on a connection refused it:
    the server's forty refusals arrive before any call waits, more than the connection
    remembers (20). Each call still moves to its run's own subject as soon as one of them
    notices, instead of waiting for its 30 s safety net."""
    async with feedless(tmp_path) as (worker, client):
        handles = [await client.start(roles_plain, n, run_id=f"burst-{n}") for n in range(40)]
        results: dict[int, int] = {}

        async def wait(n: int) -> None:
            results[n] = await handles[n].result(timeout=12)

        async def all_ended() -> bool:
            return len(results) == 40

        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(wait, n)
            # No worker until every call has subscribed: none can end early.
            async with running_worker(worker, [roles_plain]):
                await wait_for(all_ended, timeout=14, what="every result")
        assert results == {n: n + 1 for n in range(40)}
        assert not stored_feed(client.connection)


async def test_large_values_move_under_every_role(deployment: dict[str, Client]) -> None:
    """A value over 64 KiB lives in the object store, whose chunks nats-py reads with a
    consumer it looks the stream up for: no role granted STREAM.NAMES, so under every role
    a large input, result or signal payload was a denial (the run parked, the result
    unreadable). The signaller has no object store at all (it could read any run's)."""
    big, more = "x" * 100_000, "y" * 100_000
    async with running_worker(deployment["worker"], [roles_big], queue="default"):
        handle = await deployment["client"].start(roles_big, big, run_id="big-1")
        viewer = deployment["viewer"]
        await wait_for(lambda: _status_is(viewer, "big-1", "waiting"), timeout=15, what="wait")
        # A signaller's payload travels inline: the value store would let it read (and
        # write) any run's large values.
        with pytest.raises(PermissionDenied, match="over the 65536 kept inline"):
            await deployment["signaller"].signal("big-1", "more", more)
        await deployment["client"].signal("big-1", "more", more)
        assert await handle.result(timeout=15) == big + more
    assert (await viewer.describe("big-1")).result == big + more
    assert [s.result for s in await viewer.steps("big-1")] == [big]
    # Deleting a run is the engine's: a client that tried deleted the run's values, then
    # was refused the purge of its history (the run stayed, its values gone).
    from natflow_engine._value_refs import run_values

    marked = await run_values(deployment["client"].connection, "big-1")
    assert len(marked) == 3  # the input (= the step's result), the signal, the run's result
    with pytest.raises(PermissionDenied, match="purge"):
        await deployment["client"].delete("big-1")
    assert await run_values(deployment["client"].connection, "big-1") == marked
    assert (await viewer.describe("big-1")).result == big + more


async def test_a_worker_under_another_identity_than_its_credentials_name_is_refused(
    tmp_path: Path,
) -> None:
    """Credentials made for worker w1, a worker started as w2: it served runs, unseen by
    `natflow workers` and never pinged, with only raw permission warnings in its log."""
    config = render_ops(OPS_AUTH / "nats.conf", tmp_path / "auth")
    only_w1 = role_permissions("worker", identity="w1").to_conf()
    text = config.read_text()
    anchor = '{ user: worker, password: "worker-secret", permissions: $NATFLOW_WORKER }'
    assert anchor in text
    user = f'{{ user: w1, password: "w1-secret", permissions: {only_w1} }}'
    # `natflow worker --identity w1 --processes 2` names its processes w1-0 and w1-1
    two = role_permissions("worker", identity="w1", processes=2).to_conf()
    user += f'\n    {{ user: w1p, password: "w1p-secret", permissions: {two} }}'
    config.write_text(text.replace(anchor, f"{anchor}\n    {user}"))
    server = EmbeddedServer(config, store_dir=tmp_path / "auth-log")
    server.start()
    try:
        async with running_engine(server.url, **creds("engine")):
            w1 = await Client.connect(server.url, user="w1", password="w1-secret")
            async with w1:
                with anyio.fail_after(10), pytest.raises(PermissionDenied, match="--identity"):
                    await Worker(w1, [roles_plain], identity="w2").run()
                # One process of an identity made for one: the hint names --processes.
                with anyio.fail_after(10), pytest.raises(PermissionDenied, match="--processes"):
                    await Worker(w1, [roles_plain], identity="w1-0").run()
                client = await connect_as(server, "client")
                async with client, running_worker(w1, [roles_plain], identity="w1"):
                    handle = await client.start(roles_plain, 1)
                    assert await handle.result(timeout=15) == 2
            w1p = await Client.connect(server.url, user="w1p", password="w1p-secret")
            client = await connect_as(server, "client")
            async with w1p, client, running_worker(w1p, [roles_plain], identity="w1-1"):
                handle = await client.start(roles_plain, 2)
                assert await handle.result(timeout=15) == 3
    finally:
        server.stop()
