"""A cuttable link between two servers on loopback: a proxy process the test kills and starts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

PROXY = Path(__file__).resolve().parent / "tcp_proxy.py"


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

    def cut(self) -> None:
        """Kill the proxy: every connection through it drops at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None
