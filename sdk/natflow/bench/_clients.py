"""The client processes of ``natflow bench --clients N``: the throughput phase's runs split
among N processes (``_client_run``), so on a machine with many cores the one client starting
every run is not what bounds the figure."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import msgspec
from natflow_engine import NatflowError, ends_with_parent

from ._client_run import ClientJob, ClientTimes

READY_TIMEOUT = 30.0  # seconds for every client process to import and connect
RESULT_LIMIT = 256 * 1024 * 1024  # bytes of one client's times (~60 bytes per run)


class ClientProcesses:
    """N ``_client_run`` processes, each with its share of the run ids, started together."""

    def __init__(self, procs: list[asyncio.subprocess.Process], logs: list[Path]) -> None:
        self._procs = procs
        self._logs = logs

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def check_alive(self) -> None:
        for proc, log in zip(self._procs, self._logs, strict=True):
            if proc.returncode is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise NatflowError(f"bench client exited with code {proc.returncode}:\n{tail}")

    async def go(self) -> None:
        """Every process starts its runs now."""
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        await asyncio.gather(*(p.stdin.drain() for p in self._procs if p.stdin is not None))

    async def results(self) -> list[ClientTimes]:
        """Each process's times, once it has seen every result of its share."""
        return list(await asyncio.gather(*(self._result(p, log) for p, log in self._each())))

    def _each(self) -> list[tuple[asyncio.subprocess.Process, Path]]:
        return list(zip(self._procs, self._logs, strict=True))

    async def _result(self, proc: asyncio.subprocess.Process, log: Path) -> ClientTimes:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            self.check_alive()
            raise NatflowError(f"bench client {proc.pid} ended without a result (log {log})")
        return msgspec.json.decode(line, type=ClientTimes)


@contextlib.asynccontextmanager
async def client_processes(
    env: dict[str, str], logs: list[Path], ids: list[str], timeout: float
) -> AsyncIterator[ClientProcesses]:
    """Start one client per log, each with every len(logs)-th run id, and wait until each
    is connected; on the way out close their stdin (they exit) and wait for them."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i, log in enumerate(logs):
            with _append(log) as err:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "natflow.bench._client_run",
                        env=env,
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=err,
                        limit=RESULT_LIMIT,
                        start_new_session=True,
                        preexec_fn=ends_with_parent(),  # a killed bench leaves none running
                    )
                )
            job = ClientJob(ids=ids[i :: len(logs)], timeout=timeout)
            assert procs[-1].stdin is not None
            procs[-1].stdin.write(msgspec.json.encode(job) + b"\n")
        clients = ClientProcesses(procs, logs)
        try:
            await asyncio.wait_for(_all_ready(clients, procs), READY_TIMEOUT)
        except TimeoutError:
            raise NatflowError(
                f"bench clients were not connected within {READY_TIMEOUT:g} s "
                f"(logs: {logs[0].parent})"
            ) from None
        yield clients
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _append(log: Path) -> BinaryIO:
    return open(log, "ab")  # a child's stderr: opened once, before the phase is timed


async def _all_ready(clients: ClientProcesses, procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        assert proc.stdout is not None
        if (await proc.stdout.readline()).strip() != b"ready":
            await proc.wait()
            clients.check_alive()
            raise NatflowError(f"bench client {proc.pid} did not connect")
