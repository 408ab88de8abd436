"""Flow-control declarations: what a workflow's ``@workflow(...)`` options say, as data.

Only a process holding a workflow's definition knows its ``rate_limit``, ``singleton`` and
``debounce``. So each worker writes one declaration per workflow it serves into the
``natflow_rates`` bucket (``decl.<workflow>``) when it starts, "nothing" included, and every
process that starts a run by name (a client without the definition, a parent starting a
child, the engine's scheduler, event triggers and start service) reads it through a cache:
a declaration is read at most once per :data:`DECLARATION_TTL` seconds per workflow and
process, and a worker's own workflows are never read at all. A workflow that declares
nothing costs one cached lookup, no round trip.

A key computed by a function cannot travel as data: such a workflow is declared
``local_only`` and a start without its definition is refused (:class:`InvalidInput`) rather
than made unchecked.

A workflow no worker has declared yet (never deployed, or its workers predate this) starts
plain, with one warning per process and workflow: refusing would break schedules and events
of every workflow whose workers start after them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import msgspec

from ._connection import Connection, retrying
from ._durations import to_seconds
from ._errors import InvalidInput
from ._flow_starts import FlowPlan, flow_start, input_field
from ._kv import kv_get, kv_put
from ._rates import RateLimit, ensure_rates_bucket
from ._runs import Runs
from ._sealing import MissingKey, open_sealed
from ._streams import RATES_BUCKET
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.flow")

DECLARATION_TTL: Final = 5.0  # seconds a read declaration (or its absence) is trusted
_CACHE: Final = "natflow_flow_declarations"
_WARNED: Final = "natflow_flow_undeclared"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RateDeclaration(msgspec.Struct, kw_only=True):
    """A workflow's run rate limit (:class:`RateLimit` less a key function)."""

    name: str
    limit: int
    period: float = 1.0
    burst: int = 1
    key: str | None = None  # an input field


class FlowDeclaration(msgspec.Struct, kw_only=True, omit_defaults=True):
    """KV ``decl.<workflow>``: the flow control a workflow's starts must apply."""

    v: int = 1
    workflow: str
    rate: RateDeclaration | None = None
    singleton: bool = False
    singleton_key: str | None = None  # an input field (None: one open run per workflow)
    debounce: float | None = None  # the window, seconds
    debounce_key: str | None = None
    local_only: str = ""  # why only a holder of the definition can start it (a key function)
    # @workflow(retention=...): seconds its runs are kept once closed, for starts by name
    # (without the definition) to record as a start with it does.
    retention: float | None = None
    # The input fields its concurrency limits are keyed by: a start by name whose input
    # lacks one is refused, as a start with the definition is (it ran keyed "").
    limit_keys: list[str] = msgspec.field(default_factory=list)

    @property
    def controlled(self) -> bool:
        """Whether a start needs more than the plain conditional create."""
        return self.rate is not None or self.singleton or self.debounce is not None


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(FlowDeclaration)


def declaration_key(workflow: str) -> str:
    """The KV key of a workflow's declaration."""
    if _TOKEN.fullmatch(workflow):
        return f"decl.{workflow}"
    return "decl.h" + hashlib.sha256(workflow.encode()).hexdigest()[:32]


def _cache(conn: Connection) -> dict[str, tuple[FlowDeclaration | None, float]]:
    cache = conn.extras.setdefault(_CACHE, {})
    assert isinstance(cache, dict)
    return cache


async def publish_declarations(conn: Connection, declarations: Iterable[FlowDeclaration]) -> None:
    """Write the declarations of the workflows this process serves (a worker, at startup).

    They are cached here for good: this process holds the definitions.
    """
    cache = _cache(conn)
    await ensure_rates_bucket(conn)
    for declaration in declarations:
        key, value = declaration_key(declaration.workflow), _enc.encode(declaration)
        cache[declaration.workflow] = (declaration, math.inf)
        found = await retrying(
            f"reading workflow {declaration.workflow}'s flow control",
            functools.partial(kv_get, conn, RATES_BUCKET, key),
        )
        if found is not None and found[0] == value:
            continue  # declared so already (a write would fail while the store is full)
        # A worker starting while its cluster elects the bucket's leader (a node just died)
        # gets "no responders" for a moment: wait it out, do not die of it.
        await retrying(
            f"declaring workflow {declaration.workflow}'s flow control",
            functools.partial(kv_put, conn, RATES_BUCKET, key, value),
        )


async def declared(conn: Connection, workflow: str) -> FlowDeclaration | None:
    """The workflow's declaration (None: no worker has declared it yet), cached."""
    cache = _cache(conn)
    now = time.monotonic()
    hit = cache.get(workflow)
    if hit is not None and hit[1] > now:
        return hit[0]
    await ensure_rates_bucket(conn)
    found = await kv_get(conn, RATES_BUCKET, declaration_key(workflow))
    try:
        declaration = _dec.decode(found[0]) if found else None
    except UNDECODABLE as exc:  # not a worker's: start plain rather than never
        log.warning("the flow-control declaration of workflow %r is unreadable: %s", workflow, exc)
        declaration = None
    if declaration is not None and declaration.workflow != workflow:
        declaration = None  # a hash collision: treat as undeclared
    cache[workflow] = (declaration, now + DECLARATION_TTL)
    return declaration


def check_portable(declaration: FlowDeclaration) -> None:
    """Refuse a start without the definition of a workflow whose key is a function."""
    if declaration.local_only:
        raise InvalidInput(
            f"workflow {declaration.workflow!r} {declaration.local_only}, which only a process "
            f"holding its definition can call: start it with client.start(<the @workflow>); a "
            f"start by name, a child run, a schedule, an event or a start through the engine "
            f"cannot apply it (give the key as an input field name to allow them)"
        )


def check_limit_keys(conn: Connection, declaration: FlowDeclaration, input_json: bytes) -> None:
    """:class:`InvalidInput` if the input lacks a field a concurrency limit is keyed by."""
    try:
        value = msgspec.json.decode(open_sealed(conn.codec, input_json, "workflow input"))
    except MissingKey:
        return  # its worker checks it, as it opens it
    for field in declaration.limit_keys:
        input_field("a limit", value, field)


def plan_of(conn: Connection, declaration: FlowDeclaration, input_json: bytes) -> FlowPlan:
    """What a start of ``declaration``'s workflow with this input must apply."""
    check_portable(declaration)
    value: Any = None
    if (
        (declaration.rate and declaration.rate.key)
        or declaration.singleton_key
        or (declaration.debounce_key)
    ):
        try:
            value = msgspec.json.decode(open_sealed(conn.codec, input_json, "workflow input"))
        except MissingKey as exc:
            raise InvalidInput(
                f"workflow {declaration.workflow!r} takes a flow-control key from its input, "
                f"which is sealed with a key this process does not hold ({exc})"
            ) from exc

    def key(what: str, field: str | None) -> str | None:
        return None if not field else str(input_field(what, value, field))

    rate = declaration.rate
    debounce = declaration.debounce
    # A declaration may come from anyone (a start request carries its own): checked as
    # ``Debounce`` checks a definition's.
    if debounce is not None and (
        isinstance(debounce, bool) or to_seconds("debounce window", debounce) <= 0
    ):
        raise InvalidInput(f"debounce window must be positive seconds, not {debounce!r}")
    return FlowPlan(
        rate=(
            RateLimit(rate.name, rate.limit, rate.period, rate.burst, rate.key)
            if rate is not None
            else None
        ),
        rate_key=key("rate limit", rate.key) if rate is not None else None,
        singleton=declaration.singleton,
        singleton_key=key("singleton", declaration.singleton_key),
        debounce=declaration.debounce,
        debounce_key=key("debounce", declaration.debounce_key),
    )


async def start_declared(
    runs: Runs,
    workflow: str,
    queue: str,
    input_json: bytes,
    run_id: str | None = None,
    *,
    not_before: datetime | None = None,
    declaration: FlowDeclaration | None = None,
    chosen_run_id: bool = False,
    child_of: str | None = None,
    **start: Any,
) -> tuple[str, bool]:
    """Start a run of ``workflow`` by name, applying the flow control it declares.

    ``declaration`` is the caller's own (a client holding the definition), else it is read
    (:func:`declared`). A singleton or debounced workflow's run ids come from its key:
    ``run_id`` is then ignored (schedules and triggers pass theirs; the returned id is the
    run that does the work), unless ``chosen_run_id`` says a user chose it: then the start
    is refused. ``child_of`` names the parent of a child run, whose id the parent chose and
    waits on: a child of a singleton or debounced workflow is refused (the parent's
    ``ctx.child`` fails with the reason), one of a rate-limited workflow is delayed. Returns
    ``(run_id, created)`` as ``Runs.start`` does.
    """
    conn = runs.conn
    if declaration is None:
        declaration = await declared(conn, workflow)
        if declaration is None:
            warned = conn.extras.setdefault(_WARNED, set())
            assert isinstance(warned, set)
            if workflow not in warned:
                warned.add(workflow)
                # Debug, not a warning: most workflows declare no flow control at all, and a
                # start of one no worker serves yet is warned about where it matters (the CLI).
                log.debug(
                    "workflow %r: no worker has declared its flow control yet; its runs start "
                    "without rate limit, singleton or debounce until one does",
                    workflow,
                )
    if child_of is not None:
        start["parent"] = child_of
    if declaration is not None and declaration.retention is not None:
        start.setdefault("retention", declaration.retention)
    if declaration is not None and declaration.limit_keys:
        check_limit_keys(conn, declaration, input_json)
    if declaration is None or not declaration.controlled:
        return await runs.start(workflow, queue, input_json, run_id, not_before=not_before, **start)
    if child_of is not None and (declaration.singleton or declaration.debounce):
        raise InvalidInput(
            f"workflow {workflow!r} is {'singleton' if declaration.singleton else 'debounced'}, "
            f"so it cannot be a child run (its run ids come from its key, a child's from its "
            f"parent): start it from a step with client.start, or drop the option"
        )
    if chosen_run_id and run_id is not None and (declaration.singleton or declaration.debounce):
        raise InvalidInput(
            f"workflow {workflow!r} is {'singleton' if declaration.singleton else 'debounced'}: "
            f"its run ids come from its key, so start it without run_id (the handle names the run)"
        )
    plan = plan_of(conn, declaration, input_json)
    return await flow_start(runs, workflow, plan, queue, input_json, not_before, run_id, **start)
