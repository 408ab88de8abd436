"""Shared test helpers: waiting on conditions, worker subprocesses, step counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats.js.errors
from natflow import Client, Worker, Workflow
from natflow.testing import Replayer, ReplayResult
from natflow_engine import _reader
from natflow_engine._streams import DISPATCHERS, HISTORY_STREAM, start_consumer, stream_configs
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


async def wait_for(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> T:
    """Poll ``check`` until it returns something truthy, failing after ``timeout``.

    ``interval``: the pause between checks; a costly check (a full list) polled every 20 ms
    takes the event loop from the services in the same process that it waits for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(interval)


@asynccontextmanager
async def running_worker(
    client: Client, workflows: list[Workflow], **kwargs: object
) -> AsyncIterator[Worker]:
    worker = Worker(client, workflows, **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield worker
        finally:
            await worker.shutdown(grace=0)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def overheard(client: Client, subject: str) -> AsyncIterator[list[Msg]]:
    """Every message published on ``subject`` while the block runs (a plain subscription)."""
    heard: list[Msg] = []

    async def keep(msg: Msg) -> None:
        heard.append(msg)

    sub = await client.connection.nc.subscribe(subject, cb=keep)
    try:
        yield heard
    finally:
        await sub.unsubscribe()


def spawn_worker(
    url: str, target: str, *args: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`natflow worker TARGET` as one real process (its own session, for clean signals);
    ``args`` may ask for more (``--processes N``)."""
    full_env = {**os.environ, "NATFLOW_URL": url, "PYTHONPATH": str(ROOT), **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "natflow_engine", "worker", target, "--processes", "1", *args],
        cwd=ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def spawn_engine(url: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """`natflow engine` as one real process (its own session), its output to ``log``."""
    env = {**os.environ, "NATFLOW_URL": url, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "natflow_engine", "engine", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def count_lines(path: Path) -> Counter[str]:
    """Lines appended by step bodies: one line per execution, counted outside the worker."""
    if not path.exists():
        return Counter()
    return Counter(path.read_text().splitlines())


async def replay_recorded(client: Client, workflow: Workflow, run_id: str) -> ReplayResult:
    """Replay a finished run's history without its final event, as a new worker would after a
    crash: the workflow must re-derive its result from the recorded outcomes alone."""
    events = (await client.history(run_id))[:-1]
    return Replayer([workflow]).replay(events, run_id)


@asynccontextmanager
async def running_engine(url: str, **nats_options: Any) -> AsyncIterator[Any]:
    """The engine services in-process, on their own connection (closed, not drained, once
    the engine is stopped: a drain could wait on a pull subscription the cancelled engine
    left behind, for nats-py's whole 30 s drain timeout)."""
    from natflow_engine._engine import Engine

    own = await Client.connect(url, **nats_options)
    service = Engine(own.connection)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.run)
            await service.ready.wait()
            yield service
            tg.cancel_scope.cancel()
    finally:
        await own.connection.nc.close()


async def dispatcher_caught_up(client: Client) -> bool:
    """Whether the engine's dispatcher has processed and acknowledged every event it was given."""
    jsm = client.connection.jsm
    infos = [await jsm.consumer_info(HISTORY_STREAM, name) for name in DISPATCHERS]
    return all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)


def read_requests(monkeypatch: Any) -> list[dict[str, Any]]:
    """Every batch-read request (``_reader``) made from now on, as sent, in order."""
    sent: list[dict[str, Any]] = []
    ask = _reader.BatchReader._ask

    async def counted(self: Any, subject: str, request: dict[str, Any], *args: Any) -> None:
        sent.append(request)
        await ask(self, subject, request, *args)

    monkeypatch.setattr(_reader.BatchReader, "_ask", counted)
    return sent


async def add_older_stream(client: Client, name: str, **settings: Any) -> None:
    """Create natflow's stream ``name`` as an older natflow did: as today, but with
    ``settings`` (what it did not have yet)."""
    config = next(c for c in stream_configs() if c.name == name)
    for key, value in settings.items():
        setattr(config, key, value)
    await client.connection.jsm.add_stream(config)


async def start_pulls(client: Client, queue: str, name: str) -> bool:
    """Whether a worker is waiting on the workflow's start consumer (a run started now is
    then delivered from history, not as a task)."""
    jsm = client.connection.jsm
    try:
        info = await jsm.consumer_info(HISTORY_STREAM, start_consumer(queue, name))
    except nats.js.errors.NotFoundError:  # the worker has not made it yet
        return False
    return (info.num_waiting or 0) > 0
