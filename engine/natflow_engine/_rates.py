"""Rate limits shared by every process: one GCRA cell per (limit, key) in KV.

A rate limit of ``limit`` calls per ``period`` seconds with ``burst`` is kept as the generic
cell rate algorithm's *theoretical arrival time* (TAT): one float per (limit, key), stored in
the ``natflow_rates`` bucket. A take is a reservation: the caller may go at
``go_at = max(now, tat - tolerance)`` (``tolerance = interval * (burst - 1)``), and the new
TAT is ``max(tat, go_at) + interval``, written with the entry's expected revision. On a
conflict (another process took a slot first) the entry is read again and the take retried.
So a take costs one round trip when this process saw the entry last (its revision is cached
per connection), two otherwise, and never a busy loop: the caller learns *when* it may go
and sleeps until then.

With ``burst=1`` (the default) calls are spaced evenly, ``interval`` apart, across every
worker: 100 calls at 10/s take 9.9 s from the first to the last. ``burst=b`` lets ``b`` calls
through at once after an idle spell (a bucket that starts full), then the same spacing.

Times are wall-clock seconds of the taking process: the processes sharing a limit should have
synchronised clocks (NTP); a skewed clock shifts that process's calls by its skew.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import msgspec

from ._cell_turns import after_conflict, one_at_a_time
from ._connection import Connection, JetStreamError
from ._durations import MAX_DURATION
from ._errors import InvalidInput, NatflowError
from ._kv import kv_get, kv_put
from ._names import check_field_path
from ._streams import RATES_BUCKET, ensure_streams

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASHED = re.compile(r"h[0-9a-f]{32}")
_MAX_TRIES: Final = 50
_KEEP_IDLE: Final = 60.0  # seconds an idle cell outlives its TAT (then it expires: a fresh one)


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` calls per ``period`` seconds, shared by every worker.

    Example::

        openai = RateLimit("openai", limit=50, period=60)       # 50 a minute, evenly spaced
        per_customer = RateLimit("crm", limit=10, period=1, key="customer", burst=10)

    ``name`` identifies the limit across processes (``[A-Za-z0-9_-]``): every step or workflow
    that names the same limit shares its budget. ``burst`` (default 1: evenly spaced) is how
    many calls may go at once after an idle spell. ``key`` splits the limit into one budget
    per value: for a workflow, a field of its input (or a callable taking the input); for a
    step, pass ``rate_key=`` to ``ctx.step``.
    """

    name: str
    limit: int
    period: float | timedelta = 1.0  # held as seconds (a timedelta is turned into them)
    burst: int = 1
    key: object = None  # str (input field) | Callable[[input], str] | None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOKEN.fullmatch(self.name):
            raise InvalidInput(
                f"rate limit name {self.name!r} must be 1-64 characters of [A-Za-z0-9_-]"
            )
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise InvalidInput(
                f"rate limit {self.name!r}: limit must be a positive int (calls per period), "
                f"not {self.limit!r}"
            )
        if isinstance(self.period, timedelta):  # as every duration natflow takes (API.md)
            object.__setattr__(self, "period", self.period.total_seconds())
        if (
            isinstance(self.period, bool)
            or not isinstance(self.period, int | float)
            or not 0 < self.period <= MAX_DURATION
        ):
            raise InvalidInput(
                f"rate limit {self.name!r}: period must be positive seconds (an int or a "
                f"float) of at most a hundred years, not {self.period!r}"
            )
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise InvalidInput(
                f"rate limit {self.name!r}: burst must be a positive int, not {self.burst!r}"
            )
        if self.key is not None and not (
            (isinstance(self.key, str) and self.key) or callable(self.key)
        ):
            raise InvalidInput(
                f"rate limit {self.name!r}: key must be an input field's name or a callable "
                f"of the input, not {self.key!r} (leave it out for one budget)"
            )
        if isinstance(self.key, str):
            check_field_path(f"rate limit {self.name!r}: key", self.key)
        try:
            interval = self.seconds / self.limit
        except OverflowError:  # an int past what a float holds
            interval = 0.0
        if not interval > 0:
            raise InvalidInput(
                f"rate limit {self.name!r}: limit {self.limit!r} per {self.period!r} s leaves "
                f"no time between calls; use a smaller limit"
            )

    @property
    def seconds(self) -> float:
        """The period in seconds."""
        period = self.period
        return period.total_seconds() if isinstance(period, timedelta) else float(period)

    @property
    def interval(self) -> float:
        """Seconds between two calls at the sustained rate."""
        return self.seconds / self.limit


class _Cell(msgspec.Struct, kw_only=True):
    """KV ``<limit>.<key>``: the limit's theoretical arrival time for that key."""

    v: int = 1
    tat: float  # theoretical arrival time, epoch seconds


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Cell)


def cell_key(name: str, key: str | None) -> str:
    """The KV key of a limit's cell for one key value (hashed unless it is a plain token)."""
    if key is None:
        return f"{name}._"
    # A plain key that looks like a hash is hashed too: no caller can name another key's cell.
    if not _TOKEN.fullmatch(key) or _HASHED.fullmatch(key):
        key = "h" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"{name}.k{key}"


async def ensure_rates_bucket(conn: Connection) -> None:
    """Make sure natflow's streams, the ``natflow_rates`` bucket among them, exist (free
    after the first call on a connection)."""
    await ensure_streams(conn)


def _cache(conn: Connection) -> dict[str, tuple[float, int]]:
    """This process's last write of each cell: its TAT and revision (saves the read)."""
    cache = conn.extras.setdefault(RATES_BUCKET, {})
    assert isinstance(cache, dict)
    return cache


async def reserve(
    conn: Connection, limit: RateLimit, key: str | None = None, *, earliest: float = 0.0
) -> float:
    """Take one slot of ``limit`` (for ``key``); returns the epoch time the caller may go at.

    A time at or before now means "go now". The slot is the caller's whether or not it uses
    it: a caller that dies while waiting leaves a gap, never an extra call. ``earliest`` (epoch
    seconds) is when the caller could go at the soonest (a delayed start): the slot is taken
    from then on, so calls that all wait for one time are still spaced.
    """
    await ensure_rates_bucket(conn)
    kv_key = cell_key(limit.name, key)
    async with one_at_a_time(conn, kv_key):
        return await _reserve(conn, limit, kv_key, earliest)


async def _reserve(conn: Connection, limit: RateLimit, kv_key: str, earliest: float) -> float:
    cache = _cache(conn)
    tolerance = limit.interval * (limit.burst - 1)
    known = cache.get(kv_key)
    for attempt in range(_MAX_TRIES):
        if known is None:
            found = await kv_get(conn, RATES_BUCKET, kv_key)
            known = (_decoder.decode(found[0]).tat, found[1]) if found else (0.0, 0)
        tat, revision = known
        now = time.time()
        go_at = max(now, earliest, tat - tolerance)
        new_tat = max(tat, go_at) + limit.interval
        try:
            new_revision = await kv_put(
                conn,
                RATES_BUCKET,
                kv_key,
                _encoder.encode(_Cell(tat=new_tat)),
                revision=revision,
                ttl=new_tat - now + _KEEP_IDLE,
            )
        except JetStreamError as exc:
            if not exc.wrong_last_sequence:
                raise
            cache.pop(kv_key, None)
            known = None  # another process took a slot: read and decide again
            await after_conflict(attempt)
            continue
        cache[kv_key] = (new_tat, new_revision)
        return go_at
    raise NatflowError(
        f"rate limit {limit.name!r}: {_MAX_TRIES} takes in a row lost to other processes; "
        f"the cell {RATES_BUCKET}/{kv_key} is contended beyond what it can serve"
    )
