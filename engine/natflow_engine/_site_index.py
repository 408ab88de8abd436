"""The hub's copy of the sites' run indexes (``NATFLOW_SITE_RUNS``, see ``_sites``): which
site a run lives in, its latest summary, and how fresh the hub's copy is."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from ._connection import Connection, NoResponders
from ._errors import NatflowError
from ._names import check_run_id
from ._quarantine import quarantined
from ._reader import reader
from ._state import RunInfo
from ._undecodable import UNDECODABLE
from .events import utcnow

SITE_RUNS_STREAM: Final = "NATFLOW_SITE_RUNS"
SITE_RUNS_PREFIX: Final = "natflow.siteruns"


def site_runs_subject(site: str, run_id: str) -> str:
    return f"{SITE_RUNS_PREFIX}.{site}.{run_id}"


class _Entry(msgspec.Struct):
    info: RunInfo


class _Source(msgspec.Struct):
    name: str
    external: dict[str, Any] | None = None
    lag: int = 0
    active: int = -1  # nanoseconds since the hub last heard from it; -1: never


class _StreamInfoReply(msgspec.Struct):
    error: dict[str, Any] | None = None
    sources: list[_Source] = []


class SiteView(msgspec.Struct, kw_only=True):
    """How fresh the hub's copy of one site's run index is."""

    site: str
    lag: int  # summaries the site has that the hub has not copied yet (as last reported)
    seen_at: datetime | None  # when the hub last heard from the site (None: never)


def _site_of(source: _Source) -> str:
    prefix = str((source.external or {}).get("api", ""))
    parts = prefix.split(".")  # $JS.<site>.API
    return parts[1] if len(parts) == 3 else ""


async def site_views(conn: Connection) -> list[SiteView]:
    """Each site the hub copies runs from, with how fresh its copy is ([] if none)."""
    try:
        msg = await conn.request(f"{conn.api}.STREAM.INFO.{SITE_RUNS_STREAM}", b"", timeout=2.0)
    except NatflowError:
        return []
    try:
        reply = msgspec.json.decode(msg.data, type=_StreamInfoReply)
    except (*UNDECODABLE, msgspec.ValidationError):  # not a stream info: no sites
        return []
    if reply.error is not None:
        return []
    now = utcnow()
    views = []
    for source in reply.sources:
        site = _site_of(source)
        if not site:
            continue
        seen = now - timedelta(microseconds=source.active / 1000) if source.active >= 0 else None
        views.append(SiteView(site=site, lag=source.lag, seen_at=seen))
    return sorted(views, key=lambda v: v.site)


def _from_site(info: RunInfo, view: SiteView | None, site: str) -> RunInfo:
    info.site = site
    info.site_seen_at = view.seen_at if view is not None else None
    return info


async def site_run(conn: Connection, run_id: str) -> RunInfo | None:
    """The hub's copy of a site run's summary (its site and freshness set), or None."""
    check_run_id(run_id)
    for view in await site_views(conn):
        subject = site_runs_subject(view.site, run_id)
        msg = await conn.request(f"{conn.api}.DIRECT.GET.{SITE_RUNS_STREAM}.{subject}", b"")
        if "Status" in (msg.headers or {}):
            continue
        try:
            info = msgspec.json.decode(msg.data, type=_Entry).info
        except UNDECODABLE as exc:
            quarantined("index_entry", f"site {view.site} {subject}", f"does not decode ({exc})")
            return None
        return _from_site(info, view, view.site)
    return None


async def site_runs(conn: Connection) -> list[RunInfo]:
    """Every site run the hub has a copy of (its site and freshness set)."""
    views = {view.site: view for view in await site_views(conn)}
    if not views:
        return []
    try:
        page = await reader(conn).read_last(SITE_RUNS_STREAM, [f"{SITE_RUNS_PREFIX}.>"], 100_000)
    except NoResponders:  # no site runs copied yet
        return []
    found: list[RunInfo] = []
    for msg in page.messages:
        name = (msg.headers or {}).get("Nats-Subject", msg.subject).split(".")[2:3]
        site = name[0] if name else ""
        try:
            info = msgspec.json.decode(msg.data, type=_Entry).info
        except UNDECODABLE as exc:
            quarantined("index_entry", f"site {site} {msg.subject}", f"does not decode ({exc})")
            continue
        found.append(_from_site(info, views.get(site), site))
    return found
