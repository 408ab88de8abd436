"""A worker's entry in the worker registry: who it is, what it serves, how it is doing.

Announced when the worker starts and at every heartbeat (the entry lapses with three lease
periods of silence), withdrawn when it stops. Tools read it to list workers, to validate a
start against a served workflow's input schema, and to see who runs under which account.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

import anyio
import msgspec
import nats.errors
from natflow_engine import (
    Connection,
    NatflowError,
    PermissionDenied,
    WorkerInfo,
    announce,
    withdraw,
)
from natflow_engine.events import utcnow

from ._held import Held
from ._run_leases import RunLeases
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


def input_schemas(workflows: dict[str, Workflow]) -> dict[str, Any]:
    """Each served workflow's input as JSON Schema, announced so tools validate a start
    before writing it. A type msgspec cannot describe is left out (not checked)."""
    schemas: dict[str, Any] = {}
    for name, wf in workflows.items():
        if not wf.takes_input:  # it ignores its input: any is fine
            continue
        try:
            schemas[name] = msgspec.json.schema(wf.input_type)
        except (TypeError, ValueError) as exc:
            log.info("workflow %r: no input schema announced (%s)", name, exc)
    return schemas


class Registration:
    """One worker's registry entry.

    Args:
        conn: The worker's connection.
        identity: The worker's identity (the entry's key).
        queues: The queues the worker serves.
        workflows: The workflows it serves, by name.
        served: What it pulls, as (queue, workflow) pairs.
        held: The runs it holds (counted at each announcement).
        leases: The leases of those runs (their period is announced).
        stopping: Set once the worker stops taking work (announced as draining).
    """

    def __init__(
        self,
        conn: Connection,
        identity: str,
        queues: list[str],
        workflows: dict[str, Workflow],
        served: list[tuple[str, str]],
        held: dict[str, Held],
        leases: RunLeases,
        stopping: anyio.Event,
    ) -> None:
        self._conn = conn
        self._identity = identity
        self._queues = queues
        self._workflows = workflows
        self._serves: dict[str, list[str]] = {}
        for queue, workflow in served:
            self._serves.setdefault(queue, []).append(workflow)
        self._held = held
        self._leases = leases
        self._stopping = stopping
        self._started_at = utcnow()
        self._failing = False  # the last heartbeat was not written
        self.user = ("", "")  # (user, account) as the server names them, once running

    @functools.cached_property
    def _input_schemas(self) -> dict[str, Any]:
        """Made once, announced at every heartbeat."""
        return input_schemas(self._workflows)

    async def announce(self, *, first: bool = False) -> None:
        """Write the entry anew (a failure is logged: the next heartbeat writes it again;
        ``first``: the worker's first, where a denial ends the worker, as other denials at
        its start do, instead of leaving it serving runs unseen by ``natflow workers``)."""
        info = WorkerInfo(
            identity=self._identity,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self._queues,
            workflows=sorted(self._workflows),
            started_at=self._started_at,
            heartbeat_at=utcnow(),
            lease_ttl=self._leases.ttl,
            held=len(self._held),
            draining=self._stopping.is_set(),
            input_schemas=self._input_schemas,
            serves=self._serves,
            user=self.user[0],
            account=self.user[1],
        )
        try:
            await announce(self._conn, info)
        except PermissionDenied as exc:
            if first:
                raise PermissionDenied(
                    f"worker {self._identity!r} may not register ({exc}); credentials made "
                    f"for one worker identity (`natflow auth worker --identity NAME`) need "
                    f"that identity: run the worker with --identity NAME. With --processes N "
                    f"(one per core by default) its processes are NAME-0 to NAME-<N-1>: make "
                    f"the credentials with `natflow auth worker --identity NAME --processes "
                    f"N`, or run one process (--processes 1)"
                ) from None
            self._failed(exc)
        except (NatflowError, nats.errors.Error) as exc:
            self._failed(exc)
        else:
            if self._failing:
                log.info("worker %s is in the registry again", self._identity)
            self._failing = False

    def _failed(self, exc: Exception) -> None:
        """A heartbeat not written: once in a row at warning (the worker runs on, but
        `natflow workers` no longer lists it, and starts warn that nobody serves its
        workflows: the store full, a denial), the others at debug."""
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(
            level,
            "worker %s could not renew its registry entry (%s); it keeps working, but "
            "`natflow workers` will not list it until a heartbeat is written",
            self._identity,
            exc,
        )

    async def withdraw(self) -> None:
        """Remove the entry (a failure is logged: the entry lapses by itself)."""
        try:
            await withdraw(self._conn, self._identity)
        except (NatflowError, nats.errors.Error) as exc:
            log.debug("could not withdraw from the registry: %s", exc)
