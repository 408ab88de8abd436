"""Child processes that end with the process that started them.

natflow starts its children (nats-server, bench and supervised workers) in their own session,
so a Ctrl-C in the terminal reaches only the parent, which stops each child in order. A
parent killed outright (SIGKILL, or SIGTERM before it could stop them) would leave them
running with nobody to stop them: on Linux each child asks the kernel for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

_PR_SET_PDEATHSIG: Final = 1


@functools.cache
def _prctl() -> Any:
    """libc's ``prctl``, looked up in the parent: the child, forked from a process that may
    run other threads, only makes the one foreign call (no import, no allocation of note)."""
    return ctypes.CDLL(None, use_errno=True).prctl


def ends_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets SIGTERM when this
    process dies. None off Linux, and off the main thread: the kernel signals the child when
    the *thread* that started it ends, and only the main thread lives as long as the process
    (a child started from a worker thread would be stopped when that thread is retired)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl, sigterm = _prctl(), int(signal.SIGTERM)

    def term_with_parent() -> None:  # in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, sigterm)

    return term_with_parent
