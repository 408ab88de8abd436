"""Failures that repeat for every item while one cause lasts (the server's store full, a
leader being elected), logged at warning once per window and at debug in between.

With the store full, an engine logged 30 to 72 warnings a second, one per run it could not
enqueue, per timer it could not fire, per event it could not fold: a flood into the disk
and the log pipeline of a machine whose trouble is storage already.
"""

from __future__ import annotations

import logging
import time
from typing import Final

WINDOW: Final = 30.0  # seconds between two warnings of one kind

_last: dict[str, float] = {}


def level_for(kind: str, window: float = WINDOW) -> int:
    """``logging.WARNING`` for the first failure of ``kind`` in ``window`` seconds, else
    ``logging.DEBUG``."""
    now = time.monotonic()
    last = _last.get(kind)
    if last is not None and now - last < window:
        return logging.DEBUG
    _last[kind] = now
    return logging.WARNING
