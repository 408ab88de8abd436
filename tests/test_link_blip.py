"""A worker behind a leaf node whose link to the hub blips (shorter than its lease) keeps its
runs and records what it computed: nothing runs twice and nobody takes its runs."""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest
from natflow import Client, Worker, WorkflowContext, workflow
from natflow_engine._connect import connect
from natflow_engine._engine import Engine
from natflow_engine._leases import Leases
from natflow_engine._server import EmbeddedServer

from tests.helpers import spawn_worker, stop, wait_for
from tests.links import Link, free_port

BODIES: Counter[str] = Counter()


async def slow_step(n: int) -> int:
    BODIES[f"slow-{n}"] += 1
    await anyio.sleep(1.0)  # the link is cut while this runs, and its result recorded in the cut
    return n + 1


def quick_step(n: int) -> int:
    BODIES[f"quick-{n}"] += 1
    return n * 10


@workflow(name="blip_flow")
async def blip_flow(ctx: WorkflowContext, n: int) -> int:
    first = await ctx.step("slow", slow_step, n)
    return await ctx.step("quick", quick_step, first)


@pytest.fixture
def hub_leaf_link(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, EmbeddedServer, Link]]:
    """A hub, a leaf without JetStream of its own, and a proxy between them."""
    leaf_port, proxy_port = free_port(), free_port()
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(
        "server_name: hub\nlisten: 127.0.0.1:-1\n"
        f'jetstream {{ store_dir: "{tmp_path / "hub"}", domain: hub }}\n'
        f"leafnodes {{ listen: 127.0.0.1:{leaf_port}, no_advertise: true }}\n"
    )
    edge_conf = tmp_path / "edge.conf"
    edge_conf.write_text(
        "server_name: edge\nlisten: 127.0.0.1:-1\n"
        f'leafnodes {{ remotes: [ {{ url: "nats-leaf://127.0.0.1:{proxy_port}" }} ], '
        'reconnect: "0.5s" }\n'
    )
    hub = EmbeddedServer(hub_conf, store_dir=tmp_path / "hub-log")
    edge = EmbeddedServer(edge_conf, store_dir=tmp_path / "edge-log")
    link = Link(proxy_port, leaf_port)
    hub.start()
    link.up()
    edge.start()
    try:
        yield hub, edge, link
    finally:
        link.cut()
        edge.stop()
        hub.stop()


async def test_a_link_blip_shorter_than_the_lease_moves_no_run(
    hub_leaf_link: tuple[EmbeddedServer, EmbeddedServer, Link], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub, edge, link = hub_leaf_link
    BODIES.clear()
    central = await Client.connect(hub.url)
    site = await Client.connect(edge.url, domain="hub")

    async def linked() -> bool:
        try:
            await site.connection.jsm.account_info()
        except Exception:  # the leaf has not reached the hub (again) yet
            return False
        return True

    await wait_for(linked, timeout=20, what="the leaf node to reach the hub")
    try:
        engine = Engine(central.connection)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.ready.wait()
            async with Worker(site, [blip_flow], lease_ttl=8) as edge_worker:
                handles = [await central.start(blip_flow, n, run_id=f"blip-{n}") for n in range(3)]

                async def all_in_the_slow_step() -> bool:
                    return all(BODIES[f"slow-{n}"] for n in range(3))

                await wait_for(all_in_the_slow_step, timeout=20, what="every run in its step")
                # A worker at the hub, ready to take any run handed back during the cut.
                async with Worker(central, [blip_flow], identity="hub-worker"):
                    link.cut()
                    await anyio.sleep(2.0)  # the cut: past the reaper's probes, short of 8 s
                    link.up()
                    for n, handle in enumerate(handles):
                        assert await handle.result(timeout=30) == (n + 1) * 10
            tg.cancel_scope.cancel()
        assert engine.reaper.reaped == 0
        assert set(BODIES.values()) == {1}, BODIES  # no body ran twice
        for n in range(3):
            history = await central.history(f"blip-{n}")
            tags = [e.__struct_config__.tag for e in history]
            assert tags.count("step_completed") == 2
            claims = [e for e in history if e.__struct_config__.tag == "run_claimed"]
            assert [c.worker for c in claims] == [edge_worker.identity]  # type: ignore[attr-defined]
        assert "taken by another worker" not in caplog.text
        assert "is gone" not in caplog.text
        assert "stay with it until its lease lapses" in caplog.text  # the reaper did look
    finally:
        await site.close()
        await central.close()


def holds(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


async def linked_clients(hub: EmbeddedServer, edge: EmbeddedServer) -> tuple[Client, Client]:
    central = await Client.connect(hub.url)
    site = await Client.connect(edge.url, domain="hub")

    async def linked() -> bool:
        try:
            await site.connection.jsm.account_info()
        except Exception:  # the leaf has not reached the hub yet
            return False
        return True

    await wait_for(linked, timeout=20, what="the leaf node to reach the hub")
    return central, site


async def test_a_cut_longer_than_the_lease_moves_the_run_and_fences_the_old_holder(
    hub_leaf_link: tuple[EmbeddedServer, EmbeddedServer, Link], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub, edge, link = hub_leaf_link
    BODIES.clear()
    central, site = await linked_clients(hub, edge)
    try:
        engine = Engine(central.connection)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.ready.wait()
            async with Worker(site, [blip_flow], lease_ttl=2) as edge_worker:
                handle = await central.start(blip_flow, 7, run_id="lapsed")
                await wait_for(
                    holds(lambda: BODIES["slow-7"] > 0), timeout=20, what="the slow step"
                )
                async with Worker(central, [blip_flow], lease_ttl=2, identity="hub-worker"):
                    link.cut()
                    # The lease lapses: the task comes back and the hub's worker takes the run.
                    await wait_for(
                        holds(lambda: BODIES["slow-7"] == 2), timeout=20, what="takeover"
                    )
                    assert await handle.result(timeout=30) == 80
                    link.up()
                    await anyio.sleep(3.0)  # the old holder's late append meets the new history
            tg.cancel_scope.cancel()
        history = await central.history("lapsed")
        steps = [e.name for e in history if e.__struct_config__.tag == "step_completed"]  # type: ignore[attr-defined]
        assert steps == ["slow", "quick"]  # recorded once each, although the body ran twice
        claims = [e.worker for e in history if e.__struct_config__.tag == "run_claimed"]  # type: ignore[attr-defined]
        assert claims == [edge_worker.identity, "hub-worker"]
    finally:
        await site.close()
        await central.close()


async def test_a_worker_killed_behind_a_live_link_is_still_handed_back_at_once(
    hub_leaf_link: tuple[EmbeddedServer, EmbeddedServer, Link], tmp_path: Path
) -> None:
    hub, edge, _link = hub_leaf_link
    central, site = await linked_clients(hub, edge)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {
        "NATFLOW_DOMAIN": "hub",
        "NATFLOW_TEST_COUNTS": str(tmp_path / "counts"),
        "NATFLOW_TEST_GATE": str(gate),
    }
    proc = spawn_worker(edge.url, "tests.workflows_proc:make_worker", env=env)
    try:
        engine = Engine(central.connection)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.ready.wait()
            # A live peer on the same leaf server shows the engine the link is up.
            async with Worker(site, [blip_flow], lease_ttl=30):
                await central.start("crash_counter", 1, run_id="doomed")

                async def leased() -> bool:
                    return await Leases(central.connection).get("doomed") is not None

                await wait_for(leased, timeout=30, what="the worker process to take the run")
                stop(proc, signal.SIGKILL)
                await wait_for(
                    holds(lambda: engine.reaper.reaped == 1),
                    timeout=10,  # the counter is the reaper's own: taken for gone, not waited out
                    what="the reaper to hand the run back",
                )
            tg.cancel_scope.cancel()
    finally:
        stop(proc)
        await site.close()
        await central.close()


@pytest.mark.slow
async def test_a_link_that_goes_silent_is_given_up_within_thirty_seconds(
    nats_server: EmbeddedServer,
) -> None:
    """No reset, no close: a firewall that forgets the connection, a frozen middlebox. Only
    unanswered pings show it, and natflow's connections give it up within 30 s (nats-py's
    own defaults took up to 6 minutes, the worker idle all the while) and reconnect."""
    link = Link(free_port(), nats_server.port)
    link.up()
    conn = await connect(f"nats://127.0.0.1:{link.listen}")
    lost = anyio.Event()
    conn.on_disconnect.append(lost.set)
    try:
        await conn.nc.flush()  # the link carries
        link.freeze()
        began = time.monotonic()
        with anyio.fail_after(45):
            await lost.wait()
        assert time.monotonic() - began <= 35  # 20-30 s: three pings, 10 s apart
        link.thaw()

        async def back() -> bool:  # through the same link, once it carries again
            return bool(conn.nc.is_connected)

        await wait_for(back, timeout=30, what="the connection back")
    finally:
        link.thaw()
        link.cut()
        await conn.nc.close()
