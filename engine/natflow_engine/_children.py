"""Child processes that end with the process that started them.

natflow starts its children (nats-server, bench and supervised workers) in their own session,
so a Ctrl-C in the terminal reaches only the parent, which stops each child in order. A
parent killed outright (SIGKILL, or SIGTERM before it could stop them) would leave them
running with nobody to stop them: on Linux each child asks the kernel for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
import threading
from collections.abc import Callable
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def ends_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets SIGTERM when this
    process dies. None off Linux, and off the main thread: the kernel signals the child when
    the *thread* that started it ends, and only the main thread lives as long as the process
    (a child started from a worker thread would be stopped when that thread is retired)."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    return _term_with_parent
