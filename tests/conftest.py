"""Fixtures: a real nats-server per test (free port, temporary store), clients, workers."""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from natflow import Client
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_engine, stop
from tests.procs import OWNER_VARIABLE, command_line, gone, kill_all, owned_by


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # nats-py needs asyncio


_test_numbers = itertools.count(1)
LEFTOVER_GRACE = 10.0  # seconds a signalled process may take to exit (a worker's drain)


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fails a test that leaves a process running, and kills it. Every process the test starts
    inherits a mark of this test in its environment, a grandchild orphaned by its dead parent
    too; processes of wider-scoped fixtures (set up before this one) carry another mark."""
    mark = f"{os.getpid()}-{next(_test_numbers)}"
    before = os.environ.get(OWNER_VARIABLE)
    os.environ[OWNER_VARIABLE] = mark
    try:
        yield
    finally:
        if before is None:
            del os.environ[OWNER_VARIABLE]
        else:
            os.environ[OWNER_VARIABLE] = before
    left = gone(owned_by(mark), LEFTOVER_GRACE)
    if left:
        named = "; ".join(f"{pid}: {command_line(pid)[:200]}" for pid in left)
        kill_all(left)
        pytest.fail(f"the test left {len(left)} process(es) running (now killed): {named}")


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
