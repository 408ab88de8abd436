"""Durations: seconds (int/float) or timedelta wherever one is taken."""

from __future__ import annotations

import math
from datetime import timedelta

from ._errors import InvalidInput


def to_seconds(what: str, value: float | timedelta) -> float:
    """Seconds from ``value``; a negative, NaN or infinite duration is :class:`InvalidInput`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidInput(f"{what} must be seconds or a timedelta, not {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise InvalidInput(f"{what} must be a finite, non-negative duration, not {value!r}")
    return seconds
