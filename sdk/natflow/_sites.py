"""``client.site(name)``: starts, signals and cancels for runs homed at a site, from the hub.

Each is stored at the hub (``NATFLOW_OUTBOX``) the moment the call returns, also while the
link to the site is down, and takes effect at the site exactly once after the link returns:
the site's engine applies a start by its run id and a signal by its id (ops/sites).
"""

from __future__ import annotations

from typing import Any

from natflow_engine import (
    CANCEL,
    INLINE_BYTES,
    PAUSE,
    RESUME,
    TERMINATE,
    Connection,
    InvalidInput,
    check_outbox,
    check_queue,
    check_run_id,
    check_site,
    check_token,
    check_value_size,
    check_workflow_name,
    command_signal,
    command_start,
    decode_value,
    encode_value,
    new_run_id,
    seal,
)

from ._workflow import Workflow

_CONTROLS = frozenset({CANCEL, TERMINATE, PAUSE, RESUME})


class SiteClient:
    """Commands for the runs of one site, stored at the hub (see the module docstring)."""

    def __init__(self, conn: Connection, site: str) -> None:
        self._conn = conn
        self.site = check_site(site)
        self._ready = False

    async def _outbox(self) -> None:
        if not self._ready:
            await check_outbox(self._conn, self.site)
            self._ready = True

    def _inline(self, what: str, data: bytes) -> bytes:
        conn = self._conn
        if conn.codec is not None:
            data = seal(conn.codec, data)
        check_value_size(conn, what, len(data))
        if len(data) > INLINE_BYTES:  # the hub's value store is not the site's
            raise InvalidInput(
                f"{what} is {len(data)} bytes; a command for site {self.site!r} carries it "
                f"inline, at most {INLINE_BYTES} bytes: pass a reference to the data instead"
            )
        return data

    async def start(
        self,
        workflow: Workflow | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
    ) -> str:
        """Start a run at the site; returns its run id (an idempotency key, as in
        :meth:`Client.start`). The run starts when the site reads the command."""
        if isinstance(workflow, Workflow):
            name, default_queue = workflow.name, workflow.queue
        elif isinstance(workflow, str):
            name, default_queue = workflow, "default"
        else:
            raise InvalidInput(f"start takes a @workflow or its name, not {workflow!r}")
        run_id = check_run_id(run_id) if run_id is not None else new_run_id()
        check_workflow_name(name)
        queue = check_queue(queue or default_queue)  # here: the site would only log it
        data = encode_value("workflow input", input)
        if isinstance(workflow, Workflow) and workflow.takes_input:
            decode_value(f"input of workflow {name!r}", data, workflow.input_type)
        data = self._inline("workflow input", data)
        await self._outbox()
        await command_start(self._conn, self.site, name, queue, data, run_id)
        return run_id

    async def signal(
        self, run_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> None:
        """Send signal ``name`` to a run at the site; stored at the hub once this returns.
        ``signal_id`` deduplicates as in :meth:`Client.signal`."""
        check_run_id(run_id)
        check_token("signal name", name)
        data = self._inline(f"payload of signal {name!r}", encode_value("payload", payload))
        await self._outbox()
        await command_signal(self._conn, self.site, run_id, name, data, signal_id)

    async def cancel(self, run_id: str, reason: str | None = None) -> None:
        """Cancel a run at the site (as :meth:`Client.cancel` does there)."""
        await self.control(run_id, CANCEL, reason)

    async def control(self, run_id: str, kind: str, reason: str | None) -> None:
        """Cancel, terminate, pause or resume (``kind``: the control signal's name)."""
        if kind not in _CONTROLS:
            raise InvalidInput(
                f"control kind {kind!r} is not one of {', '.join(sorted(_CONTROLS))} "
                f"(natflow_engine's CANCEL, TERMINATE, PAUSE, RESUME)"
            )
        check_run_id(run_id)
        data = encode_value("reason", reason)
        await self._outbox()
        await command_signal(self._conn, self.site, run_id, kind, data)
