"""What every console page shares: the templates, the navigation, the console's state on
the app, and rendering a page with the common context. Views, actions and live streams use
this; the app (``_app``) wires them into routes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from .._connection import Connection
from ._counts import StatusCounts
from ._format import FILTERS

HERE = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class NavItem:
    label: str
    path: str


NAV: list[NavItem] = [
    NavItem("Runs", "/runs"),
    NavItem("Start a run", "/start"),
    NavItem("Workers", "/workers"),
    NavItem("Dead letters", "/dead-letters"),
]


def _asset_versions() -> dict[str, str]:
    """A content hash per static file: pages link ``/static/<name>?v=<hash>``, so browsers
    keep them cached and still see a new version the moment the console is upgraded."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in (HERE / "static").iterdir()
        if path.is_file()
    }


_VERSIONS = _asset_versions()


def asset(name: str) -> str:
    return f"/static/{name}?v={_VERSIONS.get(name, '0')}"


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(FILTERS)
templates.env.globals.update(nav=NAV, asset=asset)


@dataclass(slots=True)
class Console:
    """What every handler shares: the NATS connection, the live counts, where NATS is."""

    conn: Connection
    counts: StatusCounts
    server: str


def console(request: Request) -> Console:
    found: Console = request.app.state.console
    return found


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    """Render a full page (or fragment) with the common context."""
    context.setdefault("notice", request.query_params.get("notice"))
    context.setdefault("error", None)
    context.setdefault("live", None)
    context["server"] = console(request).server
    context["path"] = request.url.path
    return templates.TemplateResponse(request, name, context, status_code=status)
