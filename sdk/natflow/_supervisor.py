"""``natflow worker --processes N``: one command, N worker processes, supervised.

One Python process runs on one core; a machine with more cores needs more processes. The
supervisor starts N ``natflow worker`` children with the same arguments, starts again one
that dies (with a backoff, so a worker that crashes again and again does not spin), and on
SIGTERM or Ctrl-C forwards SIGTERM to every child, so each drains its runs within
``--grace`` as a single worker would, then exits. It connects to nothing itself.

A child that fails on its first start, with the exit status a natflow command gives for an
error it has explained (1: a refused TLS handshake, a denied permission, a factory that made
no Worker), ends the command with that status, its children drained: restarting it would
only print the same error every 30 s, where one worker process would have exited. A worker
with no server to reach does not exit (it waits for one), so that never ends the command.

The children's metrics are one endpoint: each child writes them under a folder of the
supervisor's (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``), and the
supervisor serves their sum on ``--metrics-port``, so a scrape configuration names one port
whatever the count (a port per child would also collide with the engine's, next to it).

Children run in their own session: a Ctrl-C in the terminal reaches the supervisor only, and
each child gets exactly one SIGTERM (a second would end its drain early). On Linux each child
also asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a
supervisor killed outright leaves no worker running unsupervised.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import anyio
from natflow_engine import (
    ends_with_parent,
    process_metrics_gone,
    serve_process_metrics,
    whole_number,
)

log = logging.getLogger("natflow.worker")

FIRST_BACKOFF: Final = 1.0  # seconds before starting a dead child again
MAX_BACKOFF: Final = 30.0
HEALTHY_AFTER: Final = 30.0  # a child that ran this long resets its slot's backoff
POLL: Final = 0.2  # seconds between looks at the children
KILL_AFTER_GRACE: Final = 10.0  # past --grace, a child that has not exited is killed
EXPLAINED_ERROR: Final = 1  # a natflow command's exit status for an error it printed


def process_count(value: str) -> int:
    """``--processes``: a number of processes; ``0`` or ``auto``: one per core."""
    if value.strip().lower() in ("0", "auto"):
        return os.cpu_count() or 1
    try:
        return whole_number(value, 0)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"takes a number of processes (0 or auto: one per core), not {value!r}"
        ) from None


def child_argv(argv: Sequence[str], index: int, identity: str | None) -> list[str]:
    """The command line of child ``index``: this one without ``--processes``, as one process,
    with its own identity and no endpoint of its own (the last of a repeated option wins)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        kept.append(arg)
    extra = ["--processes", "1", "--metrics-port", "0"]
    if identity is not None:
        extra += ["--identity", f"{identity}-{index}"]
    return [sys.executable, "-m", "natflow_engine", *kept, *extra]


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    """Runs ``count`` children (see :func:`child_argv`) until signalled."""

    def __init__(
        self,
        count: int,
        argv: Sequence[str],
        *,
        identity: str | None,
        metrics_port: int,
        metrics_host: str,
        grace: float,
    ) -> None:
        self.count = count
        self._argv = list(argv)
        self._identity = identity
        self._metrics = metrics_port
        self._metrics_host = metrics_host
        self._grace = grace
        self._metrics_folder = ""  # where the children write their metrics, while running
        self.slots = [_Slot(i) for i in range(count)]
        self._stopping = False
        self._stopped_by: int | None = None  # the signal that began the drain
        self.failed: int | None = None  # the exit status of a child that could not start

    def _start(self, slot: _Slot) -> None:
        command = child_argv(self._argv, slot.index, self._identity)
        slot.proc = subprocess.Popen(
            command,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_folder},
            start_new_session=True,
            preexec_fn=ends_with_parent(),
        )
        slot.started = time.monotonic()
        log.info("worker process %d started (pid %d)", slot.index, slot.proc.pid)

    def _tend(self, slot: _Slot, now: float) -> None:
        """Start a slot's child again once it died and its backoff passed."""
        if slot.proc is None:
            if now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            return
        code = slot.proc.poll()
        if code is None:
            if now - slot.started >= HEALTHY_AFTER:
                slot.backoff = FIRST_BACKOFF
            return
        pid, slot.proc = slot.proc.pid, None
        process_metrics_gone(pid, self._metrics_folder)
        first_start = slot.restarts == 0 and now - slot.started < HEALTHY_AFTER
        if code == EXPLAINED_ERROR and first_start:
            log.error(
                "worker process %d (pid %d) could not start (exit code %d, its error above); "
                "stopping",
                slot.index,
                pid,
                code,
            )
            self.failed = code
            self._stopping = True
            return
        log.warning(
            "worker process %d (pid %d) exited with code %d; starting it again in %.0f s",
            slot.index,
            pid,
            code,
            slot.backoff,
        )
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)

    async def run(self) -> int:
        """Until SIGTERM or SIGINT, or a child that cannot start; then drain every child and
        return 0 (or that child's exit status)."""
        self._metrics_folder = tempfile.mkdtemp(prefix="natflow-worker-metrics-")
        try:
            serve_process_metrics(self._metrics, self._metrics_host, self._metrics_folder)
            return await self._supervise()
        finally:
            shutil.rmtree(self._metrics_folder, ignore_errors=True)

    async def _supervise(self) -> int:
        for slot in self.slots:
            self._start(slot)
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info(
                            "%s: draining %d worker processes (grace %.0f s)",
                            signal.Signals(signum).name,
                            self.count,
                            self._grace,
                        )
                        self._stopping = True
                        self._stopped_by = signum
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signal)
            while not self._stopping:
                now = time.monotonic()
                for slot in self.slots:
                    self._tend(slot, now)
                await anyio.sleep(POLL)
            tg.cancel_scope.cancel()
        await self._drain()
        if self.failed:
            return self.failed
        return 130 if self._stopped_by == signal.SIGINT else 0  # Ctrl-C, as the README says

    async def _drain(self) -> None:
        alive = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace + KILL_AFTER_GRACE
        # Still listening: a second signal passes on to the children, which then stop at once
        # (it killed this process outright, with its children left to drain unwatched and
        # its metrics folder left behind).
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as again:
            async with anyio.create_task_group() as tg:

                async def second() -> None:
                    async for signum in again:
                        log.warning(
                            "%s again: stopping the worker processes now",
                            signal.Signals(signum).name,
                        )
                        for proc in alive:
                            if proc.poll() is None:
                                proc.send_signal(signum)

                tg.start_soon(second)
                while any(p.poll() is None for p in alive) and time.monotonic() < deadline:  # noqa: ASYNC110 (a child process gives no event to wait on)
                    await anyio.sleep(POLL)
                tg.cancel_scope.cancel()
        for proc in alive:
            if proc.poll() is None:
                log.warning("worker process pid %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
