"""The command line's part of sites (ops/sites): ``natflow engine --sites/--site`` and how
``natflow runs show`` prints a site's run seen from the hub."""

from __future__ import annotations

import argparse
import os

from ._errors import InvalidInput
from ._names import check_token
from ._sites import check_site
from ._state import RunInfo
from .events import utcnow


def add_site_options(p: argparse.ArgumentParser) -> None:
    """``--sites``, ``--site`` and ``--hub-domain`` for ``natflow engine``."""
    p.add_argument(
        "--sites",
        default=os.environ.get("NATFLOW_SITES", ""),
        metavar="A,B",
        help="at the hub: the sites (their JetStream domains) whose runs the hub lists and "
        "takes commands for (env NATFLOW_SITES; see ops/sites)",
    )
    p.add_argument(
        "--site",
        default=os.environ.get("NATFLOW_SITE") or None,
        metavar="NAME",
        help="at a site: its name (its JetStream domain); the engine applies the hub's "
        "starts and signals for it (env NATFLOW_SITE)",
    )
    p.add_argument(
        "--hub-domain",
        default=os.environ.get("NATFLOW_HUB_DOMAIN", "hub"),
        metavar="DOMAIN",
        help="at a site: the hub's JetStream domain (env NATFLOW_HUB_DOMAIN; default hub)",
    )


def site_list(text: str) -> list[str]:
    """The site names of ``--sites``, each checked (a JetStream domain, a subject token)."""
    return [check_site(s.strip()) for s in text.split(",") if s.strip()]


def check_site_options(args: argparse.Namespace) -> None:
    """Refuse a bad ``--sites``/``--site``/``--hub-domain`` before connecting to anything."""
    sites = site_list(args.sites)
    if args.site is not None:
        check_site(args.site)
        if sites:  # one engine is a hub's or a site's: both made a hub of a site
            raise InvalidInput(
                "--sites (this engine serves a hub) and --site (it serves a site) exclude "
                "each other: run one engine at the hub and one at each site"
            )
    check_token("--hub-domain", args.hub_domain)


def print_site_run(info: RunInfo) -> None:
    """A site run as the hub knows it: its summary, its site and how fresh that is."""
    seen = info.site_seen_at
    age = f"{(utcnow() - seen).total_seconds():.1f} s ago" if seen else "never"
    print(f"run       {info.run_id}")
    print(f"site      {info.site} (the hub last heard from it {age}; this is its copy)")
    print(f"workflow  {info.workflow} (queue {info.queue})")
    print(f"status    {info.status}" + (f": {info.current}" if info.current else ""))
    if info.closed_at:
        print(f"closed    {info.closed_at.isoformat()}")
    print(f"steps     at the site: NATFLOW_URL=<{info.site}'s server> natflow runs show")
