"""Starts under flow control: run rate limits, singleton and debounce (README "Flow control").

The mechanism is the engine's (``natflow_engine.flow_start``), shared with every start that
only knows a workflow's name; this module turns a definition into what the engine takes: a
:class:`FlowPlan` for one start (keys computed here, functions included) and the
:class:`FlowDeclaration` a worker publishes for the workflows it serves, so that starts by
name, children, schedules, events and starts through the engine apply the same options.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from natflow_engine import (
    Connection,
    FlowDeclaration,
    FlowPlan,
    InvalidInput,
    RateDeclaration,
    Runs,
    input_field,
    publish_declarations,
    take_debounced_input,
)
from natflow_engine import flow_start as engine_flow_start
from natflow_engine.events import RunStarted

from ._steps import step_connection

if TYPE_CHECKING:
    from ._context import WorkflowContext
    from ._workflow import KeySpec, Workflow

log = logging.getLogger("natflow.flow")

DEBOUNCE_STEP = "natflow-debounce"  # the first step of a debounced run: takes its input


def key_of(what: str, spec: KeySpec | None, value: Any, plain: Callable[[], Any]) -> str | None:
    """The key a flow-control option computes from a run's input (None: no key).

    ``spec`` is an input field (dotted for nested fields: ``"account.region"``, as
    ``Limit(key=...)`` takes it), read from the input as JSON (``plain()``), as a start by name
    or through the engine reads it, so every path finds one key (a datetime field gave
    ``str(datetime)`` here and its JSON text there: two singleton runs of one key); or a
    function of the input (``value``, as the caller passed it).
    """
    if spec is None or spec == "":
        return None
    if not callable(spec):
        return str(input_field(what, plain(), spec))
    try:
        return str(spec(value))
    except Exception as exc:
        raise InvalidInput(
            f"the key of {what} could not be computed from the input: {type(exc).__name__}: {exc}"
        ) from exc


def check_flow_start(workflow: Workflow, run_id: str | None) -> None:
    """A singleton or debounced workflow's run ids are natflow's to choose."""
    if run_id is not None and (workflow.singleton is not None or workflow.debounce is not None):
        kind = "singleton" if workflow.singleton is not None else "debounced"
        raise InvalidInput(
            f"workflow {workflow.name!r} is {kind}: its run ids come from its key, so start it "
            f"without run_id (the handle names the run)"
        )


def plan_for(workflow: Workflow, input: Any, data: bytes) -> FlowPlan:
    """What a start of ``workflow`` with ``input`` (as passed; ``data``: as JSON) must apply."""
    limit = workflow.rate_limit
    debounce = workflow.debounce
    plain = functools.cache(lambda: msgspec.json.decode(data))  # decoded once, if a key asks
    return FlowPlan(
        rate=limit,
        rate_key=key_of("rate limit", limit.key, input, plain) if limit is not None else None,  # type: ignore[arg-type]
        singleton=workflow.singleton is not None,
        singleton_key=key_of("singleton", workflow.singleton, input, plain),
        debounce=debounce.seconds if debounce is not None else None,
        debounce_key=(
            key_of("debounce", debounce.key, input, plain) if debounce is not None else None
        ),
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
    plan = plan_for(workflow, input, data)
    return await engine_flow_start(runs, workflow.name, plan, queue, data, not_before, **start)


def declaration_of(workflow: Workflow) -> FlowDeclaration:
    """The declaration a worker publishes for ``workflow`` (README "Flow control")."""
    functions = []
    rate = None
    if workflow.rate_limit is not None:
        limit = workflow.rate_limit
        if callable(limit.key):
            functions.append("rate limit")
        rate = RateDeclaration(
            name=limit.name,
            limit=limit.limit,
            period=limit.seconds,
            burst=limit.burst,
            key=limit.key if isinstance(limit.key, str) and limit.key else None,
        )
    singleton = workflow.singleton
    if callable(singleton):
        functions.append("singleton")
    debounce = workflow.debounce
    if debounce is not None and callable(debounce.key):
        functions.append("debounce")
    return FlowDeclaration(
        workflow=workflow.name,
        rate=rate,
        singleton=singleton is not None,
        singleton_key=singleton if isinstance(singleton, str) and singleton else None,
        debounce=debounce.seconds if debounce is not None else None,
        debounce_key=(
            debounce.key
            if debounce is not None and isinstance(debounce.key, str) and debounce.key
            else None
        ),
        local_only=(
            f"computes its {' and '.join(functions)} key with a function" if functions else ""
        ),
        retention=workflow.retention,
        limit_keys=[
            bound.limit.key
            for bound in workflow.limits
            if isinstance(bound.limit.key, str) and bound.limit.key
        ],
    )


async def declare_flow(conn: Connection, workflows: Iterable[Workflow]) -> None:
    """Publish the flow-control declarations of the workflows a worker serves."""
    await publish_declarations(conn, [declaration_of(w) for w in workflows])


async def debounced_input(ctx: WorkflowContext, start: RunStarted) -> bytes:
    """The input a debounced run takes as it begins (its first step; replays from history)."""
    assert start.debounce is not None
    value = await ctx.step(DEBOUNCE_STEP, _take_input, start.debounce, bytes(start.input))
    return msgspec.json.encode(value)


async def _take_input(debounce: str, first_input: bytes) -> Any:
    """Mark the run's window taken and return its latest input (decoded JSON)."""
    conn = step_connection.get()
    return msgspec.json.decode(await take_debounced_input(conn, debounce, first_input))
