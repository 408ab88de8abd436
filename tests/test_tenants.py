"""Two applications on one NATS server (ops/tenants): NATS accounts, an engine each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from natflow import Client, RunNotFound, WorkflowContext, workflow
from natflow_engine._jsz import JetStreamUsage
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_STREAM, ensure_streams, stream_created
from prometheus_client import REGISTRY

from tests.helpers import running_engine, running_worker, wait_for
from tests.opsconf import OPS, render_ops


@workflow(name="checkout")
async def checkout(ctx: WorkflowContext, order: str) -> dict[str, str]:
    paid = await ctx.wait_for_signal("paid", timeout=30)
    return {"order": order, "paid": paid}


@pytest.fixture
def tenants_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    config = render_ops(OPS / "tenants" / "nats.conf", tmp_path / "tenants")
    server = EmbeddedServer(config, store_dir=tmp_path / "tenants-log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def login(tenant: str, role: str) -> dict[str, str]:
    return {"user": f"{tenant}_{role}", "password": f"{tenant}-{role}-secret"}


async def test_tenant_b_cannot_see_signal_or_start_tenant_a_runs(
    tenants_server: EmbeddedServer,
) -> None:
    url = tenants_server.url
    async with (
        running_engine(url, **login("shop", "engine")),
        running_engine(url, **login("bank", "engine")),
    ):
        shop = await Client.connect(url, **login("shop", "client"))
        shop_worker = await Client.connect(url, **login("shop", "worker"))
        bank = await Client.connect(url, **login("bank", "client"))
        seen_by_bank: list[str] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            seen_by_bank.append(msg.subject)

        # A raw listener in the bank account, on every natflow subject.
        spy = await nats.connect(url, **login("bank", "client"))
        await spy.subscribe("natflow.history.*.*", cb=on_msg)
        await spy.subscribe("natflow.history.*.start.>", cb=on_msg)  # starts too: none leak
        try:
            async with running_worker(shop_worker, [checkout]):
                await shop.start(checkout, "o-1", run_id="order-1")
                await wait_for(
                    lambda: _status(shop, "order-1", "waiting"), timeout=15, what="waiting"
                )
                shop_events = len(await shop.history("order-1"))

                with pytest.raises(RunNotFound):
                    await bank.describe("order-1")
                with pytest.raises(RunNotFound):
                    await bank.signal("order-1", "paid", "by the bank")
                with pytest.raises(RunNotFound):
                    await bank.cancel("order-1")
                assert await bank.list() == []
                # Starting that id in the bank makes the bank's own run (no bank worker runs
                # it); the shop's run is untouched.
                await bank.start("checkout", "o-1", run_id="order-1")
                assert (await bank.describe("order-1")).status == "pending"
                assert len(await shop.history("order-1")) == shop_events

                await shop.signal("order-1", "paid", "by the shop")
                handle = shop.handle("order-1")
                assert await handle.result(timeout=15) == {"order": "o-1", "paid": "by the shop"}
                assert (await bank.describe("order-1")).status == "pending"
            await spy.flush()
            # The spy saw the bank's own start, never an event of the shop's run.
            assert seen_by_bank == ["natflow.history.order-1.run"]  # no bank worker: no consumer
        finally:
            await spy.close()
            for c in (shop, shop_worker, bank):
                await c.close()


async def _status(client: Client, run_id: str, status: str) -> bool:
    try:
        return (await client.describe(run_id)).status == status
    except RunNotFound:
        return False


async def test_an_engine_exports_its_own_accounts_streams_only(tmp_path: Path) -> None:
    """The monitoring port shows every account; a tenant's engine publishes its own streams'
    sizes, not the other tenant's."""
    config = render_ops(OPS / "tenants" / "nats.conf", tmp_path / "tenants")
    server = EmbeddedServer(config, store_dir=tmp_path / "tenants-log", extra_args=("-m", "-1"))
    server.start()
    try:
        bank = await Client.connect(server.url, **login("bank", "engine"))
        shop = await Client.connect(server.url, **login("shop", "engine"))
        async with bank, shop:
            await ensure_streams(bank.connection)  # the bank's streams exist: not exported
            await ensure_streams(shop.connection)
            usage = JetStreamUsage(
                f"http://127.0.0.1:{server.http_port}",
                own_stream=(
                    HISTORY_STREAM,
                    lambda: stream_created(shop.connection, HISTORY_STREAM),
                ),
            )
            await usage.poll()
            accounts = {
                sample.labels["account"]
                for family in REGISTRY.collect()
                if family.name == "natflow_jetstream_stream_messages"
                for sample in family.samples
            }
            assert accounts == {"SHOP"}
    finally:
        server.stop()
