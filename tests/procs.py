"""Processes as /proc shows them: which ones a test left running (tests/conftest.py checks
every test), and which ones carry a given word on their command line."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

# Every process a test starts inherits this variable with the test's own value, also a
# grandchild its child left behind when it died (which /proc no longer shows as ours).
OWNER_VARIABLE = "NATFLOW_TEST_OWNER"


def _live(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # exited while we looked
        return False


def _pids() -> list[Path]:
    me = str(os.getpid())
    return [e for e in Path("/proc").iterdir() if e.name.isdigit() and e.name != me]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "(exited)"


def owned_by(owner: str) -> list[int]:
    """Live processes whose environment holds ``OWNER_VARIABLE=owner``."""
    needle = f"{OWNER_VARIABLE}={owner}".encode()
    found = []
    for entry in _pids():
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited, or not ours to read
            continue
        if needle in environ.split(b"\0") and _live(entry):
            found.append(int(entry.name))
    return found


def with_argument(word: str) -> list[int]:
    """Live processes one of whose command-line arguments contains ``word``."""
    found = []
    for entry in _pids():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(word.encode() in arg for arg in args) and _live(entry):
            found.append(int(entry.name))
    return found


def gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for ``pids`` to exit; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if _live(Path(f"/proc/{pid}"))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            os.kill(pid, signal.SIGKILL)
