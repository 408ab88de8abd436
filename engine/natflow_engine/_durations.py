"""Durations: seconds (int/float) or timedelta wherever one is taken."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Final

from ._errors import InvalidInput

# A hundred years: anything longer would land past what a datetime holds (the year 9999)
# once added to now, so a larger duration is a mistake, reported where it is given.
MAX_DURATION: Final = 100 * 365.25 * 86400


def to_seconds(what: str, value: float | timedelta) -> float:
    """Seconds from ``value``; a negative, NaN, infinite or longer than a hundred years
    duration is :class:`InvalidInput`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidInput(f"{what} must be seconds or a timedelta, not {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise InvalidInput(f"{what} must be a finite, non-negative duration, not {value!r}")
    if seconds > MAX_DURATION:
        raise InvalidInput(f"{what} must be at most a hundred years, not {value!r}")
    return seconds


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(what: str, text: str) -> float:
    """Seconds from text such as ``90``, ``2s``, ``15m``, ``12h``, ``30d`` or ``1h30m``."""
    value = text.strip()
    try:
        return to_seconds(what, float(value))
    except ValueError:
        pass
    parts = _PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise InvalidInput(
            f"{what} {text!r} is not a duration: write seconds (90) or a number with a unit "
            f"(ms, s, m, h, d, w), such as 2s, 15m, 30d or 1h30m"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds > MAX_DURATION:
        raise InvalidInput(f"{what} {text!r} is longer than a hundred years")
    return seconds
