"""What the console can do to runs: signal, cancel, terminate, and start new ones.

Every form is checked before anything is written; a bad one comes back as the same page with
a message naming the problem, with what was typed kept in the form.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .._codec import parse_json_text
from .._errors import InvalidInput, NatflowError
from .._flow_decls import start_declared
from .._input_schema import check_input
from .._names import check_queue, check_run_id, check_token, check_workflow_name
from .._runs import Runs
from .._sealing import seal
from .._signals import send
from .._values import store_value
from . import _reads as reads
from ._pages import console, page
from ._run_actions import RUN_ACTIONS
from ._views import run_context

_MAX_FIELD = 1024 * 1024


def parse_json(field: str, text: str) -> bytes:
    """``text`` as compact JSON (empty: ``null``); :class:`InvalidInput` says where it breaks."""
    if len(text) > _MAX_FIELD:
        raise InvalidInput(f"{field} is larger than 1 MiB; send large values another way")
    if not text.strip():
        return b"null"
    return parse_json_text(field, text, 'Strings need double quotes, e.g. {"approved": true}.')


def _fields(form: Any, *names: str) -> dict[str, str]:
    values = {}
    for name in names:
        value = form.get(name, "")
        values[name] = value if isinstance(value, str) else ""
    return values


async def signal(request: Request) -> Response:
    state = console(request)
    run_id = check_run_id(request.path_params["run_id"])
    form = _fields(await request.form(), "name", "payload")
    try:
        name = form["name"].strip()
        if not name:
            raise InvalidInput("the signal needs a name (the one the workflow waits for)")
        check_token("signal name", name)
        payload = parse_json("the payload", form["payload"])
        info = await reads.read_run(state.conn, run_id)
        if info.info.is_closed:
            raise InvalidInput(f"run {run_id} has already {info.info.status}; it takes no signals")
        if state.conn.codec is not None:  # NATFLOW_CODEC_KEYS: sealed like Client.signal's
            payload = seal(state.conn.codec, payload)
        # Over 64 KiB: kept in the value store, the signal carries its reference (as
        # Client.signal's and the CLI's do).
        payload = await store_value(state.conn, f"payload of signal {name!r}", payload, run_id)
        ack = await send(state.conn, run_id, name, payload, None)
    except InvalidInput as exc:
        return await _again(request, run_id, str(exc), form)
    notice = f"Signal '{name}' sent (stored as #{ack.seq})."
    return RedirectResponse(f"/runs/{run_id}?notice={quote(notice)}", status_code=303)


async def run_action(request: Request) -> Response:
    state = console(request)
    run_id = check_run_id(request.path_params["run_id"])
    action = next((a for a in RUN_ACTIONS if a.name == request.path_params["action"]), None)
    if action is None:
        raise InvalidInput(f"there is no action {request.path_params['action']!r}")
    form = _fields(await request.form(), "reason", "from_step")
    view = await reads.read_run(state.conn, run_id)
    if not action.offered(view.info.status, view.steps):
        message = f"run {run_id} is {view.info.status}: '{action.label}' does not apply to it"
        if view.info.status in action.statuses:  # it needs a recorded step
            message = f"run {run_id} recorded no step: '{action.label}' has none to start from"
        return await _again(request, run_id, message, {})
    try:
        shown = await action.perform(state.conn, run_id, form) or run_id
    except InvalidInput as exc:  # e.g. a restart with no failed step and none chosen
        return await _again(request, run_id, f"{action.label}: {exc}", form)
    notice = (
        f"{action.label}: requested for {run_id}."
        if shown == run_id
        else (f"{run_id} restarted as {shown}.")
    )
    return RedirectResponse(f"/runs/{shown}?notice={quote(notice)}", status_code=303)


async def _again(request: Request, run_id: str, error: str, form: dict[str, str]) -> Response:
    state = console(request)
    view = await reads.read_run(state.conn, run_id)
    context = run_context(view, state.counts.children(run_id))
    context.update(error=error, form=form, live=None)
    return page(request, "run.html", context, status=400)


async def start(request: Request) -> Response:
    state = console(request)
    form = _fields(await request.form(), "workflow", "queue", "run_id", "input")
    known = await reads.input_schemas(state.conn)
    try:
        # Not stripped: "trail " is a name a worker may serve, and stripping started 'trail'.
        workflow = check_workflow_name(form["workflow"])
        default_queue = known[workflow][0] if workflow in known else "default"
        queue = check_queue(form["queue"].strip() or default_queue)
        run_id = form["run_id"].strip() or None
        if run_id is not None:
            check_run_id(run_id)
        data = parse_json("the input", form["input"])
        check_input(workflow, data, known.get(workflow, (None, None))[1], what="the input")
        made, created = await start_declared(  # with the flow control its workers declare
            Runs(state.conn), workflow, queue, data, run_id, chosen_run_id=run_id is not None
        )
    except (InvalidInput, NatflowError) as exc:
        context = {"title": "Start a run", "known": known, "form": form, "error": str(exc)}
        return page(request, "start.html", context, status=400)
    notice = (
        f"Started run {made}." if created else f"Run {made} already exists; nothing new started."
    )
    if workflow not in known:
        notice += f" No live worker serves {workflow!r} yet: it waits for one."
    return RedirectResponse(f"/runs/{made}?notice={quote(notice)}", status_code=303)
