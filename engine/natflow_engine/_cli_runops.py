"""CLI operations on runs: ``natflow runs delete``, and the engine's ``--retention``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ._connection import Connection
from ._durations import parse_duration
from ._retention import delete_run

Opener = Callable[[argparse.Namespace, str], Awaitable[Connection]]


def add_retention_option(p: argparse.ArgumentParser) -> None:
    """``--retention DURATION`` for ``natflow engine`` and ``natflow dev``."""
    p.add_argument(
        "--retention",
        default=os.environ.get("NATFLOW_RETENTION") or None,
        type=lambda text: parse_duration("--retention", text),
        metavar="DURATION",
        help="delete closed runs this long after they closed, e.g. 30d, 12h, 90s "
        "(env NATFLOW_RETENTION; default: keep them; @workflow(retention=...) overrides)",
    )


def register(runs: Any, opener: Opener) -> None:
    """Add ``delete`` to the ``natflow runs`` subcommands."""

    async def delete(args: argparse.Namespace) -> int:
        conn = await opener(args, "natflow-cli")
        try:
            for run_id in args.run_ids:
                removed = await delete_run(conn, run_id)
                print(f"deleted run {run_id} ({removed} messages)")
            return 0
        finally:
            await conn.close()

    q = runs.add_parser("delete", help="delete closed runs (an open run: cancel it first)")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    q.set_defaults(handler=delete)
