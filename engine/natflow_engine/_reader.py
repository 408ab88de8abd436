"""Batch direct gets: many stream messages in one request (NATS.md §7), and a stream's
bounds, where a read of a whole stream starts.

One wildcard reply subscription per connection serves every read; each read gets its own
reply token. The server streams the messages, then a ``204 EOB`` status carrying
``Nats-Num-Pending`` and ``Nats-Last-Sequence``; a read continues past the batch limit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import msgspec
from nats.aio.msg import Msg

from ._connection import (
    ERR_STREAM_NOT_FOUND,
    SILENT_JETSTREAM,
    ApiError,
    Connection,
    NoResponders,
)
from ._errors import NatflowError, ServerUnavailable

# One request reads a history of 10,000 small events whole: the server answers it as one
# isolated read (no write lands between its messages), and each further request costs a
# round trip and a count of the subject's messages. Bytes bound a request instead: every read
# shares one reply subscription, whose pending bytes nats-py caps at 128 MiB (more would be
# dropped, not waited for), and the server's own cap is its max_pending (64 MiB).
BATCH: Final = 16384
MAX_BYTES: Final = 8 * 1024 * 1024
LAST_PER_REQUEST: Final = 256  # subjects per multi-last request (the server refuses > 1024)
_TIMEOUT: Final = 5.0


@dataclass(slots=True)
class Page:
    messages: list[Msg] = field(default_factory=list)
    last_seq: int = 0  # the stream sequence of the last message returned (0: none)
    pending: int = 0  # how many matched from the request's start (``Nats-Num-Pending``)


class _Read:
    __slots__ = ("done", "error", "page", "single")

    def __init__(self, single: bool) -> None:
        self.page = Page()
        self.done = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self.single = single  # one message and no end-of-batch status


class BatchReader:
    """Reads runs of messages from a stream with batch direct gets."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._prefix: str | None = None
        self._reads: dict[str, _Read] = {}
        self._counter = 0
        self._lock = asyncio.Lock()
        conn.on_disconnect.append(self._fail_reads)

    def _fail_reads(self) -> None:
        """The connection is lost: no answer will come to a read sent over it (see
        ``Connection._fail_requests``); fail each now instead of after its timeout."""
        for read in self._reads.values():
            if not read.done.done():
                read.done.set_exception(ServerUnavailable("lost the NATS connection while reading"))

    async def read_all(
        self,
        stream: str,
        subject: str | None = None,
        *,
        start: int = 1,
        headers: bool = False,
        limit: int | None = None,
    ) -> Page:
        """Every message from ``start`` on (matching ``subject``), in stream order."""
        total = Page()
        while True:
            want = BATCH if limit is None else min(BATCH, limit - len(total.messages))
            page = await self.read(stream, subject, start=start, batch=want, headers=headers)
            total.messages.extend(page.messages)
            total.last_seq = page.last_seq or total.last_seq
            total.pending = page.pending
            done = limit is not None and len(total.messages) >= limit
            # The end-of-batch ``Nats-Num-Pending`` counts the matching messages from the
            # request's start on, those just sent included (measured on nats-server 2.15): a
            # batch holding fewer was cut short (by its size or bytes) and goes on; one that
            # holds them all is the whole read, with no second request to learn so.
            if len(page.messages) >= page.pending or not page.messages or done:
                return total
            start = page.last_seq + 1

    async def read_last(self, stream: str, subjects: list[str], batch: int | None = None) -> Page:
        """The last message of each subject that has one (headers included: each names its
        subject in ``Nats-Subject``), in one request. ``batch`` bounds how many come back
        (default: one per subject; give more when ``subjects`` hold wildcards)."""
        if not subjects:
            return Page()
        request = {"multi_last": subjects, "batch": batch or len(subjects)}
        return await self._request(stream, request)

    async def read_last_each(
        self, stream: str, subjects: list[str], per_subject: int = 1
    ) -> list[Msg]:
        """The last message of each subject that has one, however many subjects: up to
        :data:`LAST_PER_REQUEST` a request. ``per_subject``: how many may come back for each
        (more than one where a subject is a wildcard)."""
        found: list[Msg] = []
        for at in range(0, len(subjects), LAST_PER_REQUEST):
            chunk = subjects[at : at + LAST_PER_REQUEST]
            found += (await self.read_last(stream, chunk, per_subject * len(chunk))).messages
        return found

    async def get(self, stream: str, seq: int) -> Msg | None:
        """The message at stream sequence ``seq``, headers included (``Nats-Subject``), or
        None if there is none. One lookup on the server: a read by subject (``read``)
        instead walks the stream's messages from its start to its end, every later one
        included, which under load was most of the server's CPU."""
        page = await self._request(stream, {"seq": seq}, single=True)
        return page.messages[0] if page.messages else None

    async def read(
        self,
        stream: str,
        subject: str | None = None,
        *,
        start: int = 1,
        batch: int = BATCH,
        headers: bool = False,
    ) -> Page:
        """One batch of up to ``batch`` messages from ``start`` on."""
        request: dict[str, object] = {"seq": max(1, start), "batch": batch, "max_bytes": MAX_BYTES}
        if subject is not None:
            request["next_by_subj"] = subject
        if not headers:
            request["no_hdr"] = True
        return await self._request(stream, request)

    async def _request(
        self, stream: str, request: dict[str, object], *, single: bool = False
    ) -> Page:
        subject = f"{self._conn.api}.DIRECT.GET.{stream}"
        self._conn.check_open(subject)  # its inbox's subscribe would raise nats-py's own
        prefix = await self._inbox()
        self._counter += 1
        token = str(self._counter)
        read = _Read(single)
        self._reads[token] = read
        try:
            await self._conn.guarded(
                subject, self._ask(subject, request, f"{prefix}.{token}", read)
            )
        except TimeoutError:
            # Refused by the server's permissions (a timeout is all nats-py shows of it)?
            error = self._conn._timeout_error(f"{self._conn.api}.DIRECT.GET.{stream}", _TIMEOUT)
            raise error from None
        finally:
            self._reads.pop(token, None)
        if read.error is not None:
            if read.error.startswith("503"):
                raise NoResponders(f"{self._conn.api}.DIRECT.GET.{stream}")
            raise NatflowError(f"reading {stream} failed: {read.error}")
        return read.page

    async def _ask(self, subject: str, request: dict[str, object], reply: str, read: _Read) -> None:
        await self._conn.send(subject, msgspec.json.encode(request), reply=reply)
        async with asyncio.timeout(_TIMEOUT):
            await read.done

    async def _inbox(self) -> str:
        if self._prefix is None:
            async with self._lock:
                if self._prefix is None:
                    prefix = self._conn.nc.new_inbox()
                    await self._conn.nc.subscribe(f"{prefix}.*", cb=self._on_reply)
                    self._prefix = prefix
        return self._prefix

    async def _on_reply(self, msg: Msg) -> None:
        read = self._reads.get(msg.subject.rsplit(".", 1)[-1])
        if read is None or read.done.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            read.page.messages.append(msg)
            if read.single:
                read.done.set_result(None)
            return
        if status == "204":  # end of batch
            read.page.last_seq = int(headers.get("Nats-Last-Sequence", "0"))
            read.page.pending = int(headers.get("Nats-Num-Pending", "0"))
        elif status != "404":  # 404: nothing (more) matches
            read.error = f"{status} {headers.get('Description', '')}"
        read.done.set_result(None)


class _StreamState(msgspec.Struct):
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0


class _InfoReply(msgspec.Struct):
    state: _StreamState | None = None
    error: ApiError | None = None


_info_decoder = msgspec.json.Decoder(_InfoReply)


async def stream_bounds(conn: Connection, stream: str) -> tuple[int, int] | None:
    """The stream's first and last sequences (the last below the first: empty); None if
    there is no such stream. A server that does not answer is an error, never an empty
    stream (every reader of a whole stream starts here: ``runs list``, the console)."""
    state = await _stream_state(conn, stream)
    return None if state is None else (state.first_seq, state.last_seq)


async def stream_size(conn: Connection, stream: str) -> int | None:
    """How many messages the stream holds (None: no such stream); one request."""
    state = await _stream_state(conn, stream)
    return None if state is None else state.messages


async def _stream_state(conn: Connection, stream: str) -> _StreamState | None:
    subject = f"{conn.api}.STREAM.INFO.{stream}"
    try:
        msg = await conn.request(subject, b"")
    except NoResponders as exc:  # a stream's absence is an answer: this is JetStream's
        raise NoResponders(subject, SILENT_JETSTREAM) from exc
    reply = _info_decoder.decode(msg.data)
    if reply.error is not None and reply.error.err_code == ERR_STREAM_NOT_FOUND:
        return None
    if reply.error is not None or reply.state is None:
        raise (reply.error or ApiError(description="no stream state")).refusal(f"stream {stream}")
    return reply.state


def stored_time(headers: dict[str, str]) -> datetime:
    """When the server stored a message read with its headers (its ``Nats-Time-Stamp``)."""
    head, _, fraction = headers["Nats-Time-Stamp"].rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00")


def reader(conn: Connection) -> BatchReader:
    """The connection's shared reader."""
    existing = conn.extras.get("reader")
    if isinstance(existing, BatchReader):
        return existing
    made = BatchReader(conn)
    conn.extras["reader"] = made
    return made
