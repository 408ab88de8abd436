"""Server-sent events: new HTML for the live parts of a page, as things change.

Each ``patch`` event is a JSON object mapping element ids to their new inner HTML. A run's
stream wakes on every message published on its history subject and re-reads the history
(one batch read), so nothing is missed however the messages coalesce; a quiet stream still
re-reads now and then, in case a reconnect dropped a wake-up.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import msgspec
from nats.aio.msg import Msg
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .._errors import NatflowError
from .._names import check_run_id
from .._streams import history_subject
from . import _reads as reads
from ._pages import console, templates
from ._views import is_position

log = logging.getLogger("natflow.console")

_QUIET: Final = 10.0  # seconds: a keep-alive (and a re-read) when nothing happened
# The actions region holds forms someone may be typing in: it is replaced only once the run
# has closed (and its forms are gone).
_RUN_PARTS: Final = ("summary", "outcome", "timeline", "steps", "events", "children")
_COUNTS_EVERY: Final = 0.5
_WORKERS_EVERY: Final = 2.0


def patch(parts: dict[str, str]) -> bytes:
    return b"event: patch\ndata: " + msgspec.json.encode(parts) + b"\n\n"


def _stream(body: AsyncIterator[bytes]) -> Response:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def render_parts(names: tuple[str, ...], context: dict[str, Any]) -> dict[str, str]:
    return {name: templates.get_template(f"_{name}.html").render(context) for name in names}


async def run_stream(request: Request) -> Response:
    state = console(request)
    run_id = check_run_id(request.path_params["run_id"])  # before it names a subject
    after_text = request.query_params.get("after", "0")
    after = int(after_text) if is_position(after_text) else 0

    async def body() -> AsyncIterator[bytes]:
        from ._views import run_context

        nonlocal after
        woken = anyio.Event()

        async def wake(msg: Msg) -> None:
            woken.set()

        sub = await state.conn.nc.subscribe(history_subject(run_id), cb=wake)
        view: reads.RunView | None = None
        try:
            while True:
                try:  # the whole history once, then only what was appended since
                    if view is None:
                        view = await reads.read_run(state.conn, run_id)
                    else:
                        view = await reads.read_more(state.conn, view)
                except (NatflowError, TimeoutError) as exc:  # the browser reconnects by itself
                    log.info("console: live view of %s stopped: %s", run_id, exc)
                    return
                if view.last_seq > after:
                    after = view.last_seq
                    context = run_context(view, state.counts.children(run_id))
                    context["form"] = {}
                    closed = ("actions",) if view.info.is_closed else ()
                    yield patch(render_parts(_RUN_PARTS + closed, context))
                if view.info.is_closed:
                    yield b"event: done\ndata: closed\n\n"
                    return
                with anyio.move_on_after(_QUIET) as quiet:
                    await woken.wait()
                if quiet.cancelled_caught:
                    yield b": still here\n\n"
                woken = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    return _stream(body())


async def counts_stream(request: Request) -> Response:
    """Counts per status; with ``?rows=1`` also the first page of runs (the plain runs page)."""
    state = console(request)
    counts = state.counts
    with_rows = request.query_params.get("rows") == "1"

    async def body() -> AsyncIterator[bytes]:
        version = -1
        template = templates.get_template("_counts.html")
        rows = templates.get_template("_run_rows.html")
        while True:
            if counts.version != version or version == -1:
                version = counts.version
                parts = {"counts": template.render(counts=counts, params={})}
                if with_rows:
                    try:
                        page = await reads.list_runs(state.conn, reads.RunFilter())
                        parts["runs-body"] = rows.render(page=page, params={})
                    except (NatflowError, TimeoutError) as exc:  # rows wait for the next change
                        log.info("console: reading the newest runs failed: %s", exc)
                yield patch(parts)
            await anyio.sleep(_COUNTS_EVERY)  # at most two updates a second, however busy
            with anyio.move_on_after(_QUIET) as quiet:
                await counts.wait_changed(version)
            if quiet.cancelled_caught:
                yield b": still here\n\n"

    return _stream(body())


async def workers_stream(request: Request) -> Response:
    state = console(request)

    async def body() -> AsyncIterator[bytes]:
        shown = ""
        template = templates.get_template("_workers.html")
        while True:
            try:
                found = await reads.workers(state.conn)
            except (NatflowError, TimeoutError) as exc:  # keep showing the last table
                log.info("console: reading workers failed: %s", exc)
                await anyio.sleep(_WORKERS_EVERY)
                continue
            html = template.render(workers=found, now=datetime.now(UTC))
            if html != shown:
                shown = html
                yield patch({"workers-table": html})
            else:
                yield b": still here\n\n"
            await anyio.sleep(_WORKERS_EVERY)

    return _stream(body())
