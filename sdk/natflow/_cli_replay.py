"""``natflow replay-check MODULE[:ATTR]``: will today's code replay the stored runs?

Contributed to the engine's CLI through the ``natflow.commands`` entry point, like
``natflow worker``. It replays every stored run of the given workflows (or those created within
``--since``) with :class:`~natflow.testing.Replayer`, without a worker and without writing
anything, and reports each run whose history today's code would not follow. Exit status 1 if
any run diverges, so a deploy can be checked in CI before old runs meet new code.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from natflow_engine import AesGcmCodec, InvalidInput, connect_options, seconds

from ._cli_worker import load_target
from ._client import Client
from .testing import Replayer, ReplayResult


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay-check", help="replay stored runs against today's workflow code (no worker)"
    )
    p.add_argument(
        "target", metavar="MODULE[:ATTR]", help="module (or .py file); ATTR: a workflow or a list"
    )
    p.add_argument(
        "--server", default=None, help="NATS URL of the runs to check (default: --url/NATFLOW_URL)"
    )
    p.add_argument(
        "--since", type=seconds(), default=None, help="only runs created within, e.g. 7d, 12h"
    )
    p.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="FILE",
        help="also replay this recorded history (JSONL, one event per line); repeatable",
    )
    p.set_defaults(handler=run_replay_check)


def _replay_file(replayer: Replayer, path: str) -> ReplayResult:
    try:
        return replayer.replay_file(path)
    except OSError as exc:
        raise InvalidInput(f"--history {path}: cannot read it ({exc.strerror})") from None


def describe(result: ReplayResult) -> str:
    if result.unreadable is not None:
        return f"run {result.run_id} ({result.workflow}): INCOMPATIBLE: {result.unreadable}"
    if result.divergence is None:
        return f"run {result.run_id} ({result.workflow}): ok"
    d = result.divergence
    return (
        f"run {result.run_id} ({result.workflow}): INCOMPATIBLE at position {d.position}: "
        f"today's code asks for {d.expected or 'nothing more'}, "
        f"history recorded {d.recorded or 'nothing'}"
    )


async def run_replay_check(args: argparse.Namespace) -> int:
    workflows, factory = load_target(args.target)
    if factory is not None:
        raise InvalidInput(
            f"{args.target} is a callable; replay-check needs a workflow or a list of them "
            f"(name the module, or a module attribute holding the workflows)"
        )
    replayer = Replayer(workflows)
    results = [_replay_file(replayer, path) for path in args.history]
    client = await Client.connect(
        args.server or args.url,
        codec=AesGcmCodec.from_env(),  # NATFLOW_CODEC_KEYS, as the workers have them
        **connect_options(args),
    )
    since = None if args.since is None else timedelta(seconds=args.since)
    try:
        results += await replayer.replay_runs(client, since=since)
    finally:
        await client.close()
    bad = [r for r in results if not r.ok]
    for result in bad:
        print(describe(result))
    names = ", ".join(sorted(w.name for w in workflows))
    print(f"replay-check: {len(results)} runs of {names} replayed, {len(bad)} incompatible")
    return 1 if bad else 0
