"""Fixtures: a real nats-server per test (free port, temporary store), clients, workers."""

from __future__ import annotations

import inspect
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from natflow import Client
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_engine, stop


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # nats-py needs asyncio


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def engine(nats_server: EmbeddedServer) -> AsyncIterator[Engine]:
    """The engine services, in this process, on their own connection."""
    async with running_engine(nats_server.url) as service:
        yield service


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end are killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop(proc, signal.SIGKILL)


@pytest.fixture
async def client(nats_server: EmbeddedServer) -> AsyncIterator[Client]:
    c = await Client.connect(nats_server.url)
    try:
        yield c
    finally:
        await c.close()
