"""The worker registry in KV: live workers with identity, host, queues and last heartbeat.

Each worker puts ``natflow_workers/<identity>`` on start and on every heartbeat, with a TTL of
three heartbeats, so a worker that vanished without the engine noticing drops out by itself.
Each worker also answers requests on ``natflow.worker.<identity>.ping``: the moment its
connection closes, such a request gets "no responders", which is how the engine tells a dead
worker from a slow one within a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime
from typing import Any, Final

import msgspec
import nats.errors

from ._connection import Connection
from ._kv import kv_delete, kv_entries, kv_put
from ._reach import place_of
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.registry")

WORKERS_BUCKET = "natflow_workers"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


_MAX_IDENTITY = 128


def safe_identity(identity: str) -> str:
    """Identities name a subject token: anything outside ``[A-Za-z0-9_-]`` becomes '-'."""
    return _UNSAFE.sub("-", identity)[:_MAX_IDENTITY] or "worker"


def hashed_token(text: str, longest: int) -> str:
    """``text`` where it is a subject token of at most ``longest`` characters, else its
    token-safe form, cut to fit, and a hash of it: two texts are never one token (the safe
    form alone made ``host.a`` and ``host-a``, or ``東京`` and ``大阪``, one)."""
    safe = safe_identity(text)[:longest]
    if safe == text:
        return safe
    # surrogatepass: an identity from a file name or an environment variable may hold one
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[: longest - 14]}-h{digest}"


def worker_identity(identity: str) -> str:
    """The subject token a worker given ``identity`` answers to (:func:`hashed_token`): a
    second worker was refused as the first's twin. Tokens stay as they were: leases and
    claims name them."""
    return hashed_token(identity, _MAX_IDENTITY)


def ping_subject(identity: str) -> str:
    return f"natflow.worker.{identity}.ping"


class WorkerInfo(msgspec.Struct, kw_only=True):
    v: int = 1
    identity: str
    host: str
    pid: int
    queues: list[str]
    workflows: list[str]
    started_at: datetime
    heartbeat_at: datetime
    lease_ttl: float
    held: int = 0
    draining: bool = False
    # JSON Schema of each served workflow's input (msgspec-generated), so any tool can validate
    # a start before writing it.
    input_schemas: dict[str, Any] = {}
    # Who the NATS server says the worker connected as (a config user, or a creds JWT's
    # name) and in which account; "" where the server would not say (see connected_user).
    user: str = ""
    account: str = ""
    # The server the worker is connected to (filled in by announce): the reaper tells a worker
    # behind a cut leaf link from a dead one by it (_reach).
    server: str = ""
    cluster: str = ""
    domain: str = ""
    # Which workflows it serves on which queue: one serving "a" on q1 and "b" on q2 does not
    # serve "a" on q2 (`natflow start a --queue q2` said nothing, and its run waited for good).
    serves: dict[str, list[str]] = {}

    def queues_of(self, workflow: str) -> list[str]:
        """The queues this worker serves ``workflow`` on."""
        if self.serves:
            return sorted(q for q, names in self.serves.items() if workflow in names)
        # A worker from before ``serves``: each of its workflows on each of its queues.
        return list(self.queues) if workflow in self.workflows else []


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerInfo)


class _UserInfo(msgspec.Struct):
    user: str = ""
    user_name: str = ""
    account: str = ""
    account_name: str = ""


class _UserInfoReply(msgspec.Struct):
    data: _UserInfo | None = None


USER_INFO_SUBJECT: Final = "$SYS.REQ.USER.INFO"


async def connected_user(conn: Connection) -> tuple[str, str]:
    """``(user, account)`` as the server names this connection's user (``$SYS.REQ.USER.INFO``:
    the server's own word, not what the client claims), or ``("", "")`` if it would not say.
    A creds JWT's user is shown by its name, with its public key; a config user by name."""
    try:
        msg = await conn.nc.request(USER_INFO_SUBJECT, b"", timeout=1.0)
        data = msgspec.json.decode(msg.data, type=_UserInfoReply).data
    except (nats.errors.Error, TimeoutError, *UNDECODABLE, msgspec.ValidationError):
        return "", ""  # denied, or a server too old to answer
    if data is None:
        return "", ""
    user = f"{data.user_name} ({data.user})" if data.user_name else data.user
    return user, data.account_name or data.account


async def announce(conn: Connection, info: WorkerInfo) -> None:
    if not info.server:
        place = place_of(conn.nc)
        info.server, info.cluster, info.domain = place.server, place.cluster, place.domain
    await kv_put(conn, WORKERS_BUCKET, info.identity, _encoder.encode(info), ttl=3 * info.lease_ttl)


async def withdraw(conn: Connection, identity: str) -> None:
    await kv_delete(conn, WORKERS_BUCKET, identity)


def decode_worker(data: bytes) -> WorkerInfo:
    return _decoder.decode(data)


async def list_workers(conn: Connection) -> list[WorkerInfo]:
    """Every registered worker (live or within three heartbeats of its last one)."""
    found: list[WorkerInfo] = []
    for msg in await kv_entries(conn, WORKERS_BUCKET):
        try:
            found.append(decode_worker(msg.data))
        except UNDECODABLE:  # a bad entry (the engine dead-letters it): skip it
            log.warning("skipping a worker entry that does not decode: %s", msg.subject)
    return sorted(found, key=lambda w: w.identity)
