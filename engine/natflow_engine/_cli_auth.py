"""``natflow auth``: print the NATS permissions of a natflow role, for a server's config."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._auth import CONTROLS, ROLES, permissions_conf, role_permissions
from ._errors import InvalidInput


def register(sub: Any) -> None:
    """Add ``natflow auth`` to the ``natflow`` parser."""
    p = sub.add_parser(
        "auth",
        help="print the NATS permissions of a role (engine, worker, client, frontend, "
        "signaller, viewer)",
        description="Print the permissions block of a natflow role for a nats.conf user "
        "(or, with --json, for a JWT's pub/sub claims). See docs/security.md.",
    )
    p.add_argument("role", nargs="?", choices=ROLES, help="the role")
    p.add_argument(
        "--queue",
        action="append",
        default=[],
        dest="queues",
        help="worker: take only this queue's tasks (repeatable; default: all queues)",
    )
    p.add_argument(
        "--workflow",
        action="append",
        default=[],
        dest="workflows",
        help="worker with --queue: a workflow it serves there (repeatable)",
    )
    p.add_argument(
        "--identity",
        default=None,
        help="worker: only this identity's registry entry, pings and wake-ups",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="worker with --identity: also its N processes' names, NAME-0 to NAME-<N-1> "
        "(`natflow worker --identity NAME --processes N`)",
    )
    p.add_argument(
        "--control",
        action="append",
        default=[],
        choices=CONTROLS,
        help="also allow this control request: cancel, terminate, pause or resume; repeatable "
        "(the client role has them all)",
    )
    p.add_argument("--domain", default=None, help="the JetStream domain of natflow's streams")
    p.add_argument("--json", action="store_true", help="as JSON: publish, subscribe")
    p.add_argument("--all", action="store_true", help="every role, as nats.conf variables")
    p.set_defaults(handler=_auth)


async def _auth(args: argparse.Namespace) -> int:
    if args.all:
        if args.json:
            raise InvalidInput("--all prints nats.conf variables; --json takes one role")
        print(permissions_conf(args.domain), end="")
        return 0
    if args.role is None:
        raise InvalidInput(f"name a role ({', '.join(ROLES)}) or --all")
    perms = role_permissions(
        args.role,
        queues=args.queues,
        workflows=args.workflows,
        control=args.control,
        domain=args.domain,
        identity=args.identity,
        processes=args.processes,
    )
    if args.json:
        body = {
            "publish": {"allow": list(perms.publish)},
            "subscribe": {"allow": list(perms.subscribe)},
            "allow_responses": perms.allow_responses,
        }
        print(json.dumps(body, indent=2))
        return 0
    print(f"permissions: {perms.to_conf()}")
    return 0
