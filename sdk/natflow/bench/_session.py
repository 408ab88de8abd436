"""What every phase of ``natflow bench`` shares: the client, the sizes, the progress lines,
the run ids, and the worker processes it starts and waits for."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from natflow_engine import (
    TASK_STREAM,
    EmbeddedServer,
    NatflowError,
    connect_options,
    event_loop_name,
    queue_consumer,
    read_jsz,
    record_sync_mode,
    redact_url,
)

from .._client import Client
from ._procs import CpuWindow, Progress, WorkerProcesses
from ._report import Environment
from ._sizes import RUN_STEPS, Sizes
from ._workflows import BENCH_QUEUE, MARKS_ENV, bench_steps

PHASES = 9


class BenchSession:
    """One bench against one server: what its phases share, and its worker processes."""

    def __init__(
        self, url: str, args: argparse.Namespace, sizes: Sizes, server: EmbeddedServer | None
    ) -> None:
        self.url = url
        self.sizes = sizes
        self.server = server
        self.quick = bool(args.quick)
        self._options = connect_options(args)
        self._dir = Path(tempfile.mkdtemp(prefix="natflow-bench-"))
        self._env = self._child_env(args)
        self.nonce = uuid.uuid4().hex[:8]
        self.progress = Progress(PHASES)
        self.run_ids: list[str] = []
        self._phase_names: dict[str, int] = {}
        self._load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self._client: Client | None = None
        self.monitor: str | None = getattr(args, "bench_monitor", None)
        if server is not None:  # only its own monitoring speaks for the embedded server
            self.monitor = f"http://127.0.0.1:{server.http_port}" if server.http_port else None
        self._durability = "unknown (pass --monitor URL)"

    def _child_env(self, args: argparse.Namespace) -> dict[str, str]:
        env = {
            **os.environ,
            "NATFLOW_URL": self.url,
            "NATFLOW_LOG_LEVEL": "WARNING",
            "NATFLOW_WORKER_METRICS_PORT": "0",
            MARKS_ENV: str(self._dir / "marks"),
        }
        names = ("creds", "nkey", "user", "password", "token", "tls_ca", "tls_cert", "tls_key")
        for name in names:
            value = getattr(args, name, None)
            if value:
                env[f"NATFLOW_{name.upper()}"] = str(value)
        return env

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    def phase_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``... when a phase of that name ran before (``--scale
        1,1``): its runs, logs and workers are then its own, not the earlier phase's."""
        seen = self._phase_names[name] = self._phase_names.get(name, 0) + 1
        return name if seen == 1 else f"{name}-{seen}"

    def run_id(self, kind: str) -> str:
        run_id = f"nb-{self.nonce}-{kind}"
        self.run_ids.append(run_id)
        return run_id

    async def connect(self) -> None:
        """Connect the bench's client and read the server's durability mode, if it can."""
        self._client = await Client.connect(self.url, **self._options)
        if self.monitor is not None:
            try:
                jsz = await read_jsz(self.monitor, flag="--monitor")
            except NatflowError as exc:
                self._durability = f"unknown ({exc})"
                return
            self._durability = jsz.durability()
            # Before any worker starts: each reads it to batch where batches pay.
            await record_sync_mode(self._client.connection, jsz.config.sync_always)

    @property
    def env(self) -> dict[str, str]:
        """The environment of the bench's child processes."""
        return self._env

    @property
    def dir(self) -> Path:
        """Where the bench's child processes write their logs."""
        return self._dir

    def environment(self) -> Environment:
        info: dict[str, Any] = getattr(self.client.connection.nc, "_server_info", None) or {}
        return Environment(
            server=redact_url(self.url),
            server_version=str(info.get("version", "?")),
            embedded=self.server is not None,
            python=platform.python_version(),
            cpus=os.cpu_count() or 0,
            platform=platform.platform(),
            load_before=self._load_before,
            durability=self._durability,
            event_loop=event_loop_name(),
        )

    # -- worker processes ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def workers(self, phase: str, count: int) -> AsyncIterator[WorkerProcesses]:
        logs = [self._dir / f"worker-{phase}-{i}.log" for i in range(count)]
        procs = WorkerProcesses(count, self._env, logs, self.sizes.concurrency)
        procs.start()
        try:
            await self._wait_ready(procs)
            yield procs
        finally:
            procs.stop()

    async def _wait_ready(self, procs: WorkerProcesses, timeout: float = 30.0) -> None:
        """Until every worker has a pull waiting on the queue, then a few warm-up runs."""
        deadline = time.monotonic() + timeout
        jsm = self.client.connection.jsm
        while True:
            procs.check_alive()
            with contextlib.suppress(Exception):  # no consumer yet: no worker is up
                consumer = queue_consumer(BENCH_QUEUE, bench_steps.name)
                info = await jsm.consumer_info(TASK_STREAM, consumer)
                if info.num_waiting >= procs.count:
                    break
            if time.monotonic() > deadline:
                raise NatflowError(f"bench workers were not ready within {timeout:g} s")
            await asyncio.sleep(0.05)
        warm = [self.run_id(f"warm-{uuid.uuid4().hex[:6]}") for _ in range(4 * procs.count)]
        handles = [await self.client.start(bench_steps, RUN_STEPS, run_id=r) for r in warm]
        await asyncio.gather(*(h.result(timeout=30) for h in handles))

    @property
    def server_pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def cpu(self, procs: WorkerProcesses) -> CpuWindow:
        return CpuWindow(procs.pids, self.server_pid)
