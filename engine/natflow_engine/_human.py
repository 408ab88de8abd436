"""How natflow shows times and durations to people: one format, with its zone, everywhere."""

from __future__ import annotations

from datetime import UTC, datetime


def when(moment: datetime | None) -> str:
    """``2026-11-26 03:29:15 UTC``: seconds are enough for people; JSON output keeps more."""
    if moment is None:
        return "-"
    if moment.tzinfo is None:  # natflow stores UTC; a naive time is one too
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def duration(seconds: float) -> str:
    """``350 ms``, ``4.2 s``, ``3 min 4 s``, ``2 h 5 min``, ``3 d 4 h``: two units at most."""
    if seconds < 0:
        return "-" + duration(-seconds)
    if round(seconds * 1000) < 1000:  # 0.9996 s is "1.0 s", not "1000 ms"
        return f"{seconds * 1000:.0f} ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    total = round(seconds)
    for big, big_name, small, small_name in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "min"),
        (60, "min", 1, "s"),
    ):
        if total >= big:
            rest = (total % big) // small
            return f"{total // big} {big_name}" + (f" {rest} {small_name}" if rest else "")
    return f"{total} s"  # pragma: no cover - every total >= 60 is handled above


def ago(moment: datetime, now: datetime | None = None) -> str:
    """``4.2 s ago``."""
    return f"{duration(((now or datetime.now(UTC)) - moment).total_seconds())} ago"
