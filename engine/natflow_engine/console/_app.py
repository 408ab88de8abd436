"""The console's ASGI app: routes, the shared state, access control and error pages.

Pages are server-rendered (Jinja2); live parts of a page update over server-sent events whose
``patch`` messages carry new HTML for elements by id (``static/console.js`` applies them).
A new page is a module with its handlers plus an entry in :data:`NAV` and in :func:`routes`;
a new run action is an entry in ``_actions.RUN_ACTIONS``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._connect_refusals import redact_url
from .._connection import Connection, NoResponders, RequestTimeout, retry_deadline
from .._errors import InvalidInput, NatflowError, PermissionDenied, RunNotFound, ServerUnavailable
from ._counts import StatusCounts
from ._pages import HERE, Console, templates

log = logging.getLogger("natflow.console")

COOKIE = "natflow_console"  # and a digest of the token: see Guard
# How long a page may retry what NATS does not answer, and how long it may take in all (a
# request begun just before the first may still wait its own 5 s): during an outage a page
# answered after 30 s of retries. Forms that write are not cut short (a half-seeded restart).
PAGE_RETRIES: float = 4.0
PAGE_LIMIT: float = PAGE_RETRIES + 6.0


class _Static(StaticFiles):
    """Static files, cached by the browser for a day (their URLs change with their content)."""

    def file_response(
        self, full_path: Any, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "public, max-age=86400"
        return response


# -- errors: every failure becomes a page that says what went wrong, never a traceback ---------


def _error_page(
    request: Request, status: int, title: str, message: str, *, show_server: bool = True
) -> Response:
    context = {"title": title, "message": message, "status": status}
    shown = getattr(getattr(request.app.state, "console", None), "server", "")
    context["server"] = shown if show_server else ""
    context["path"] = request.url.path
    context.setdefault("notice", None)
    context.setdefault("live", None)
    return templates.TemplateResponse(request, "error.html", context, status_code=status)


async def on_natflow_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RunNotFound):
        return _error_page(request, 404, "No such run", str(exc))
    if isinstance(exc, InvalidInput):
        return _error_page(request, 400, "Bad input", str(exc))
    if isinstance(exc, PermissionDenied):
        return _error_page(request, 403, "Not allowed", str(exc))
    if isinstance(exc, ServerUnavailable):
        return _error_page(request, 503, "NATS is not reachable", str(exc))
    return _error_page(request, 502, "natflow could not do that", str(exc))


_TITLES = {404: "Not found", 405: "Not allowed here", 401: "Access token needed"}


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    title = _TITLES.get(exc.status_code, "Request refused")
    return _error_page(request, exc.status_code, title, exc.detail)


def on_refusal(request: Request, exc: HTTPException) -> Response:
    """A :class:`Guard` refusal: its reader has not shown the token (or came by a name a
    rebinding site could use), so the page leaves out where NATS is."""
    title = _TITLES.get(exc.status_code, "Request refused")
    return _error_page(request, exc.status_code, title, exc.detail, show_server=False)


async def on_timeout(request: Request, exc: Exception) -> Response:
    """A request NATS did not answer (RequestTimeout says which and, if so, that the
    connection is down), or a page past :data:`PAGE_LIMIT`."""
    log.warning(
        "console: %s %s: NATS did not answer in time (%s)", request.method, request.url.path, exc
    )
    said = f" ({exc})" if isinstance(exc, RequestTimeout) else ""
    return _error_page(
        request,
        504,
        "NATS did not answer in time",
        f"The NATS server or JetStream did not answer{said}; try again in a moment.",
    )


async def on_no_responders(request: Request, exc: Exception) -> Response:
    """Nothing answers a JetStream request: JetStream is off, starting, or cut off."""
    return _error_page(request, 503, "JetStream does not answer", str(exc))


async def on_crash(request: Request, exc: Exception) -> Response:
    log.exception("console: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_page(
        request,
        500,
        "Something went wrong",
        "The console hit an unexpected error; its log has the details.",
    )


def bounded(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A page handler that gives up on NATS in seconds: retries stop after
    :data:`PAGE_RETRIES` (the page shows the failure itself), and all of it after
    :data:`PAGE_LIMIT` (a 504)."""

    async def page(request: Request) -> Response:
        token = retry_deadline.set(time.monotonic() + PAGE_RETRIES)
        try:
            with anyio.fail_after(PAGE_LIMIT):
                return await handler(request)
        finally:
            retry_deadline.reset(token)

    return page


# -- access: an optional token, and no cross-site form posts ------------------------------------


class Guard:
    """ASGI middleware: checks the access token (if one is set) and the origin of writes.

    The token may come as ``?token=`` (then kept in an HttpOnly, SameSite=Lax cookie, so a
    link from elsewhere works), as that cookie, or as ``Authorization: Bearer``. A POST must
    come from a page of this console (its ``Origin`` names this host), so another site
    cannot drive it. Without a token, a request must name the console by IP address or
    ``localhost`` (see :func:`_addressed_directly`).
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token
        self.cookie = hashlib.sha256(f"natflow-console:{token}".encode()).hexdigest()
        # Named per token: browsers keep cookies per host, not per port, so two consoles on
        # one host (two tenants') shared one and logged each other out.
        self.cookie_name = f"{COOKIE}_{hashlib.sha256(self.cookie.encode()).hexdigest()[:8]}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.token is None and not _addressed_directly(request):
            raise HTTPException(
                400,
                f"This console was asked for as {request.headers.get('host', '')!r}: without "
                "an access token it answers only to an IP address or localhost (so a site "
                "whose DNS name is made to point at this machine cannot use it). Open it by "
                "address, or give it --access-token to reach it by name.",
            )
        if self.token is not None and not scope["path"].startswith("/static/"):
            given = request.query_params.get("token")
            if given is not None and _equal(given, self.token):
                await self._enter(request)(scope, receive, send)
                return
            if not self._allowed(request):
                raise HTTPException(
                    401,
                    "This console needs its access token: open it once as "
                    "/?token=<token> (the one given to `natflow ui --access-token`).",
                )
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            raise HTTPException(403, "This form was sent from another site; use the console.")
        await self.app(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        assert self.token is not None
        if auth.startswith("Bearer ") and _equal(auth[7:], self.token):
            return True
        jar: SimpleCookie = SimpleCookie(request.headers.get("cookie", ""))
        morsel = jar.get(self.cookie_name)
        return morsel is not None and _equal(morsel.value, self.cookie)

    def _enter(self, request: Request) -> Response:
        query = {k: v for k, v in parse_qs(request.url.query).items() if k != "token"}
        # A path of "//evil.example/x" is a URL of another site to a browser (so is "/\\evil",
        # should a backslash get through unescaped): one leading slash keeps it here.
        path = "/" + request.url.path.lstrip("/\\")
        target = path + (f"?{urlencode(query, doseq=True)}" if query else "")
        response = RedirectResponse(target, status_code=303)
        # Secure when the browser came over https (uvicorn's scheme: it takes X-Forwarded-Proto
        # only from the proxies it trusts, 127.0.0.1 by default), so it never goes out in clear.
        secure = request.url.scheme == "https"
        response.set_cookie(
            self.cookie_name, self.cookie, httponly=True, samesite="lax", secure=secure
        )
        return response


def _equal(given: str, expected: str) -> bool:
    """In constant time; as bytes, since ``compare_digest`` refuses non-ASCII strings."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _addressed_directly(request: Request) -> bool:
    """Whether the request names this console by IP address or ``localhost``: a DNS name
    could be one that an attacker's page rebinds to this machine (DNS rebinding), which
    would make its requests same-origin and let it read and drive a console without token."""
    try:
        name = urlsplit(f"//{request.headers.get('host', '')}").hostname
    except ValueError:  # an unparseable Host (a bad port, an unclosed bracket)
        return False
    if name is None:
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return False
    return urlsplit(origin).netloc == request.headers.get("host", "")


# -- the app -----------------------------------------------------------------------------------


def routes() -> list[BaseRoute]:
    from . import _actions, _live, _views

    return [
        Route("/", _views.home),
        Route("/runs", bounded(_views.runs_page)),
        Route("/runs/{run_id}", bounded(_views.run_page)),
        Route("/runs/{run_id}/live", _live.run_stream),
        Route("/runs/{run_id}/signal", _actions.signal, methods=["POST"]),
        Route("/runs/{run_id}/action/{action}", _actions.run_action, methods=["POST"]),
        Route("/start", bounded(_views.start_page)),
        Route("/start", _actions.start, methods=["POST"]),
        Route("/workers", bounded(_views.workers_page)),
        Route("/dead-letters", bounded(_views.dead_page)),
        Route("/live/counts", _live.counts_stream),
        Route("/live/workers", _live.workers_stream),
        Route("/healthz", _views.healthz),
        Mount("/static", _Static(directory=str(HERE / "static")), name="static"),
    ]


def create_app(
    opener: Callable[[], Awaitable[Connection]],
    *,
    token: str | None = None,
    server: str = "",
) -> ASGIApp:
    """The console as an ASGI app.

    Args:
        opener: opens the NATS connection the console uses (closed when the app stops).
        token: if given, every request must carry it (see :class:`Guard`); an empty one
            is refused (:class:`InvalidInput`): it would be a token anyone can send.
        server: the NATS URL, shown in the page header without its password or token
            (redacted here, so no caller can put a secret on a page).
    """
    if token is not None and not token.strip():
        raise InvalidInput(
            "the console's access token is empty; give a real one, or None for a console "
            "without one"
        )
    server = redact_url(server) if server else ""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        conn = await opener()
        for name in templates.env.list_templates():  # compile now, not on the first request
            templates.get_template(name)
        counts = StatusCounts()
        app.state.console = Console(conn=conn, counts=counts, server=server)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(counts.follow, conn)
                yield
                tg.cancel_scope.cancel()
        finally:
            await conn.close()

    app = Starlette(
        routes=routes(),
        lifespan=lifespan,
        # Looked up along the exception's classes in order: RequestTimeout is a
        # NatflowError first, so its own entry must exist or on_timeout never runs.
        exception_handlers={
            RequestTimeout: on_timeout,
            NoResponders: on_no_responders,
            ServerUnavailable: on_natflow_error,
            NatflowError: on_natflow_error,
            HTTPException: on_http_error,
            TimeoutError: on_timeout,
            Exception: on_crash,
        },
    )
    guarded = Guard(app, token)
    return _Hardened(_Errors(guarded, app))


class _Errors:
    """Renders the Guard's refusals as pages (they are raised outside Starlette's handlers)."""

    def __init__(self, guarded: ASGIApp, app: Starlette) -> None:
        self.guarded = guarded
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("app", self.app)
        try:
            await self.guarded(scope, receive, send)
        except HTTPException as exc:
            await on_refusal(Request(scope), exc)(scope, receive, send)


# Another site must not show the console in a frame (a click there would be a click on a
# cancel button here), nor a browser run a response as another type than it says.
# frame-ancestors is the policy's only directive: the console's own scripts and styles are
# files of its own, which a fuller policy would have to list.
SAFETY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
]


class _Hardened:
    """Adds :data:`SAFETY_HEADERS` to every response: pages, refusals, streams, files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *SAFETY_HEADERS]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_hardened)
