"""One client process of ``natflow bench --clients N``: starts its share of the throughput
phase's runs at once and awaits each result, as a user's client would.

Run by :class:`~natflow.bench._clients.ClientProcesses` as ``python -m
natflow.bench._client_run``; it speaks on stdin and stdout, one JSON line each way:

1. reads the job: ``{"ids": [...], "timeout": seconds}``;
2. connects (``NATFLOW_URL`` and the ``NATFLOW_*`` credentials), writes ``ready``;
3. waits for ``go``, starts every run, awaits every result, writes the :class:`ClientTimes`;
4. exits when its stdin closes, so its CPU can be read until the bench's window ends.

Times are ``time.perf_counter()``: the machine's monotonic clock on Linux and macOS, the
same in every process, so the bench compares them with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import msgspec
from natflow_engine import NatflowError, connect_options, run_event_loop

from .._client import Client
from ._sizes import RUN_STEPS
from ._workflows import bench_steps


class ClientJob(msgspec.Struct, kw_only=True):
    ids: list[str]
    timeout: float


class ClientTimes(msgspec.Struct, kw_only=True):
    """When each run was started and its result seen, and how many failed."""

    starts: dict[str, float] = msgspec.field(default_factory=dict)
    done: dict[str, float] = msgspec.field(default_factory=dict)
    failed: int = 0
    started_all: float = 0.0


def _env_options() -> argparse.Namespace:
    """The bench's credentials, as its child environment carries them."""
    names = ("creds", "user", "password", "token", "tls_ca", "tls_cert", "tls_key", "nkey")
    return argparse.Namespace(**{n: os.environ.get(f"NATFLOW_{n.upper()}") for n in names})


async def run_share(client: Client, ids: list[str], timeout: float, times: ClientTimes) -> None:
    """Start every run of ``ids`` at once and await each result, filling ``times`` as they
    come (the bench's own client shows its progress from it)."""

    async def one(run_id: str) -> None:
        times.starts[run_id] = time.perf_counter()
        handle = await client.start(bench_steps, RUN_STEPS, run_id=run_id)
        times.started_all = max(times.started_all, time.perf_counter())
        try:
            await handle.result(timeout=timeout)
        except NatflowError:  # a failed or cancelled run: counted, not timed
            times.failed += 1
            return
        times.done[run_id] = time.perf_counter()

    await asyncio.gather(*(one(r) for r in ids))


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    job = msgspec.json.decode(await reader.readline(), type=ClientJob)
    client = await Client.connect(**connect_options(_env_options()))
    try:
        _say(b"ready\n")
        if (await reader.readline()).strip() != b"go":
            return  # the bench gave up before the phase began
        times = ClientTimes()
        await run_share(client, job.ids, job.timeout, times)
        _say(msgspec.json.encode(times) + b"\n")
        await reader.read()  # until the bench has read this process's CPU
    finally:
        await client.close()


def _say(line: bytes) -> None:
    sys.stdout.buffer.write(line)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    run_event_loop(_main())  # as the workers it measures against
