"""Starts under flow control: run rate limits, singleton and debounce (README "Flow control").

All three keep their state in the ``natflow_rates`` KV bucket, so every client and worker
agrees; a workflow that declares none of them never reads it.

* **Rate limit of runs**: a start over the rate is not refused; it takes the next slot of the
  limit and the run is created with ``not_before`` at that slot (a delayed start, shown as
  "rate limited until ..."), so the starter never waits.
* **Singleton**: at most one open run per key. The run id is derived from the key and a
  generation kept in KV (``<workflow>-s-<key>-<n>``): a start creates run ``n`` with the
  conditional create (two starters make one run); if run ``n`` exists and is open, the start
  returns its handle; if it is closed, the generation moves to ``n + 1`` by a
  revision-checked put and the start tries again. No window exists in which two runs of a
  key are open, and no lock is held by anyone who may die.
* **Debounce**: one cell per key holds the pending run's generation, its window's end and
  the latest input. The first start opens a window (creates run ``<workflow>-d-<key>-<n>``
  with ``not_before`` = its end); later starts only replace the input in the cell, until the
  run begins: its first command is a step that takes the cell's input (marking the cell
  taken, revision-checked), so the input the run got is recorded in its history and replays
  alike. The window counts from the first start (a steady stream of starts cannot postpone
  the run forever).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
from natflow_engine import (
    ERR_WRONG_LAST_SEQUENCE,
    RATES_BUCKET,
    InvalidInput,
    JetStreamError,
    NatflowError,
    Runs,
    ensure_rates_bucket,
    kv_get,
    kv_put,
    open_sealed,
    reserve,
    seal,
)
from natflow_engine.events import RunStarted

from ._steps import step_connection

if TYPE_CHECKING:
    from ._context import WorkflowContext
    from ._workflow import KeySpec, Workflow

log = logging.getLogger("natflow.flow")

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,48}")
_TRIES = 20
_REPAIR_AFTER = 2.0  # seconds past its window a run that has not begun is created again
DEBOUNCE_STEP = "natflow-debounce"  # the first step of a debounced run: takes its input


def key_of(what: str, spec: KeySpec | None, value: Any) -> str | None:
    """The key a flow-control option computes from a run's input (None: no key).

    ``spec`` is an input field (dotted for nested fields: ``"account.region"``, as
    ``Limit(key=...)`` takes it) or a function of the input.
    """
    if spec is None or spec == "":
        return None
    if not callable(spec):
        return str(_field(what, value, spec))
    try:
        return str(spec(value))
    except Exception as exc:
        raise InvalidInput(
            f"the key of {what} could not be computed from the input: {type(exc).__name__}: {exc}"
        ) from exc


def _field(what: str, value: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif not isinstance(value, Mapping) and hasattr(value, part):
            value = getattr(value, part)
        else:
            raise InvalidInput(f"the input has no field {path!r} (the key of {what})")
    return value


def _token(key: str | None) -> str:
    if key is None:
        return "_"
    if _TOKEN.fullmatch(key):
        return key
    return "h" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _base_id(prefix: str, workflow: str, key: str | None) -> str:
    return f"{_token(workflow)[:48]}-{prefix}-{_token(key)}"


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


def check_flow_start(workflow: Workflow, run_id: str | None) -> None:
    """A singleton or debounced workflow's run ids are natflow's to choose."""
    if run_id is not None and (workflow.singleton is not None or workflow.debounce is not None):
        kind = "singleton" if workflow.singleton is not None else "debounced"
        raise InvalidInput(
            f"workflow {workflow.name!r} is {kind}: its run ids come from its key, so start it "
            f"without run_id (the handle names the run)"
        )


async def flow_start(
    runs: Runs,
    workflow: Workflow,
    input: Any,
    data: bytes,
    queue: str,
    not_before: datetime | None,
    **start: Any,
) -> tuple[str, bool]:
    """Start a run of a flow-controlled workflow; ``(run_id, created)`` as ``Runs.start``."""
    creator = _Creator(runs, workflow, input, queue, start)
    if workflow.debounce is not None:
        key = key_of("debounce", workflow.debounce.key, input)
        return await _debounced(creator, key, data, not_before)
    if workflow.singleton is not None:
        key = key_of("singleton", workflow.singleton, input)
        return await _singleton(creator, key, data, not_before)
    return await creator.create(None, data, not_before)


class _Creator:
    """Creates the run, first taking a slot of the workflow's rate limit (if it has one)."""

    def __init__(
        self, runs: Runs, workflow: Workflow, input: Any, queue: str, start: dict[str, Any]
    ) -> None:
        self.runs, self.conn, self.workflow = runs, runs.conn, workflow
        self.input, self.queue, self.start = input, queue, start

    async def create(
        self,
        run_id: str | None,
        data: bytes,
        not_before: datetime | None,
        debounce: str | None = None,
    ) -> tuple[str, bool]:
        limited = None
        limit = self.workflow.rate_limit
        if limit is not None:
            key = key_of("rate limit", limit.key, self.input)  # type: ignore[arg-type]
            earliest = not_before.timestamp() if not_before is not None else 0.0
            go_at = await reserve(self.conn, limit, key, earliest=earliest)
            if go_at > time.time() and (not_before is None or go_at > not_before.timestamp()):
                not_before, limited = datetime.fromtimestamp(go_at, UTC), limit.name
        return await self.runs.start(
            self.workflow.name,
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
    base = _base_id("s", creator.workflow.name, key)
    cell = f"singleton.{base}"
    for _ in range(_TRIES):
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
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
    raise NatflowError(f"singleton {cell}: {_TRIES} starts in a row lost to other starters")


async def _debounced(
    creator: _Creator, key: str | None, data: bytes, not_before: datetime | None
) -> tuple[str, bool]:
    conn = creator.conn
    await ensure_rates_bucket(conn)
    assert creator.workflow.debounce is not None
    base = _base_id("d", creator.workflow.name, key)
    cell = f"debounce.{base}"
    stored = seal(conn.codec, data) if conn.codec is not None else data
    if len(stored) > conn.max_payload // 2 - 1024:  # the cell keeps two inputs at most
        raise InvalidInput(
            f"the input of debounced workflow {creator.workflow.name!r} is {len(stored)} bytes; "
            f"debounced inputs wait in KV and must stay under {conn.max_payload // 2 - 1024} "
            f"bytes: pass a reference (an id, a URL) instead"
        )
    for _ in range(_TRIES):
        found = await kv_get(conn, RATES_BUCKET, cell)
        window = _window_dec.decode(found[0]) if found else None
        revision = found[1] if found else 0
        if window is not None and not window.taken:  # join the pending run: last input wins
            new = msgspec.structs.replace(window, input=msgspec.Raw(stored))
            opened = False
        else:
            new = _Window(
                gen=(window.gen if window else 0) + 1,
                # The window ends after its length, or at start_delay if that is later.
                due=max(
                    time.time() + creator.workflow.debounce.seconds,
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
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                raise
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


async def debounced_input(ctx: WorkflowContext, start: RunStarted) -> bytes:
    """The input a debounced run takes as it begins (its first step; replays from history)."""
    assert start.debounce is not None
    value = await ctx.step(DEBOUNCE_STEP, _take_input, start.debounce, bytes(start.input))
    return msgspec.json.encode(value)


async def _take_input(debounce: str, first_input: bytes) -> Any:
    """Mark the run's window taken and return its latest input (decoded JSON)."""
    conn = step_connection.get()
    cell, _, gen_text = debounce.rpartition("#")
    gen = int(gen_text)
    for _ in range(_TRIES):
        found = await kv_get(conn, RATES_BUCKET, cell)
        window = _window_dec.decode(found[0]) if found else None
        if window is None or window.gen != gen:
            if window is not None and window.prev_gen == gen:  # the next window opened
                return _opened(conn, bytes(window.prev_input))
            log.warning("debounce %s: window %d is gone; the run takes its first input", cell, gen)
            return _opened(conn, first_input)
        if not window.taken:
            taken = msgspec.structs.replace(window, taken=True)
            try:
                await kv_put(
                    conn, RATES_BUCKET, cell, _enc.encode(taken), revision=found[1] if found else 0
                )
            except JetStreamError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    raise
                continue  # a start replaced the input just now: take the newer one
        return _opened(conn, bytes(window.input))
    raise NatflowError(f"debounce {cell}: could not take the input ({_TRIES} conflicts)")


def _opened(conn: Any, data: bytes) -> Any:
    return msgspec.json.decode(open_sealed(conn.codec, data, "debounced input"))
