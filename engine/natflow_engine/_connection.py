"""One NATS connection and the boundary where nats-py errors become natflow errors
(opened by ``_connect``; why one could not be opened is ``_connect_refusals``).

Everything natflow sends to JetStream on a hot path goes through :meth:`Connection.publish`
and :meth:`Connection.request`: raw requests parsed with msgspec (nats-py's own helpers decode
with ``json`` and build dataclasses, which costs more than the round trip on this path).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, TypeVar

import anyio.lowlevel
import msgspec
import nats
import nats.errors
import nats.js
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ._connect_refusals import (
    redact_url,
)
from ._errors import (
    ConnectionRefused,
    InvalidInput,
    NatflowError,
    PermissionDenied,
    ServerUnavailable,
)
from ._log_repeats import level_for
from ._sealing import PayloadCodec

log = logging.getLogger("natflow.connection")


# JetStream error codes natflow branches on (nats-server's errors.json).
ERR_WRONG_LAST_SEQUENCE: Final = 10071
# A replicated stream answers a conflicting write that meets another still in flight with
# 10164 (the code of an atomic batch's failed expectation), not 10071: concurrent starts of
# one run id on a cluster raised it to the caller instead of finding the run.
ERR_WRONG_LAST_SEQUENCE_PROPOSED: Final = 10164
ERR_ROLLUP_NOT_PERMITTED: Final = 10111  # a Nats-Rollup header on a stream without rollups
ERR_MAX_MSGS_PER_SUBJECT: Final = 10077
ERR_STREAM_NOT_FOUND: Final = 10059
ERR_CONSUMER_NOT_FOUND: Final = 10014
ERR_STREAM_NAME_IN_USE: Final = 10058
ERR_JS_UNAVAILABLE: Final = 10008
# "JetStream not enabled for account", "JetStream not enabled": for good, unlike 10008.
ERR_JETSTREAM_OFF: Final = (10039, 10076)
# Storage full: the server's JetStream limit (insufficient resources) or the account's.
# Freed space (natflow's retention deletes closed runs) or a raised limit ends it, so a
# write refused so is retried as the server away is, not failed (a worker parked its runs).
ERR_OUT_OF_STORAGE: Final = (10023, 10002)
# What the server's or account's JetStream limits refuse to create, and what to raise.
_LIMIT_HINTS: Final = {
    10026: "the account's JetStream consumer limit (max_consumers) is reached; natflow "
    "needs one task and one start consumer per queue and workflow, and the engine's own",
    10027: "the account's JetStream stream limit (max_streams) is reached; natflow needs "
    "about 20 streams (its streams, KV buckets and object store)",
    10047: "the server has too little JetStream storage left to create it (insufficient "
    "storage); free space or raise max_file_store",
}


# nats-py hands the server's -ERR to error_cb lower-cased, e.g.
# 'nats: permissions violation for publish to "$js.api.stream.info.natflow_history"'.
_DENIAL = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.I)


class _Waiter:
    """A call in flight that fails at once if the server denies its subject (or any subject
    under ``key`` when ``prefix``)."""

    __slots__ = ("denial", "key", "prefix", "task")

    def __init__(self, task: asyncio.Task[Any], key: str, prefix: bool) -> None:
        self.task = task
        self.key = key
        self.prefix = prefix
        self.denial: str | None = None

    def matches(self, subject: str) -> bool:
        return subject.startswith(self.key) if self.prefix else subject == self.key


class JetStreamError(NatflowError):
    """JetStream answered a request with an error."""

    def __init__(self, subject: str, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream refused {subject!r}: {description} (error {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description

    @property
    def wrong_last_sequence(self) -> bool:
        """A conditional write that lost: the subject (or stream) moved past the sequence it
        expected, on one server or on a cluster."""
        return self.err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_PROPOSED)


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0  # of the last message, for an atomic batch's commit
    duplicate: bool = False
    count: int = 0  # the messages an atomic batch's commit stored (0: not a batch)


class ApiError(msgspec.Struct):
    """The ``error`` of a JetStream API reply, as decoded with the rest of the reply."""

    code: int = 0
    err_code: int = 0
    description: str = ""

    def refusal(self, subject: str) -> JetStreamError:
        return JetStreamError(subject, self.code, self.err_code, self.description)


class _ApiReply(msgspec.Struct):
    error: ApiError | None = None
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    count: int = 0


_reply_decoder = msgspec.json.Decoder(_ApiReply)


class Connection:
    """A connected NATS client plus what natflow needs to know about it."""

    def __init__(self, nc: NATS, *, owned: bool, domain: str | None = None) -> None:
        self.nc = nc
        self.domain = domain or None
        # The JetStream API prefix: "$JS.API", or "$JS.<domain>.API" to reach JetStream in
        # another domain, as a worker on an edge leaf node does to reach the hub.
        self.api = f"$JS.{self.domain}.API" if self.domain else "$JS.API"
        self.js = nc.jetstream(domain=self.domain)
        self.jsm = nc.jsm(prefix=self.api)
        self._owned = owned
        self._denied: list[str] = []
        self._reported: list[str] = []  # denials a waiting call raised (echoes are quiet)
        self._waiters: set[_Waiter] = set()
        self.streams_ready = False
        self.streams_lock = asyncio.Lock()
        self.closing = False
        self.on_reconnect: list[Callable[[], None]] = []
        self.on_close: list[Callable[[], None]] = []  # to end waits on it (close())
        # Called when the connection is lost, to fail what waits for an answer over it.
        self.on_disconnect: list[Callable[[], None]] = [self._fail_requests]
        self.extras: dict[str, object] = {}  # per-connection helpers (the batch reader)
        self.codec: PayloadCodec | None = None  # seals user values (see _sealing)
        # The largest user value kept (larger than 64 KiB: by reference, see _values).
        self.max_value_bytes = 64 * 1024 * 1024

    def _fail_requests(self) -> None:
        """Fail every request still waiting for its answer, as a lost connection (retried).

        An answer comes back over the connection its request went out on: once that is gone,
        none will come (a request written to the dead socket never reached the server; a
        restarted server forgot the rest). Left alone, each waited out its whole timeout (5 s
        for an append) after the server was back. A request still in nats-py's buffer goes
        out after the reconnect and may land: its retry carries the same message id, so it
        is found as landed, not written twice (``HistoryStore.append``)."""
        waiting = getattr(self.nc, "_resp_map", None)  # nats-py's requests, by reply token
        if not isinstance(waiting, dict):
            return
        for future in list(waiting.values()):
            if isinstance(future, asyncio.Future) and not future.done():
                # One whose request never went out (nats-py refused the publish after making
                # it) has no one waiting: read here, its error is not logged as unretrieved.
                future.add_done_callback(_retrieved)
                future.set_exception(nats.errors.ConnectionReconnectingError())

    def kv_write_subject(self, bucket: str, key: str) -> str:
        """Where a KV write goes: across a domain, through the API prefix (as nats.go does),
        because a leaf node link denies ``$KV.>`` between domains."""
        if self.domain:
            return f"{self.api}.$KV.{bucket}.{key}"
        return f"$KV.{bucket}.{key}"

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload) or 1024 * 1024

    @property
    def server_id(self) -> str:
        """The identity of the server connected to, as its INFO gives it: nats-server draws
        a new one each time it starts, so a change means a restart (or another server)."""
        # nats-py keeps the INFO it last received, and has no public accessor for its id.
        return str(self.nc._server_info.get("server_id", ""))

    async def written(self) -> None:
        """Return once what was handed to this connection so far is written to its socket.
        No round trip (``nats.aio.client.Client.flush`` waits for the server's PONG): what
        follows may block the event loop, and what was sent must not wait for it."""
        # nats-py writes from a flusher task and has no public way to wait for that task;
        # a forced flush is how its own publish waits when its buffer is full. A nats-py
        # without it gets the same from a round trip.
        forced = getattr(self.nc, "_flush_pending", None)
        if forced is None:
            await self.nc.flush()
            return
        await forced(force_flush=True)
        # That flush swallows a cancellation: the caller must still see it.
        await anyio.lowlevel.checkpoint_if_cancelled()

    @property
    def url(self) -> str:
        """The server this connection talks to, with any password or token left out."""
        uri = self.nc.connected_url
        return redact_url(uri.geturl()) if uri is not None else "<not connected>"

    def note_error(self, error: Exception) -> bool:
        """Called from nats-py's error_cb: a permission violation fails the calls waiting on
        its subject at once (and is remembered). True if a call was waiting on it (it raises
        :class:`PermissionDenied`, which says all there is to say)."""
        found = _DENIAL.search(str(error))
        if found is None:
            return False
        subject = found.group(2).lower()  # nats-py lower-cases it; compare alike
        self._denied.append(subject)
        del self._denied[:-20]
        matching = [w for w in self._waiters if w.denial is None and w.matches(subject)]
        # A call that named this very subject is the one denied: not the calls in flight
        # that only named a prefix of it (an engine's consumer created meanwhile).
        exact = [w for w in matching if not w.prefix]
        for waiter in exact or matching:
            waiter.denial = subject
            waiter.task.cancel()
        if matching:
            self._reported.append(subject)
            del self._reported[:-20]
        # Calls sent at once get one denial each: the first fails them all, the rest echo it.
        return subject in self._reported

    def denied(self, subject: str) -> str | None:
        """The denied subject as the server reported it, if it denied ``subject`` lately."""
        key = subject.lower()
        return key if key in self._denied else None

    async def guarded(self, subject: str, call: Awaitable[T], *, prefix: bool = False) -> T:
        """Await ``call``, failing with :class:`PermissionDenied` the moment the server
        reports that it denied ``subject`` (any subject under it if ``prefix``) instead of
        waiting out a timeout: the server denies a publish only in an asynchronous error."""
        task = asyncio.current_task()
        assert task is not None
        waiter = _Waiter(task, subject.lower(), prefix)
        self._waiters.add(waiter)
        try:
            return await call
        except asyncio.CancelledError:
            if waiter.denial is None:
                raise
            task.uncancel()
            raise self.permission_denied(waiter.denial) from None
        finally:
            self._waiters.discard(waiter)

    @staticmethod
    def permission_denied(subject: str) -> PermissionDenied:
        return PermissionDenied(
            f"the NATS server denied this connection the subject {subject!r} (as the server "
            f"names it); grant it in the server's permissions for this user"
        )

    def check_size(self, what: str, size: int) -> None:
        limit = self.max_payload - 4096  # headroom for the event envelope and headers
        if size > limit:
            raise InvalidInput(
                f"{what} is {size} bytes, over the server's max payload of {self.max_payload} "
                f"bytes (less 4 KiB for the envelope); store large data elsewhere and pass "
                f"a reference"
            )

    def check_wire_size(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None
    ) -> None:
        """Refuse a message the server would refuse: it counts headers and body together
        against its max payload, and closes the connection of a client that exceeds it
        (nats-py checks the body alone). :class:`PayloadTooLarge` leaves the connection up."""
        size = len(payload) + wire_header_size(headers)
        if size > self.max_payload:
            raise PayloadTooLarge(
                f"a message to {subject!r} would be {size} bytes with its headers, over the "
                f"server's max payload of {self.max_payload} bytes; store large data elsewhere "
                f"and pass a reference",
                size,
            )

    async def request(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Msg:
        """A request with nats-py's errors turned into natflow's."""
        self.check_wire_size(subject, payload, headers)
        self.check_open(subject)
        try:
            return await self.guarded(
                subject,
                self.nc.request(
                    subject, payload, timeout=timeout, headers=dict(headers) if headers else None
                ),
            )
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(subject) from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise self._timeout_error(subject, timeout) from exc
        except nats.errors.ConnectionDrainingError as exc:
            raise ClientClosed(f"the connection was closed while requesting {subject!r}") from exc
        except _CONNECTION_LOST as exc:
            if not connection_lost(exc):
                raise
            if self.closing:
                raise ClientClosed(
                    f"the connection was closed while requesting {subject!r}"
                ) from exc
            raise ServerUnavailable(
                f"lost the NATS connection while requesting {subject!r}"
            ) from exc

    def check_open(self, subject: str) -> None:
        """Refuse a request or publish on a connection this process closed (or is draining):
        nats-py's error for it read as a lost connection, retried for 30 s, or reached the
        user raw."""
        if self.closing and (self.nc.is_closed or self.nc.is_draining):
            raise ClientClosed(
                f"the NATS connection is closed (the client was closed); {subject!r} was not sent"
            )

    async def send(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        *,
        reply: str = "",
    ) -> None:
        """A publish that waits for no answer, nats-py's loss of the connection turned into
        :class:`ServerUnavailable`. Every core NATS publish natflow makes goes through here
        (a raw one on a socket that just died raised ConnectionResetError or uvloop's
        RuntimeError, past every handler that expects natflow's errors)."""
        self.check_open(subject)
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except nats.errors.ConnectionDrainingError as exc:
            raise ClientClosed(f"the connection was closed sending to {subject!r}") from exc
        except _CONNECTION_LOST as exc:
            if not connection_lost(exc):
                raise
            raise ServerUnavailable(f"lost the NATS connection sending to {subject!r}") from exc

    def _no_jetstream_hint(self) -> str:
        where = f" in domain {self.domain!r}" if self.domain else ""
        return (
            f"JetStream is not enabled{where} for this NATS account, and natflow keeps every "
            f"run in it: enable it in the server's configuration (`jetstream {{}}`, and "
            f"`jetstream: enabled` in the account's entry under `accounts`), or connect as a "
            f"user of an account that has it"
        )

    def _timeout_error(self, subject: str, timeout: float) -> NatflowError:
        denial = self.denied(subject)
        if denial is not None:
            return self.permission_denied(denial)
        if self.nc.is_reconnecting:  # the likely why: say it, not only what timed out
            where = f" to {self.url}" if self.nc.connected_url is not None else ""
            return RequestTimeout(
                f"no answer to {subject!r} within {timeout:g} s: the NATS connection is "
                f"down, reconnecting{where}"
            )
        return RequestTimeout(f"no answer to {subject!r} within {timeout:g} s")

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish into a stream and wait for its acknowledgement."""
        try:
            msg = await self.request(subject, payload, headers=headers, timeout=timeout)
        except NoResponders as exc:
            raise NoStream(
                f"no JetStream stream answered for {subject!r}: none takes it, or (in a "
                f"cluster) its leader is being elected"
            ) from exc
        reply = _reply_decoder.decode(msg.data)
        if reply.error is not None:
            if reply.error.err_code in ERR_OUT_OF_STORAGE:
                raise ServerUnavailable(
                    f"the server refused {subject!r} for lack of storage "
                    f"({reply.error.description}, {reply.error.err_code}): free space or raise "
                    f"its JetStream limits, then try again"
                )
            raise reply.error.refusal(subject)
        return PubAck(
            stream=reply.stream, seq=reply.seq, duplicate=reply.duplicate, count=reply.count
        )

    async def admin(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        *,
        budget: float = 30.0,
        subject: str | None = None,
    ) -> T:
        """A JetStream management call (stream, consumer), its transient failures retried.

        Right after a server start or a leader change, JetStream answers "no responders" or
        "temporarily unavailable" for a few seconds; that is a reason to wait, not to fail.
        ``subject``: the API subject the call uses, where the caller knows it. A call that
        may be denied while others run should name it: a denial then fails that call alone.
        """

        async def once() -> T:
            try:
                # Unless named, which API subject nats-py uses is its own business: a denial
                # of any that no call names fails this call.
                if subject is not None:
                    return await self.guarded(subject, call())
                return await self.guarded(f"{self.api}.", call(), prefix=True)
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
                if getattr(e, "err_code", None) in ERR_JETSTREAM_OFF:
                    raise ConnectionRefused(f"{what}: {self._no_jetstream_hint()}") from e
                raise NoResponders(what, SILENT_JETSTREAM) from e
            except (TimeoutError, nats.errors.TimeoutError) as exc:
                raise self._timeout_error(what, 5.0) from exc
            except nats.js.errors.APIError as exc:
                if exc.code in (500, 503) or exc.err_code == ERR_JS_UNAVAILABLE:
                    raise NoResponders(what) from exc
                hint = _LIMIT_HINTS.get(exc.err_code or 0)
                if hint is not None:  # a deployment's limit: one line saying which, no trace
                    raise JetStreamError(what, exc.code or 0, exc.err_code or 0, hint) from exc
                raise
            except _CONNECTION_LOST as exc:  # its answer will not come: again once back
                if not connection_lost(exc):
                    raise
                raise ServerUnavailable(f"lost the NATS connection during {what}") from exc

        return await retrying(what, once, budget=budget)

    async def close(self) -> None:
        self.closing = True
        for hook in list(self.on_close):
            hook()
        if self._owned and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # closing anyway; a failed drain only loses buffered acks
                log.debug("drain failed, closing", exc_info=True)
                try:
                    await self.nc.close()
                except Exception:  # what it still held for the server goes with it
                    log.debug("close could not flush", exc_info=True)


def _retrieved(future: asyncio.Future[Any]) -> None:
    future.exception()


def wire_header_size(headers: Mapping[str, str] | None) -> int:
    """Bytes the headers take on the wire (``NATS/1.0`` line, ``key: value`` lines)."""
    if not headers:
        return 0
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(b"NATS/1.0\r\n") + lines + 2


class PayloadTooLarge(InvalidInput):
    """A message is larger than the server takes; nothing was sent."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class NoResponders(NatflowError):
    def __init__(self, subject: str, hint: str = "") -> None:
        super().__init__(f"nothing answers on {subject!r}" + (f"; {hint}" if hint else ""))
        self.subject = subject


# A server without JetStream is silent where one whose account lacks it says so; so is one
# still starting, or a leaf node cut off from its hub, which is why this is retried.
SILENT_JETSTREAM: Final = (
    "JetStream does not answer: is it enabled on the server (`jetstream {}` in its "
    "configuration, `-js`) and, at a leaf node, is the link to the hub up?"
)


class NoStream(NatflowError):
    pass


class ClientClosed(NatflowError):
    """The connection was closed by this process (``Client.close``, the end of ``async
    with``): nothing more goes out on it, and no retry can change that."""


class RequestTimeout(NatflowError, TimeoutError):
    pass


# Failures that a server restart, a leader election or a reconnect cause, and that a retry of
# the same request cures.
TRANSIENT: Final = (RequestTimeout, NoResponders, NoStream, ServerUnavailable)


# What nats-py raises when a publish finds the connection gone; RuntimeError only as
# ``connection_lost`` tells.
_CONNECTION_LOST: Final = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    # Reconnecting with nats-py's buffer for what goes out meanwhile full (2 MiB).
    nats.errors.OutboundBufferLimitError,
    ConnectionError,  # the socket's own: reset, broken pipe
    RuntimeError,
)


def connection_lost(error: Exception) -> bool:
    """Whether ``error`` (one of ``_CONNECTION_LOST``) says the connection is being lost.
    Between a server's death and nats-py's noticing it, a publish can write to the dead
    socket itself: its drain then fails (ConnectionResetError), or uvloop refuses the write
    (a RuntimeError, "the handler is closed"). Left unmapped, either failed a step's
    recorded outcome for good, and the step ran again (the cluster failover test)."""
    return not isinstance(error, RuntimeError) or "handler is closed" in str(error)


async def quietly(op: Awaitable[object], what: str = "acknowledgement") -> bool:
    """Await ``op``, a write whose failure costs nothing (an acknowledgement: its message
    comes back by itself; a lease's release: the lease lapses), logging a failure instead of
    raising it; whether it went. A bug (any other exception) is still raised."""
    try:
        await op
    except (NatflowError, nats.errors.Error, OSError) as exc:
        log.debug("%s failed: %s", what, exc)
        return False
    except RuntimeError as exc:
        if not connection_lost(exc):
            raise
        log.debug("%s failed: %s", what, exc)
        return False
    return True


T = TypeVar("T")


# A time (``time.monotonic``) after which no transient failure is retried, set by a caller
# that must answer soon whatever it calls (a console page): it then gets the failure itself,
# which says what is wrong, in seconds rather than after 30 s of retries.
retry_deadline: ContextVar[float | None] = ContextVar("natflow_retry_deadline", default=None)


async def retrying(
    what: str, op: Callable[[], Awaitable[T]], *, budget: float = 30.0, kind: str | None = None
) -> T:
    """Run ``op``, retrying transient failures with backoff for up to ``budget`` seconds
    (and not past :data:`retry_deadline`, where one is set). ``kind``: what many operations
    of one sort share (enqueueing runs), whose first failures are warned of once in a while
    (:mod:`_log_repeats`), not once per operation."""
    deadline = time.monotonic() + budget
    cap = retry_deadline.get()
    if cap is not None:
        deadline = min(deadline, cap)
    delay = 0.1
    # Warned of once per operation (an election's few seconds logged ~150 lines), and once
    # in a while for a kind of operation (each run to enqueue, while the store is full).
    warned = False
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if time.monotonic() + delay > deadline:
                raise
            level = logging.DEBUG if warned else logging.WARNING
            if not warned and kind is not None:
                level = level_for(kind)
            warned = True
            log.log(level, "%s failed (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
