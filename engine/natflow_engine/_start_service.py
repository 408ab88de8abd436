"""Starts through the engine: for clients that may not write history themselves.

A client with the ``client`` role publishes a run's first event on its history subjects
(``natflow.history.<run>.start.<queue>.<workflow>``, or ``.run`` for a delayed start)
itself, and NATS permissions (per subject, not per payload) cannot stop it from appending
any other event to any run. A ``frontend`` (an untrusted client: a browser-facing service,
a partner) instead sends ``natflow.command.start.<run_id>`` as a request; an engine replica
(queue group ``natflow-engine``) checks it, creates the run exactly as ``Runs.start`` does
(conditional append, then the task where no start consumer takes it) and answers. The run
id is chosen before the request, so a retried request after a lost reply starts nothing
twice.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import anyio
import msgspec
from nats.aio.msg import Msg

from ._connection import Connection, NoResponders
from ._errors import InvalidInput, NatflowError, ServerUnavailable
from ._flow_decls import FlowDeclaration, start_declared
from ._names import check_run_id
from ._runs import Runs
from ._sealing import seal
from ._streams import ensure_streams
from ._undecodable import UNDECODABLE
from ._values import check_value_size, inline_limit, store_value

log = logging.getLogger("natflow.starts")

START_PREFIX: Final = "natflow.command.start"
QUEUE_GROUP: Final = "natflow-engine"


def start_subject(run_id: str) -> str:
    return f"{START_PREFIX}.{run_id}"


class StartRequest(msgspec.Struct, kw_only=True):
    v: int = 1
    workflow: str
    queue: str
    input: msgspec.Raw = msgspec.Raw(b"null")
    not_before: datetime | None = None
    priority: int | None = None
    # A client holding the definition sends its declaration; the engine applies the one its
    # workers published instead (kept so that requests of older clients still decode).
    flow: FlowDeclaration | None = None
    chosen_run_id: bool = False  # the user chose the run id (refused for singleton/debounce)


class StartReply(msgspec.Struct, kw_only=True):
    v: int = 1
    run_id: str = ""
    created: bool = False
    error: str = ""  # the refusal, for the client to raise
    invalid: bool = False  # the refusal is InvalidInput


_request_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(StartRequest)
_reply_decoder = msgspec.json.Decoder(StartReply)


async def request_start(
    conn: Connection,
    workflow: str,
    queue: str,
    input_json: bytes,
    run_id: str,
    not_before: datetime | None = None,
    priority: int | None = None,
    *,
    flow: FlowDeclaration | None = None,
    chosen_run_id: bool = False,
) -> tuple[str, bool]:
    """Ask the engine to create the run; ``(run_id, created)`` as ``Runs.start`` returns.

    The engine applies the workflow's flow control: ``flow`` (the caller's declaration), else
    the one its workers published (README "Flow control"). ``input_json`` is sealed here
    where ``conn`` has a codec (the engine never sees the plaintext), and a large one is
    stored here: the request carries its reference.
    """
    if conn.codec is not None:
        input_json = seal(conn.codec, input_json)
    check_value_size(conn, "workflow input", len(input_json))
    if len(input_json) > inline_limit(conn):  # only then does the value store get involved
        await ensure_streams(conn)
        input_json = await store_value(conn, "workflow input", input_json, run_id)
    body = _request_encoder.encode(
        StartRequest(
            workflow=workflow,
            queue=queue,
            input=msgspec.Raw(input_json),
            not_before=not_before,
            priority=priority,
            flow=flow,
            chosen_run_id=chosen_run_id,
        )
    )
    subject = start_subject(check_run_id(run_id))
    try:
        msg = await conn.request(subject, body, timeout=10.0)
    except NoResponders as exc:
        raise ServerUnavailable(
            f"no natflow engine answers start requests ({subject!r}); start one "
            f"(`natflow engine`, or `natflow dev`), or start runs as a client"
        ) from exc
    reply = _reply_decoder.decode(msg.data)
    if reply.error:
        raise (InvalidInput if reply.invalid else NatflowError)(reply.error)
    return reply.run_id, reply.created


class StartService:
    """Answers start requests on ``natflow.command.start.*`` (one of the engine's services)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._runs = Runs(conn)

    async def run(self) -> None:
        sub = await self._conn.nc.subscribe(f"{START_PREFIX}.*", queue=QUEUE_GROUP)
        try:
            async with anyio.create_task_group() as tg:
                async for msg in sub.messages:
                    tg.start_soon(self._answer, msg)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is going away
                    log.debug("unsubscribe failed", exc_info=True)

    async def _answer(self, msg: Msg) -> None:
        reply = StartReply()
        try:
            request = _request_decoder.decode(msg.data)
            # The flow control its workers declared, never the request's own ``flow``: a
            # requester (a frontend, which may do nothing else) could leave a rate limit
            # out, or name one of another workflow and push its starts back for days.
            run_id, created = await start_declared(
                self._runs,
                request.workflow,
                request.queue,
                bytes(request.input),
                msg.subject.split(".", 3)[3],
                not_before=request.not_before,
                chosen_run_id=request.chosen_run_id,
                priority=request.priority,
            )
            reply = StartReply(run_id=run_id, created=created)
        except (InvalidInput, *UNDECODABLE, msgspec.ValidationError) as exc:
            reply = StartReply(error=str(exc), invalid=True)
        except NatflowError as exc:
            log.warning("start request on %s failed: %s", msg.subject, exc)
            reply = StartReply(error=f"the engine could not start the run: {exc}")
        except Exception as exc:  # natflow's own bug: answered and logged, not the engine's end
            log.error("start request on %s failed: %r", msg.subject, exc, exc_info=True)
            reply = StartReply(error=f"the engine could not start the run: {exc!r}")
        if msg.reply:
            try:
                await self._conn.send(msg.reply, msgspec.json.encode(reply))
            except NatflowError as exc:  # the client's request times out: it asks again
                log.warning("start request on %s: reply not sent: %s", msg.subject, exc)
