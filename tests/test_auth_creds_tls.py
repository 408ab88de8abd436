"""Credentials and TLS for real: JWT creds files (`--creds`), worker identity, ops/tls."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nkeys
import pytest
from natflow import (
    Client,
    ConnectionRefused,
    InvalidInput,
    PermissionDenied,
    Worker,
    WorkflowContext,
    workflow,
)
from natflow_engine._auth import role_permissions
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer

from tests.certs import Pki, make_pki
from tests.helpers import ROOT, running_engine, running_worker, wait_for
from tests.natsjwt import Key, Operator
from tests.opsconf import OPS, render_ops


@workflow(name="secured")
async def secured(ctx: WorkflowContext, x: int) -> int:
    return int(await ctx.step("inc", lambda v: v + 1, x))


def claims(role: str, **options: Any) -> dict[str, Any]:
    perms = role_permissions(role, **options)
    return {
        "publish": {"allow": list(perms.publish)},
        "subscribe": {"allow": list(perms.subscribe)},
        "allow_responses": perms.allow_responses,
    }


def natflow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "natflow_engine", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[tuple[Operator, EmbeddedServer]]:
    op = Operator(tmp_path / "op")
    op.account("APP")
    op.user("APP", "engine", claims("engine"))
    op.user(
        "APP",
        "orders-worker",
        claims("worker", queues=["default"], workflows=["secured"], identity="w1"),
    )
    op.user("APP", "shop-frontend", claims("client"))
    server = EmbeddedServer(op.server_config(tmp_path / "js"), store_dir=tmp_path / "log")
    server.start()
    try:
        yield op, server
    finally:
        server.stop()


async def test_creds_files_run_a_workflow_and_the_registry_shows_the_worker_user(
    operator: tuple[Operator, EmbeddedServer],
) -> None:
    op, server = operator
    users = op.accounts["APP"].users
    async with running_engine(server.url, user_credentials=str(users["engine"])):
        worker_client = await Client.connect(
            server.url, user_credentials=str(users["orders-worker"])
        )
        client = await Client.connect(server.url, user_credentials=str(users["shop-frontend"]))
        try:
            async with running_worker(worker_client, [secured], identity="w1"):
                handle = await client.start(secured, 41)
                assert await handle.result(timeout=15) == 42
                workers = await list_workers(client.connection)
                assert [(w.identity, w.account) for w in workers] == [("w1", "APP")]
                assert workers[0].user.startswith("orders-worker (U")

                # The CLI with --creds (the nkeys dependency at work) shows it too.
                shown = await anyio.to_thread.run_sync(
                    lambda: natflow_cli(
                        "--url", server.url, "--creds", str(users["shop-frontend"]), "workers"
                    )
                )
                assert shown.returncode == 0, shown.stderr
                assert "orders-worker (U" in shown.stdout
                assert "in account APP" in shown.stdout
            # Its permissions name identity w1: posing as w2, it cannot register, and is
            # refused at its start (it served runs unseen by `natflow workers`, before).
            with anyio.fail_after(10), pytest.raises(PermissionDenied, match="--identity"):
                await Worker(worker_client, [secured], identity="w2").run()
            assert "w2" not in [w.identity for w in await list_workers(client.connection)]
        finally:
            await client.close()
            await worker_client.close()


async def test_a_connect_line_over_the_servers_limit_is_named_not_no_server(
    tmp_path: Path,
) -> None:
    """The engine's JWT on a server left at the default max_control_line (4 KiB): the
    server closes the connection, which read as "no NATS server answered"."""
    op = Operator(tmp_path / "op")
    op.account("APP")
    creds = op.user("APP", "engine", claims("engine", domain="hub"))
    config = op.server_config(tmp_path / "js", max_control_line=4096)
    server = EmbeddedServer(config, store_dir=tmp_path / "log")
    server.start()
    try:
        with anyio.fail_after(10), pytest.raises(ConnectionRefused, match="max_control_line"):
            await Client.connect(server.url, user_credentials=str(creds))
    finally:
        server.stop()


async def test_a_missing_or_malformed_creds_file_is_named_not_no_server(
    operator: tuple[Operator, EmbeddedServer], tmp_path: Path
) -> None:
    _, server = operator
    with pytest.raises(InvalidInput, match="cannot read the creds file"):
        await Client.connect(server.url, user_credentials=str(tmp_path / "nope.creds"))
    garbage = tmp_path / "garbage.creds"
    garbage.write_text("SUAKSECRETSEED\n")
    with pytest.raises(InvalidInput, match="is not a NATS user creds file") as caught:
        await Client.connect(server.url, user_credentials=str(garbage))
    assert "SUAKSECRETSEED" not in str(caught.value)
    shown = await anyio.to_thread.run_sync(
        lambda: natflow_cli("--url", server.url, "--creds", str(garbage), "runs", "list")
    )
    assert shown.returncode == 1
    assert "is not a NATS user creds file" in shown.stderr


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Pki, EmbeddedServer]]:
    pki = make_pki(tmp_path / "certs")
    config = render_ops(
        OPS / "tls" / "nats.conf",
        tmp_path / "tls",
        {
            "./certs/server.pem": str(pki.server.cert),
            "./certs/server-key.pem": str(pki.server.key),
            "./certs/ca.pem": str(pki.ca),
        },
    )
    server = EmbeddedServer(config, store_dir=tmp_path / "tls-log")
    server.start()
    try:
        yield pki, server
    finally:
        server.stop()


def tls_context(pki: Pki, *, cert: bool = True, trust: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca) if trust else None)
    if cert:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return context


async def test_engine_worker_and_client_over_tls(tls_server: tuple[Pki, EmbeddedServer]) -> None:
    pki, server = tls_server
    url = f"tls://127.0.0.1:{server.port}"
    async with running_engine(url, tls=tls_context(pki)):
        client = await Client.connect(url, tls=tls_context(pki))
        try:
            async with running_worker(client, [secured]):
                handle = await client.start(secured, 1, run_id="tls-1")
                assert await handle.result(timeout=15) == 2
            await wait_for(
                lambda: _listed(client, "tls-1"), timeout=10, what="the run in the index"
            )
        finally:
            await client.close()
        # The CLI with --tls-* flags.
        shown = await anyio.to_thread.run_sync(
            lambda: natflow_cli(
                "--url",
                url,
                "--tls-ca",
                str(pki.ca),
                "--tls-cert",
                str(pki.client.cert),
                "--tls-key",
                str(pki.client.key),
                "runs",
                "show",
                "tls-1",
            )
        )
        assert shown.returncode == 0, shown.stderr
        assert "completed" in shown.stdout


async def _listed(client: Client, run_id: str) -> bool:
    return run_id in [r.run_id for r in await client.list()]


async def test_a_client_without_a_trusted_certificate_is_refused_clearly(
    tls_server: tuple[Pki, EmbeddedServer],
) -> None:
    pki, server = tls_server
    url = f"tls://127.0.0.1:{server.port}"
    began = time.monotonic()
    with pytest.raises(ConnectionRefused, match=r"refused the TLS handshake.*--tls-cert"):
        await Client.connect(url, tls=tls_context(pki, cert=False))
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(str(pki.stranger.cert), str(pki.stranger.key))
    with pytest.raises(ConnectionRefused, match="refused the TLS handshake"):
        await Client.connect(url, tls=stranger)
    assert time.monotonic() - began < 10
    with pytest.raises(ConnectionRefused, match=r"not trusted.*--tls-ca"):
        await Client.connect(url, tls=tls_context(pki, trust=False), connect_timeout=3)
    # The CLI says the same, not "no NATS server answered", and exits.
    shown = await anyio.to_thread.run_sync(
        lambda: natflow_cli("--url", url, "--tls-ca", str(pki.ca), "runs", "list")
    )
    assert shown.returncode == 1
    assert "refused the TLS handshake" in shown.stderr
    assert "no NATS server answered" not in shown.stderr
    # `natflow worker` retries "no server" forever, but not a refusal: it exits, saying why.
    worker = await anyio.to_thread.run_sync(
        lambda: natflow_cli("--url", url, "--tls-ca", str(pki.ca), "worker", "examples.greeting")
    )
    assert worker.returncode == 1
    assert "refused the TLS handshake" in worker.stderr


async def test_a_worker_on_an_nkey_shows_its_public_key_in_the_registry(tmp_path: Path) -> None:
    worker_key = Key.new(nkeys.PREFIX_BYTE_USER)
    seed = tmp_path / "worker.nk"
    seed.write_bytes(worker_key.seed)
    perms = role_permissions("worker").to_conf()
    config = tmp_path / "nkeys.conf"
    config.write_text(
        f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f"authorization {{ users: [\n"
        f'  {{ user: admin, password: "admin-secret" }}\n'
        f"  {{ nkey: {worker_key.public}, permissions: {perms} }}\n"
        f"] }}\n"
    )
    server = EmbeddedServer(config, store_dir=tmp_path / "log")
    server.start()
    try:
        admin = {"user": "admin", "password": "admin-secret"}
        async with running_engine(server.url, **admin):
            client = await Client.connect(server.url, **admin)
            worker_client = await Client.connect(server.url, nkeys_seed=str(seed))
            try:
                async with running_worker(worker_client, [secured], identity="nk1"):
                    assert await (await client.start(secured, 1)).result(timeout=15) == 2
                    workers = await list_workers(client.connection)
                    assert [(w.identity, w.user) for w in workers] == [("nk1", worker_key.public)]
            finally:
                await worker_client.close()
                await client.close()
        # The CLI's --nkey flag signs with the same seed (the worker role may read streams).
        shown = await anyio.to_thread.run_sync(
            lambda: natflow_cli("--url", server.url, "--nkey", str(seed), "init")
        )
        assert shown.returncode == 0, shown.stderr
    finally:
        server.stop()
