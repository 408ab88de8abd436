"""``natflow bench``'s view of processes: worker processes, their CPU and memory, progress.

CPU and peak memory come from Linux ``/proc``; elsewhere those figures are None.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from natflow_engine import NatflowError, ends_with_parent

from ._report import MIN_MACHINE_WINDOW, Cpu

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_clock(pid: int) -> int:
    # Linux encodes another process's CPU clock as a negative clock id: what
    # clock_getcpuclockid(3) returns, which Python does not expose.
    return ((~pid) << 3) | 2  # CPUCLOCK_SCHED of the whole process


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process, threads that ended included (None if unobservable).

    The process's CPU clock counts in nanoseconds, so a phase of a fraction of a second
    still gets a true figure; ``/proc`` counts in 10 ms ticks and is the fallback."""
    try:
        return time.clock_gettime(_process_clock(pid))
    except (OSError, OverflowError, AttributeError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident memory (``VmHWM``) of a live process, or None if not observable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have run, summed over its cores (Linux):
    user + nice + system time, without interrupt time, which no process is charged for."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:4]]
    except (OSError, ValueError):
        return None
    return sum(fields) / _CLK_TCK


class CpuWindow:
    """CPU used by the clients (this process and any client processes), the workers, the
    engines, the server and everything else on the machine between start and stop. "Other"
    is what the bench did not cause: a busy neighbour that makes the figures of this run
    unrepresentative."""

    def __init__(
        self,
        workers: list[int],
        server: int | None,
        engines: list[int] | None = None,
        clients: list[int] | None = None,
    ) -> None:
        self._workers = workers
        self._server = server
        self._engines = engines
        self._clients = clients or []
        self._engine_cpu = self._sum(engines) if engines is not None else None
        self._wall = time.perf_counter()
        self._client = time.process_time()
        self._client_procs = self._sum(self._clients)
        self._worker_cpu = self._sum(workers)
        self._server_cpu = cpu_seconds(server) if server is not None else None
        self._machine = machine_busy_seconds()

    @staticmethod
    def _sum(pids: list[int]) -> float | None:
        values = [cpu_seconds(pid) for pid in pids]
        return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

    def stop(self) -> Cpu:
        wall = max(time.perf_counter() - self._wall, 1e-9)
        workers = self._sum(self._workers)
        server = cpu_seconds(self._server) if self._server is not None else None

        def pct(before: float | None, after: float | None) -> float | None:
            return None if before is None or after is None else 100 * (after - before) / wall

        client = 100 * (time.process_time() - self._client) / wall
        if self._clients:
            procs = pct(self._client_procs, self._sum(self._clients))
            if procs is None and self._client_procs is not None:
                # read from /proc while they live: a figure without them would look cheap
                raise NatflowError("a bench client process ended before its CPU was read")
            client += procs or 0.0
        used = Cpu(
            window_s=wall,
            client=client,
            workers=pct(self._worker_cpu, workers),
            server=pct(self._server_cpu, server),
            other=None,
            engine=pct(self._engine_cpu, self._sum(self._engines))
            if self._engines is not None
            else None,
        )
        machine = pct(self._machine, machine_busy_seconds())
        if wall < MIN_MACHINE_WINDOW:
            machine = None  # a few ticks of the machine's total would pass for a neighbour
        if machine is not None and used.workers is not None and used.server is not None:
            used.other = max(
                0.0, machine - client - used.workers - used.server - (used.engine or 0.0)
            )
        return used


class WorkerProcesses:
    """``natflow worker natflow.bench._workflows:WORKFLOWS`` processes for one phase."""

    def __init__(self, count: int, env: dict[str, str], logs: list[Path], concurrency: int) -> None:
        self.count = count
        self._env = env
        self.logs = logs
        self._concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "natflow_engine",
            "worker",
            "natflow.bench._workflows:WORKFLOWS",
            "--processes",
            "1",  # the bench counts worker processes itself
            "--max-concurrent-runs",
            str(self._concurrency),
            "--grace",
            "5",
        ]
        for path in self.logs:
            with open(path, "ab") as out:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        env=self._env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=ends_with_parent(),  # a killed bench leaves none running
                    )
                )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for proc, path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-20:])
                raise NatflowError(f"bench worker exited with code {proc.returncode}:\n{tail}")

    def peak_rss(self) -> list[float | None]:
        return [peak_rss_mib(pid) for pid in self.pids]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- progress ----------------------------------------------------------------------------


class Progress:
    """One line per phase on stderr; on a terminal the line also shows live counts."""

    def __init__(self, phases: int, stream: TextIO = sys.stderr) -> None:
        self._phases = phases
        self._stream = stream
        self._tty = stream.isatty()
        self._n = 0
        self._label = ""
        self._t0 = 0.0

    def begin(self, label: str) -> None:
        self._n += 1
        self._label = f"[{self._n}/{self._phases}] {label}"
        self._t0 = time.perf_counter()
        self.update("")

    def update(self, text: str) -> None:
        if self._tty:
            self._stream.write(f"\r\x1b[K{self._label} {text}")
            self._stream.flush()

    def end(self, summary: str) -> None:
        took = time.perf_counter() - self._t0
        line = f"{self._label}: {summary} ({took:.1f} s)"
        self._stream.write(f"\r\x1b[K{line}\n" if self._tty else f"{line}\n")
        self._stream.flush()
