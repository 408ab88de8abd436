"""The topologies in ops/, started for real on loopback: a 3-node cluster and a leaf node."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from natflow import Client, Worker, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import wait_for
from tests.links import free_port

OPS = Path(__file__).resolve().parent.parent / "ops"


def render(source: Path, target: Path, ports: dict[int, int], store: Path) -> Path:
    """The ops file with its loopback ports remapped and its store in ``store``."""
    text = source.read_text()
    text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[int(m[1])]}", text)
    text = re.sub(r'store_dir: "[^"]*"', f'store_dir: "{store}"', text)
    target.write_text(text)
    return target


def ports_in(*files: Path) -> dict[int, int]:
    found = {int(p) for f in files for p in re.findall(r"127\.0\.0\.1:(\d+)", f.read_text())}
    return {port: free_port() for port in sorted(found)}


def step_value(x: int) -> int:
    return x * 2


@workflow(name="edge_flow")
async def edge_flow(ctx: WorkflowContext, x: int) -> dict[str, object]:
    doubled = await ctx.step("double", step_value, x)
    await ctx.sleep("pause", 0.2)
    approval = await ctx.wait_for_signal("approve", timeout=20)
    tripled = await ctx.step("triple", step_value, doubled + x)
    return {"doubled": doubled, "approval": approval, "after": tripled}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EmbeddedServer]]:
    sources = [OPS / "cluster" / f"n{i}.conf" for i in (1, 2, 3)]
    ports = ports_in(*sources)
    servers = [
        EmbeddedServer(
            render(src, tmp_path / src.name, ports, tmp_path / src.stem),
            store_dir=tmp_path / f"{src.stem}-log",
        )
        for src in sources
    ]
    for server in servers:
        server.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def test_cluster_runs_survive_a_node_kill(
    cluster: list[EmbeddedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATFLOW_REPLICAS", "3")
    urls = [s.url for s in cluster]
    client = await Client.connect(urls, connect_timeout=10)

    async def quorum() -> bool:
        try:
            info = await client.connection.jsm.account_info()
        except Exception:  # the cluster is still electing its meta leader
            return False
        return info is not None

    await wait_for(quorum, timeout=60, what="the JetStream meta leader")
    try:
        engine = Engine(client.connection)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.ready.wait()
            info = await client.connection.jsm.stream_info("NATFLOW_HISTORY")
            assert info.config.num_replicas == 3
            async with Worker(client, [edge_flow]):
                handles = [await client.start(edge_flow, i, run_id=f"c-{i}") for i in range(5)]
                leader = info.cluster.leader if info.cluster else None
                victim = next(
                    s for s, n in zip(cluster, ("n1", "n2", "n3"), strict=True) if n == leader
                )
                victim.kill()
                for h in handles:

                    async def waiting(h: object = h) -> bool:
                        state = await client.describe(h.run_id)  # type: ignore[attr-defined]
                        return state.status == "waiting"

                    await wait_for(waiting, timeout=45, what="the run to wait for its signal")
                    await client.signal(h.run_id, "approve", {"ok": True})
                for i, h in enumerate(handles):
                    result = await h.result(timeout=60)
                    assert result == {"doubled": 2 * i, "approval": {"ok": True}, "after": 6 * i}
            tg.cancel_scope.cancel()
    finally:
        await client.close()


@pytest.fixture
def hub_and_edge(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, EmbeddedServer]]:
    sources = [OPS / "leaf" / "hub.conf", OPS / "leaf" / "edge.conf"]
    ports = ports_in(*sources)
    hub = EmbeddedServer(
        render(sources[0], tmp_path / "hub.conf", ports, tmp_path / "hub"),
        store_dir=tmp_path / "hub-log",
    )
    edge = EmbeddedServer(
        render(sources[1], tmp_path / "edge.conf", ports, tmp_path / "e"),
        store_dir=tmp_path / "edge-log",
    )
    hub.start()
    edge.start()
    try:
        yield hub, edge
    finally:
        edge.stop()
        hub.stop()


async def test_worker_behind_a_leaf_node_runs_workflows(
    hub_and_edge: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    hub, edge = hub_and_edge
    central = await Client.connect(hub.url)
    site = await Client.connect(edge.url, domain="hub")

    async def leaf_linked() -> bool:
        try:
            await site.connection.jsm.account_info()
        except Exception:  # the leaf has not connected to the hub yet
            return False
        return True

    await wait_for(leaf_linked, timeout=20, what="the leaf node to reach the hub")
    try:
        engine = Engine(central.connection)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.ready.wait()
            async with Worker(site, [edge_flow]) as worker:
                handle = await central.start(edge_flow, 5, run_id="edge-1")

                async def waiting() -> bool:
                    return (await central.describe("edge-1")).status == "waiting"

                await wait_for(waiting, timeout=20, what="the run to wait for its signal")
                await site.signal("edge-1", "approve", "from the edge")
                assert await handle.result(timeout=20) == {
                    "doubled": 10,
                    "approval": "from the edge",
                    "after": 30,
                }
                history = await central.history("edge-1")
                claims = [e for e in history if e.__struct_config__.tag == "run_claimed"]
                assert {c.worker for c in claims} == {worker.identity}  # type: ignore[union-attr]
            tg.cancel_scope.cancel()
    finally:
        await site.close()
        await central.close()


@workflow(name="one_at_a_time", singleton=True)
async def one_at_a_time(ctx: WorkflowContext) -> str:
    return str(await ctx.wait_for_signal("done"))


@pytest.mark.slow
async def test_racing_starts_on_a_cluster_find_the_run_they_race_for(
    cluster: list[EmbeddedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replicated stream answers a write that loses a race with another still in flight
    with error 10164, not 10071: the losers of a start of one run id (or of a singleton's
    run) raised JetStreamError instead of getting the run's handle."""
    monkeypatch.setenv("NATFLOW_REPLICAS", "3")
    clients = [await Client.connect([s.url for s in cluster], connect_timeout=10) for _ in range(4)]
    try:

        async def quorum() -> bool:
            try:
                return await clients[0].connection.jsm.account_info() is not None
            except Exception:  # the cluster is still electing its meta leader
                return False

        await wait_for(quorum, timeout=60, what="the JetStream meta leader")
        async with Worker(clients[0], [one_at_a_time]):  # declares the singleton
            for round_ in range(10):
                ids, singles = await _race(clients, f"r-{round_}")
                assert ids == [f"r-{round_}"] * 4
                assert len(set(singles)) == 1, singles
    finally:
        for client in clients:
            await client.close()


async def _race(clients: list[Client], run_id: str) -> tuple[list[str], list[str]]:
    """Each client starts ``run_id`` and the singleton at once: the run ids they got."""
    ids: list[str] = []
    singles: list[str] = []

    async def start(client: Client) -> None:
        ids.append((await client.start("edge_flow", 1, run_id=run_id)).run_id)
        singles.append((await client.start(one_at_a_time)).run_id)

    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(start, client)
    return ids, singles
