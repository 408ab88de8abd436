"""How a ``natflow`` subcommand gets its connection: one place that opens it, makes sure the
streams exist, runs the command and closes it, whatever the command does."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from ._connection import Connection
from ._streams import ensure_streams

Opener = Callable[[argparse.Namespace, str], Awaitable[Connection]]
"""Opens the connection a command's arguments ask for, under a client name."""

Command = Callable[[Connection, argparse.Namespace], Awaitable[int]]
"""A subcommand's body: given the open connection and its arguments, its exit status."""

Handler = Callable[[argparse.Namespace], Awaitable[int]]


async def with_connection(opener: Opener, args: argparse.Namespace, command: Command) -> int:
    """Run ``command`` on a connection opened for ``args``, closed however it ends."""
    conn = await opener(args, "natflow-cli")
    try:
        await ensure_streams(conn)
        return await command(conn, args)
    finally:
        await conn.close()


def bind(opener: Opener, command: Command) -> Handler:
    """``command`` as an argparse handler that opens (and closes) its own connection."""

    async def handler(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, command)

    return handler
