"""argparse types for the ``natflow`` commands' numbers, ports and durations.

Each refuses a value out of its range with a message naming it (exit 2 and the usage line,
as any argparse error) instead of a traceback later (a port over 65535 failed to bind, or
wrapped round) or a value that is silently wrong (a metrics interval of 0 spun a core).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ._durations import parse_duration
from ._errors import InvalidInput


def whole_number(value: str, at_least: int = 0, at_most: int | None = None) -> int:
    """An integer from ``at_least`` to ``at_most``; argparse's error naming what is wrong."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < at_least:
        raise argparse.ArgumentTypeError(f"{value} is below {at_least}")
    if at_most is not None and number > at_most:
        raise argparse.ArgumentTypeError(f"{value} is above {at_most}")
    return number


def positive_int(value: str) -> int:
    """An integer of at least 1."""
    return whole_number(value, 1)


def port(value: str) -> int:
    """A TCP port, 0 to 65535 (0: any free one, or off, as the option says)."""
    try:
        return whole_number(value, 0, 65535)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)") from None


def seconds(at_least: float = 0.0) -> Callable[[str], float]:
    """A duration of at least ``at_least`` seconds: ``90``, ``1.5``, ``2s``, ``15m``, ``1h``."""

    def parse(value: str) -> float:
        try:
            number = parse_duration("the value", value)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value ")) from None
        if math.isnan(number) or number < at_least:
            raise argparse.ArgumentTypeError(f"{value} is below {at_least:g} s")
        return number

    parse.__name__ = "duration"  # what argparse names in its own messages
    return parse


def duration(what: str) -> Callable[[str], float]:
    """A duration as :func:`parse_duration` reads it, its errors naming ``what``."""

    def parse(value: str) -> float:
        try:
            return parse_duration(what, value)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "duration"
    return parse
