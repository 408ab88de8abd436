"""Loopback for multi-process tests: ports that stay free to listen on again, and a cuttable
link between two servers (a proxy process the test kills and starts)."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROXY = Path(__file__).resolve().parent / "tcp_proxy.py"


def free_port() -> int:
    """A free loopback port below the kernel's range of ephemeral ports, for a server or a
    link a test stops and starts again: a port from ``bind(0)`` lies in that range, and
    while nothing listens there any outgoing connection (of this suite's other processes)
    may take it as its source port, so it could not be listened on again."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 12000)
    for _ in range(500):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


class Link:
    """A TCP proxy from ``listen`` to ``target`` (both on 127.0.0.1) that can be cut."""

    def __init__(self, listen: int, target: int) -> None:
        self.listen = listen
        self.target = target
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self, timeout: float = 10.0) -> None:
        """Start the proxy and wait until it listens."""
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.Popen(
                [sys.executable, str(PROXY), str(self.listen), str(self.target)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() == b"listening":
                self.proc = proc
                return
            proc.wait()
            if time.monotonic() > deadline:  # the port is still held by the last one
                raise RuntimeError(f"the proxy could not listen on {self.listen}")
            time.sleep(0.1)

    def freeze(self) -> None:
        """Stop the proxy (SIGSTOP): its connections stay open and carry nothing, as a link
        that dies without a word (no reset, no close) does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cut(self) -> None:
        """Kill the proxy: every connection through it drops at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
