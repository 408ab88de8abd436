"""The check in tests/conftest.py that fails a test leaving a process running: it finds a
child, and a grandchild whose parent has exited (which /proc no longer shows as ours)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.procs import OWNER_VARIABLE, gone, kill_all, owned_by


def test_a_child_and_an_orphaned_grandchild_are_found_by_their_mark() -> None:
    mark = f"leftover-check-{os.getpid()}"
    env = {**os.environ, OWNER_VARIABLE: mark}
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = subprocess.Popen(sleeper, env=env, start_new_session=True)
    # A parent that starts a grandchild in a session of its own and exits at once.
    spawn = (
        "import subprocess as s; print(s.Popen("
        f"{sleeper!r}, start_new_session=True, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"
    )
    parent = subprocess.run(
        [sys.executable, "-c", spawn], env=env, capture_output=True, text=True, check=True
    )
    grandchild = int(parent.stdout)
    try:
        assert sorted(owned_by(mark)) == sorted([child.pid, grandchild])
        assert os.environ[OWNER_VARIABLE] not in ("", mark)  # this test's own mark is other
    finally:
        kill_all([child.pid, grandchild])
        child.wait()
    assert gone([child.pid, grandchild], timeout=10) == []
    assert owned_by(mark) == []
