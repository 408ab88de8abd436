"""Starts under flow control: run rate limits, singleton and debounce (README "Flow control").

One implementation for every start path: ``client.start`` with the definition (the SDK
computes the keys, callables included) and the starts that only know a workflow's name
(start by name, children, schedules, event triggers, starts through the engine), which
compute the keys from the declaration workers publish (``_flow_decls``).

All three keep their state in the ``natflow_rates`` KV bucket, so every process agrees.

* **Rate limit of runs**: a start over the rate is not refused; it takes the next slot of the
  limit and the run is created with ``not_before`` at that slot (a delayed start, shown as
  "rate limited until ...").
* **Singleton**: at most one open run per key. The run id is derived from the key and a
  generation kept in KV (``<workflow>-s-<key>-<n>``): a start creates run ``n`` with the
  conditional create (two starters make one run); if run ``n`` exists and is open, the start
  returns its id; if it is closed, the generation moves to ``n + 1`` by a revision-checked put
  and the start tries again. No lock is held by anyone who may die.
* **Debounce**: one cell per key holds the pending run's generation, its window's end and the
  latest input. The first start opens a window (creates run ``<workflow>-d-<key>-<n>`` with
  ``not_before`` = its end); later starts only replace the input in the cell, until the run
  begins: its first step takes the cell's input (:func:`take_debounced_input`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from ._cell_turns import after_conflict, one_at_a_time
from ._connection import Connection, JetStreamError
from ._errors import InvalidInput, NatflowError, RunNotFound
from ._kv import kv_delete, kv_get, kv_put
from ._rates import RateLimit, ensure_rates_bucket, reserve
from ._runs import Runs
from ._sealing import open_sealed, seal
from ._streams import RATES_BUCKET
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.flow")

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,48}")
_TRIES: Final = 20
_REPAIR_AFTER: Final = 2.0  # seconds past its window a run that has not begun is created again


@dataclass(frozen=True)
class FlowPlan:
    """What one start must apply, its keys computed from the run's input.

    ``singleton``/``debounce`` set means the workflow declares it (``debounce`` is the window
    in seconds); ``*_key`` is that option's key for this input (None: one for the workflow).
    """

    rate: RateLimit | None = None
    rate_key: str | None = None
    singleton: bool = False
    singleton_key: str | None = None
    debounce: float | None = None
    debounce_key: str | None = None


def input_field(what: str, value: Any, path: str) -> Any:
    """The field ``path`` (dotted for nested ones) of a run's input: a key of ``what``."""
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif not isinstance(value, Mapping) and hasattr(value, part):
            value = getattr(value, part)
        else:
            raise InvalidInput(f"the input has no field {path!r} (the key of {what})")
    return value


_HASHED = re.compile(r"h[0-9a-f]{24}")
# A workflow's part of a base id must not hold what ends it ("-s-", "-d-"): "rep" with key
# "x-s-y" and "rep-s-x" with key "y" were both "rep-s-x-s-y", one cell and one run.
_SEPARATOR_LIKE = re.compile(r"-[sd](-|$)")


def _token(text: str | None, *, workflow: bool = False) -> str:
    """``text`` as it reads where it is a plain token that cannot be taken for anything
    else, else ``h`` and a hash of it (so a key that looks like another's hash has a hash of
    its own: no caller can name another key's cell)."""
    if text is None:
        return "_"
    plain = _TOKEN.fullmatch(text) and not _HASHED.fullmatch(text)
    if plain and not (workflow and _SEPARATOR_LIKE.search(text)):
        return text
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _base_id(prefix: str, workflow: str, key: str | None) -> str:
    """``<workflow>-<prefix>-<key>``: the workflow's part holds no ``-s-``/``-d-`` and no
    separator ends it, so the first such one is the separator and each base has one
    reading (the generation after the key is an int, last)."""
    return f"{_token(workflow, workflow=True)}-{prefix}-{_token(key)}"


class _Singleton(msgspec.Struct, kw_only=True):
    """KV ``singleton.<base>``: the generation whose run is (or was last) the open one."""

    v: int = 1
    gen: int = 0


class _Window(msgspec.Struct, kw_only=True):
    """KV ``debounce.<base>``: the current window of a debounced workflow and key."""

    v: int = 1
    gen: int
    due: float  # epoch seconds: the window's end, the run's not_before
    input: msgspec.Raw  # the latest input (sealed if the client seals)
    taken: bool = False  # the run has begun and took ``input``
    prev_gen: int = 0  # the window before, kept until its run is surely past its first step
    prev_input: msgspec.Raw = msgspec.Raw(b"null")


_enc = msgspec.json.Encoder()
_singleton_dec = msgspec.json.Decoder(_Singleton)
_window_dec = msgspec.json.Decoder(_Window)


async def flow_start(
    runs: Runs,
    workflow: str,
    plan: FlowPlan,
    queue: str,
    data: bytes,
    not_before: datetime | None,
    run_id: str | None = None,
    **start: Any,
) -> tuple[str, bool]:
    """Start a run under ``plan``; ``(run_id, created)`` as ``Runs.start`` returns.

    ``run_id`` is kept for a start that is only rate limited; a singleton or debounced
    workflow's run ids come from its key (``run_id`` is ignored: the caller checks it).
    ``created`` is False when the start joined a run (the open singleton, the pending
    debounced run).
    """
    creator = _Creator(runs, workflow, plan, queue, start)
    if plan.debounce is not None:
        return await _debounced(creator, plan.debounce, plan.debounce_key, data, not_before)
    if plan.singleton:
        return await _singleton(creator, plan.singleton_key, data, not_before)
    return await creator.create(run_id, data, not_before)


class _Creator:
    """Creates the run, first taking a slot of the workflow's rate limit (if it has one)."""

    def __init__(
        self, runs: Runs, workflow: str, plan: FlowPlan, queue: str, start: dict[str, Any]
    ) -> None:
        self.runs, self.conn, self.workflow, self.plan = runs, runs.conn, workflow, plan
        self.queue, self.start = queue, start

    async def create(
        self,
        run_id: str | None,
        data: bytes,
        not_before: datetime | None,
        debounce: str | None = None,
    ) -> tuple[str, bool]:
        limited = None
        limit = self.plan.rate
        # A start of a run that exists creates nothing, so it takes no slot: a redelivered
        # event, a schedule's fire after a crash, a start joining the open singleton run.
        if limit is not None and run_id is not None and await self.runs.history.exists(run_id):
            limit = None
        if limit is not None:
            earliest = not_before.timestamp() if not_before is not None else 0.0
            go_at = await reserve(self.conn, limit, self.plan.rate_key, earliest=earliest)
            if go_at > time.time() and (not_before is None or go_at > not_before.timestamp()):
                not_before, limited = datetime.fromtimestamp(go_at, UTC), limit.name
        return await self.runs.start(
            self.workflow,
            self.queue,
            data,
            run_id,
            not_before=not_before,
            rate_limited=limited,
            debounce=debounce,
            **self.start,
        )


async def _singleton(
    creator: _Creator, key: str | None, data: bytes, not_before: datetime | None
) -> tuple[str, bool]:
    conn = creator.conn
    await ensure_rates_bucket(conn)
    base = _base_id("s", creator.workflow, key)
    cell = f"singleton.{base}"
    async with one_at_a_time(conn, cell):
        return await _singleton_turn(creator, base, cell, data, not_before)


async def _singleton_turn(
    creator: _Creator, base: str, cell: str, data: bytes, not_before: datetime | None
) -> tuple[str, bool]:
    conn = creator.conn
    for attempt in range(_TRIES):
        found = await kv_get(conn, RATES_BUCKET, cell)
        gen, revision = (_singleton_dec.decode(found[0]).gen, found[1]) if found else (0, 0)
        run_id = f"{base}-{gen}"
        started, created = await creator.create(run_id, data, not_before)
        if created:
            return started, True
        if not (await creator.runs.describe(run_id)).is_closed:
            return run_id, False  # the open run of this key
        try:  # it closed: the next start makes the next generation
            await kv_put(
                conn, RATES_BUCKET, cell, _enc.encode(_Singleton(gen=gen + 1)), revision=revision
            )
        except JetStreamError as exc:
            if not exc.wrong_last_sequence:
                raise
            await after_conflict(attempt)
    raise NatflowError(f"singleton {cell}: {_TRIES} starts in a row lost to other starters")


async def _debounced(
    creator: _Creator,
    window_s: float,
    key: str | None,
    data: bytes,
    not_before: datetime | None,
) -> tuple[str, bool]:
    conn = creator.conn
    await ensure_rates_bucket(conn)
    base = _base_id("d", creator.workflow, key)
    cell = f"debounce.{base}"
    stored = seal(conn.codec, data) if conn.codec is not None else data
    if len(stored) > conn.max_payload // 2 - 1024:  # the cell keeps two inputs at most
        raise InvalidInput(
            f"the input of debounced workflow {creator.workflow!r} is {len(stored)} bytes; "
            f"debounced inputs wait in KV and must stay under {conn.max_payload // 2 - 1024} "
            f"bytes: pass a reference (an id, a URL) instead"
        )
    async with one_at_a_time(conn, cell):
        return await _debounce_turn(creator, window_s, base, cell, data, stored, not_before)


async def _debounce_turn(
    creator: _Creator,
    window_s: float,
    base: str,
    cell: str,
    data: bytes,
    stored: bytes,
    not_before: datetime | None,
) -> tuple[str, bool]:
    conn = creator.conn
    for attempt in range(_TRIES):
        found = await kv_get(conn, RATES_BUCKET, cell)
        window = _window_dec.decode(found[0]) if found else None
        revision = found[1] if found else 0
        if window is not None and not window.taken and await _ended(creator.runs, base, window):
            # Its run was cancelled (or terminated) before it took its input: joined, every
            # later start of the key was that closed run, for good.
            window = msgspec.structs.replace(window, taken=True)
        if window is not None and not window.taken:  # join the pending run: last input wins
            new = msgspec.structs.replace(window, input=msgspec.Raw(stored))
            opened = False
        else:
            new = _Window(
                gen=(window.gen if window else 0) + 1,
                # The window ends after its length, or at start_delay if that is later.
                due=max(
                    time.time() + window_s,
                    not_before.timestamp() if not_before is not None else 0.0,
                ),
                input=msgspec.Raw(stored),
                prev_gen=window.gen if window else 0,
                prev_input=window.input if window else msgspec.Raw(b"null"),
            )
            opened = True
        try:
            await kv_put(conn, RATES_BUCKET, cell, _enc.encode(new), revision=revision)
        except JetStreamError as exc:
            if not exc.wrong_last_sequence:
                raise
            await after_conflict(attempt)
            continue  # another start (or the run taking its input) came first
        run_id = f"{base}-{new.gen}"
        due = datetime.fromtimestamp(new.due, UTC)
        if opened or time.time() > new.due + _REPAIR_AFTER:
            # Past its window and not begun: its opener may have died before creating it
            # (the create is conditional, so this makes no second run).
            started, created = await creator.create(run_id, data, due, f"{cell}#{new.gen}")
            return started, created and opened
        return run_id, False
    raise NatflowError(f"debounce {cell}: {_TRIES} starts in a row lost to other starters")


async def _ended(runs: Runs, base: str, window: _Window) -> bool:
    """Whether the window's run closed (one read of its last event); a run not created yet
    (its opener died) is open: the start creates it, as a repair."""
    try:
        addressee = await runs.readable(f"{base}-{window.gen}")
    except RunNotFound:
        return False
    return addressee is not None and addressee.is_closed


async def forget_cells(conn: Connection, run_id: str) -> None:
    """A deleted run's singleton or debounce cell goes where the run is its current
    generation; a debounce cell that moved on drops the run's input it kept as the previous
    window's. The cells were never removed: one per key for good, each holding the latest
    input of a run long deleted."""
    kind = re.search(r"-([sd])-", run_id)  # the first is the separator (see _base_id)
    base, _, gen_text = run_id.rpartition("-")
    if kind is None or not gen_text.isdigit() or not base:
        return
    gen = int(gen_text)
    cell = f"{'singleton' if kind.group(1) == 's' else 'debounce'}.{base}"
    found = await kv_get(conn, RATES_BUCKET, cell)
    if found is None:
        return
    try:
        if kind.group(1) == "s":
            if _singleton_dec.decode(found[0]).gen == gen:
                await kv_delete(conn, RATES_BUCKET, cell, revision=found[1])
            return
        window = _window_dec.decode(found[0])
        if window.gen == gen:
            await kv_delete(conn, RATES_BUCKET, cell, revision=found[1])
        elif window.prev_gen == gen:  # kept for that run to take: it is gone
            kept = msgspec.structs.replace(window, prev_input=msgspec.Raw(b"null"))
            await kv_put(conn, RATES_BUCKET, cell, _enc.encode(kept), revision=found[1])
    except UNDECODABLE:
        return  # not a cell natflow wrote
    except JetStreamError as exc:
        if not exc.wrong_last_sequence:
            raise  # else a start moved the cell on meanwhile: it is the new run's now


async def take_debounced_input(conn: Connection, debounce: str, first_input: bytes) -> bytes:
    """Mark a debounced run's window taken; returns its latest input (opened JSON).

    ``debounce`` is ``RunStarted.debounce`` (``<cell>#<generation>``), ``first_input`` the
    run's own input (taken when the window is gone).
    """
    cell, _, gen_text = debounce.rpartition("#")
    gen = int(gen_text)
    async with one_at_a_time(conn, cell):
        return await _take_turn(conn, cell, gen, first_input)


async def _take_turn(conn: Connection, cell: str, gen: int, first_input: bytes) -> bytes:
    for attempt in range(_TRIES):
        found = await kv_get(conn, RATES_BUCKET, cell)
        window = _window_dec.decode(found[0]) if found else None
        if window is None or window.gen != gen:
            if window is not None and window.prev_gen == gen:  # the next window opened
                return open_sealed(conn.codec, bytes(window.prev_input), "debounced input")
            log.warning("debounce %s: window %d is gone; the run takes its first input", cell, gen)
            return open_sealed(conn.codec, first_input, "debounced input")
        if not window.taken:
            taken = msgspec.structs.replace(window, taken=True)
            try:
                await kv_put(
                    conn, RATES_BUCKET, cell, _enc.encode(taken), revision=found[1] if found else 0
                )
            except JetStreamError as exc:
                if not exc.wrong_last_sequence:
                    raise
                await after_conflict(attempt)
                continue  # a start replaced the input just now: take the newer one
        return open_sealed(conn.codec, bytes(window.input), "debounced input")
    raise NatflowError(f"debounce {cell}: could not take the input ({_TRIES} conflicts)")
