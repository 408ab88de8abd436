"""The console's pages: runs, one run, workers, dead letters, the start form."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from .._durations import MAX_DURATION
from .._errors import InvalidInput
from .._names import _TOKEN, check_workflow_name
from .._state import RunInfo
from . import _reads as reads
from ._pages import console, page
from ._run_actions import RUN_ACTIONS, step_choices
from ._timeline import timeline

STATUSES = (
    "pending",
    "running",
    "sleeping",
    "waiting",
    "paused",
    "blocked",
    "completed",
    "failed",
    "cancelled",
    "terminated",
)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


async def home(request: Request) -> Response:
    return RedirectResponse("/runs", status_code=307)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def parse_time(field: str, text: str, now: datetime) -> datetime:
    """``15m``, ``2h``, ``3d`` (that long ago) or an ISO date/time (UTC unless it says)."""
    match = _RELATIVE.match(text)
    if match:
        ago = float(match[1]) * _UNITS[match[2]]
        if ago > MAX_DURATION:
            raise InvalidInput(f"{field} {text!r} is more than a hundred years ago")
        return now - timedelta(seconds=ago)
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"{field} {text!r} is not a time: write how long ago (15m, 2h, 3d) "
            "or a date and time such as 2026-11-26 14:30 (UTC unless it names a zone)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _choice(field: str, value: str | None, allowed: list[str] | None = None) -> str | None:
    if not value:
        return None
    if field == "workflow":  # any printable name, as ``@workflow(name=)`` takes
        return check_workflow_name(value)
    if allowed is not None and value not in allowed:
        raise InvalidInput(f"{field} {value!r} is not one of: {', '.join(allowed)}")
    if _TOKEN.fullmatch(value) is None:
        raise InvalidInput(f"{field} {value!r} is not a valid name (A-Z, a-z, 0-9, '_', '-')")
    return value


def read_filter(params: Any) -> reads.RunFilter:
    """The runs page's filters from its query string; :class:`InvalidInput` names a bad one."""
    now = datetime.now(UTC)
    since = params.get("since") or None
    until = params.get("until") or None
    return reads.RunFilter(
        id_contains=(params.get("run_id") or "").strip() or None,
        workflow=_choice("workflow", params.get("workflow")),
        status=_choice("status", params.get("status"), list(STATUSES)),
        queue=_choice("queue", params.get("queue")),
        since=parse_time("since", since, now) if since else None,
        until=parse_time("until", until, now) if until else None,
    )


def _cursor(text: str | None) -> int | None:
    if not text:
        return None
    if not is_position(text):
        raise InvalidInput(f"{text!r} is not a page position; use the page links")
    return int(text)


def is_position(text: str) -> bool:
    """Whether ``text`` is a stream position: ASCII digits (``str.isdigit`` takes ``²``,
    which ``int`` refuses), at most as many as a stream sequence (a uint64) has."""
    return text.isascii() and text.isdigit() and len(text) <= 20


async def runs_page(request: Request) -> Response:
    state = console(request)
    params = request.query_params
    context: dict[str, Any] = {
        "title": "Runs",
        "params": params,
        "statuses": STATUSES,
        "counts": state.counts,
        "live": "/live/counts",
        "page": reads.RunPage(),
    }
    run_id = (params.get("run_id") or "").strip()
    try:
        if run_id:
            if _TOKEN.fullmatch(run_id) is None:
                raise InvalidInput(f"{run_id!r} is not a run id (A-Z, a-z, 0-9, '_', '-')")
            if await reads.find_run(state.conn, run_id) is not None:
                return RedirectResponse(f"/runs/{run_id}", status_code=303)
        where = read_filter(params)
        offset = _cursor(params.get("offset"))
        if where.active and state.counts.loaded:
            # filtered: the live index finds the matches, at the same cost for any page
            context["page"] = await reads.select_runs(state.conn, state.counts, where, offset or 0)
        else:  # newest first straight from the index stream: cost of one page, cold or not
            context["page"] = await reads.list_runs(
                state.conn, where, before=_cursor(params.get("before"))
            )
    except InvalidInput as exc:
        context["error"] = str(exc)
        return page(request, "runs.html", context, status=400)
    if run_id and not context["page"].runs:
        context["error"] = f"no run id contains {run_id!r}"
        return page(request, "runs.html", context, status=404)
    if not any(params.values()):  # the plain first page follows new runs as they come
        context["live"], context["live_rows"] = "/live/counts?rows=1", True
    shown: reads.RunPage = context["page"]
    kept = {k: v for k, v in params.items() if k not in ("before", "offset", "notice") and v}
    context["newest_query"] = urlencode(kept)
    context["older_query"] = (
        None if shown.older is None else urlencode({**kept, "before": shown.older})
    )
    if shown.matching is not None:
        after = shown.offset + len(shown.runs)
        back = max(0, shown.offset - reads.PAGE_SIZE)
        context["older_query"] = (
            urlencode({**kept, "offset": after}) if after < shown.matching else None
        )
        context["newer_query"] = urlencode({**kept, "offset": back}) if shown.offset else None
    return page(request, "runs.html", context)


def run_context(view: reads.RunView, children: list[str]) -> dict[str, Any]:
    """What the run page and its live fragments render from."""

    info: RunInfo = view.info
    now = datetime.now(UTC)
    finish = info.closed_at or now
    start_event = view.events[0] if view.events else None  # none: a site's run, at the hub
    bars = timeline(view.steps, view.events, info.created_at, finish)
    return {
        "title": f"Run {info.run_id}",
        "run": info,
        "view": view,
        "input": getattr(start_event, "input", None),
        "bars": bars,
        "waiting_for": [b.label for b in bars if b.kind == "signal" and b.end is None],
        "axis_end": finish,
        "children": children,
        # A site's run seen from the hub: commands for it go through client.site(...).
        "actions": []
        if info.site
        else [a for a in RUN_ACTIONS if a.offered(info.status, view.steps)],
        "restart_steps": step_choices(view.steps),
        "last_seq": view.last_seq,
    }


async def run_page(request: Request) -> Response:
    state = console(request)
    run_id = request.path_params["run_id"]
    view = await reads.read_run(state.conn, run_id)
    context = run_context(view, state.counts.children(run_id))
    closed = view.info.is_closed or view.info.site  # a site's run: its history is at the site
    context["live"] = None if closed else f"/runs/{run_id}/live?after={view.last_seq}"
    context["form"] = {}
    return page(request, "run.html", context)


async def workers_page(request: Request) -> Response:
    state = console(request)
    found = await reads.workers(state.conn)
    return page(
        request,
        "workers.html",
        {"title": "Workers", "workers": found, "live": "/live/workers", "now": datetime.now(UTC)},
    )


async def dead_page(request: Request) -> Response:
    state = console(request)
    letters = await reads.dead(state.conn)
    return page(request, "dead.html", {"title": "Dead letters", "letters": letters})


async def start_page(request: Request) -> Response:
    state = console(request)
    known = await reads.input_schemas(state.conn)
    chosen = request.query_params.get("workflow", "")
    return page(
        request,
        "start.html",
        {"title": "Start a run", "known": known, "form": {"workflow": chosen}},
    )
