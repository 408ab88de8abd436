"""When a schedule fires: cron expressions in a time zone, fixed intervals, and jitter.

Cron parsing is cronsim's (the evaluator healthchecks.io runs on millions of checks): it is
small, typed, has no dependencies, and follows Debian cron across daylight-saving changes,
which is what people who write ``0 2 * * *`` expect:

* a fire time that does not exist (the clock jumps from 02:00 to 03:00) fires at the first
  minute that does (03:00), once;
* a fire time that exists twice (the clock goes back from 03:00 to 02:00) fires once, at the
  first of the two;
* expressions with a ``*`` in the minute or hour field (``*/15 * * * *``) run on real elapsed
  time, so they keep their rhythm through the change.

Time zones are IANA names read by :mod:`zoneinfo`. ``every`` intervals are anchored at the Unix
epoch, so every engine replica computes the same fire times (``every=60`` fires on whole
minutes). Jitter delays a fire by a pseudo-random amount derived from the schedule id and the
fire time: every replica agrees on it, and the fire's run id still names its nominal time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._durations import MAX_DURATION
from ._errors import InvalidInput

MIN_EVERY: Final = 1.0  # seconds: fire times are whole seconds
_ALIASES: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`InvalidInput` if there is none of that name."""
    if not isinstance(name, str):
        raise InvalidInput(f"timezone must be an IANA name such as 'UTC', not {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from None


def check_cron(expr: str) -> str:
    """``expr`` if cronsim accepts it (5 fields, 6 with seconds first, or an @alias)."""
    if not isinstance(expr, str) or not expr.strip():
        raise InvalidInput("cron must be a non-empty string such as '0 0 * * *'")
    try:
        CronSim(_ALIASES.get(expr.strip(), expr), datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError, IndexError) as exc:
        raise InvalidInput(
            f"invalid cron expression {expr!r} ({exc}): use five fields "
            f"'minute hour day-of-month month day-of-week', e.g. '30 2 * * 1-5'"
        ) from None
    return expr


class FireTimes:
    """The fire times of one spec: ``cron`` in ``timezone``, or ``every`` seconds."""

    def __init__(self, *, cron: str | None, every: float | None, timezone: str = "UTC") -> None:
        if (cron is None) == (every is None):
            raise InvalidInput("a schedule needs exactly one of cron= or every=")
        self.zone = zone(timezone)
        self.cron = None if cron is None else _ALIASES.get(check_cron(cron).strip(), cron)
        self.every = None if every is None else _check_every(every)

    def after(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``moment``, in UTC, ascending (endless)."""
        moment = _aware(moment)
        if self.every is not None:
            step = self.every
            k = math.floor(moment.timestamp() / step) + 1
            while True:
                yield datetime.fromtimestamp(k * step, UTC)
                k += 1
        assert self.cron is not None
        local = moment.astimezone(self.zone)
        for fire in CronSim(self.cron, local):
            utc = fire.astimezone(UTC)
            if utc > moment:  # ambiguous local times can step back in UTC: never repeat
                moment = utc
                yield utc

    def between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """Fire times in ``(start, end]``; at most ``limit`` (:class:`InvalidInput` if more)."""
        found: list[datetime] = []
        for fire in self.after(start):
            if fire > end:
                return found
            if len(found) == limit:
                raise InvalidInput(f"more than {limit} fire times in that range; narrow it")
            found.append(fire)
        return found  # pragma: no cover (after() never ends)

    def next(self, moment: datetime, count: int) -> list[datetime]:
        times = self.after(moment)
        return [next(times) for _ in range(count)]


def jitter_for(schedule_id: str, fire: datetime, jitter: float) -> float:
    """A delay in ``[0, jitter)`` that every replica computes alike for this fire."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(f"{schedule_id}@{fire.isoformat()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter


def fire_token(fire: datetime) -> str:
    """A fire time as it appears in run ids: ``20261126T030000Z``."""
    return fire.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _check_every(every: float) -> float:
    if not isinstance(every, int | float) or isinstance(every, bool):
        raise InvalidInput(f"every must be seconds, not {type(every).__name__}")
    if not math.isfinite(every) or every < MIN_EVERY:
        raise InvalidInput(f"every must be at least {MIN_EVERY:g} s, not {every!r}")
    if every > MAX_DURATION:
        raise InvalidInput(f"every must be at most a hundred years, not {every!r}")
    if every != int(every):
        raise InvalidInput(f"every must be whole seconds, not {every!r}")
    return float(every)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise InvalidInput(f"{moment!r} has no time zone; pass an aware datetime")
    return moment
