"""JetStream usage from nats-server's own monitoring endpoint, exported as natflow metrics.

nats-server serves ``/jsz`` on its HTTP monitoring port (``http: 127.0.0.1:8222`` in
``nats.conf``; ``natflow dev`` knows its embedded server's). The engine reads it every few
seconds and exports each stream's messages and bytes beside its limits, and the server's
storage beside its ``max_file_store``/``max_memory_store``, so an alert can say a stream is
near its limits without an extra exporter to install. On a cluster, point it at any one
server: every server reports the streams it holds a replica of.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import msgspec

from ._errors import NatflowError
from ._metrics import (
    JS_MEMORY_BYTES,
    JS_MEMORY_LIMIT,
    JS_STORAGE_BYTES,
    JS_STORAGE_LIMIT,
    JS_STREAM_BYTES,
    JS_STREAM_MAX_BYTES,
    JS_STREAM_MAX_MESSAGES,
    JS_STREAM_MESSAGES,
)
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.metrics")

_QUERY: Final = "/jsz?accounts=true&streams=true&config=true"


class _StreamConfig(msgspec.Struct):
    max_msgs: int = -1
    max_bytes: int = -1


class _StreamState(msgspec.Struct):
    messages: int = 0
    bytes: int = 0


class _Stream(msgspec.Struct):
    name: str
    created: str = ""  # the server's timestamp, as STREAM.INFO gives it too
    config: _StreamConfig = msgspec.field(default_factory=_StreamConfig)
    state: _StreamState = msgspec.field(default_factory=_StreamState)


class _Account(msgspec.Struct):
    name: str = ""
    stream_detail: list[_Stream] = []


class _Limits(msgspec.Struct):
    max_memory: int = 0
    max_storage: int = 0
    sync_interval: int = 0  # nanoseconds between fsyncs when not sync_always
    sync_always: bool = False


class _MetaCluster(msgspec.Struct):
    cluster_size: int = 0


class Jsz(msgspec.Struct):
    """The part of ``/jsz`` natflow reads."""

    memory: int = 0
    storage: int = 0
    config: _Limits = msgspec.field(default_factory=_Limits)
    account_details: list[_Account] = []
    meta_cluster: _MetaCluster | None = None

    def durability(self) -> str:
        """What an acknowledged append survives on this server, in a few words.

        ``sync_always`` (``sync_interval: always``): fsynced before the ack, so it survives an
        OS crash or power loss. Otherwise the file store acks once the write reached the page
        cache and fsyncs every ``sync_interval``: it survives a crash of the server process
        only. In a JetStream cluster an ack also means a quorum of replicas holds it (for R3
        streams), whatever the sync.
        """
        if self.config.sync_always:
            mode = "fsync before every ack (sync_interval: always)"
        else:
            seconds = self.config.sync_interval / 1e9
            mode = f"ack before fsync, fsync every {seconds:g} s (relaxed)"
        size = self.meta_cluster.cluster_size if self.meta_cluster else 0
        if size > 1:
            mode += f"; cluster of {size} (replicated streams ack on a quorum)"
        return mode


_decoder = msgspec.json.Decoder(Jsz)


def jsz_url(monitor: str) -> str:
    """``http://host:port`` (or with a trailing ``/``) -> its ``/jsz`` query URL."""
    return monitor.rstrip("/") + _QUERY


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body


async def read_jsz(monitor: str, timeout: float = 5.0, *, flag: str = "--nats-monitor") -> Jsz:
    """Read and decode ``/jsz`` from the monitoring endpoint at ``monitor``; ``flag`` is the
    option that gave it, named when it cannot be read."""
    url = jsz_url(monitor)
    try:
        body = await anyio.to_thread.run_sync(_fetch, url, timeout)
        return _decoder.decode(body)
    # ValueError: urllib's answer to text that is no URL at all ("unknown url type")
    except (OSError, urllib.error.URLError, ValueError, *UNDECODABLE) as exc:
        raise NatflowError(
            f"cannot read NATS monitoring at {url} ({exc}); check {flag} (the "
            "server's `http:` port) or leave it unset"
        ) from exc


class Varz(msgspec.Struct):
    """The server's message counters (``/varz``): what every client sent it and what it sent."""

    in_msgs: int = 0
    out_msgs: int = 0


async def read_varz(monitor: str, timeout: float = 5.0) -> Varz:
    """Read ``/varz`` from the monitoring endpoint at ``monitor``."""
    url = monitor.rstrip("/") + "/varz"
    try:
        body = await anyio.to_thread.run_sync(_fetch, url, timeout)
        return msgspec.json.decode(body, type=Varz)
    except (OSError, urllib.error.URLError, ValueError, *UNDECODABLE) as exc:
        raise NatflowError(f"cannot read NATS monitoring at {url} ({exc})") from exc


def own_account(jsz: Jsz, stream: str, created: str) -> _Account | None:
    """The account in ``jsz`` that holds the stream named ``stream`` created at ``created``:
    this engine's, among every tenant's on the server (a stream name is the same in each; its
    creation time, to the nanosecond, is not). Alone on the server, the only account."""
    for account in jsz.account_details:
        if any(s.name == stream and s.created == created for s in account.stream_detail):
            return account
    if len(jsz.account_details) == 1:
        return jsz.account_details[0]
    return None


def export(jsz: Jsz, accounts: list[_Account] | None = None) -> None:
    """Set the JetStream gauges from one reading: the streams of ``accounts`` (default: every
    account's)."""
    messages: dict[tuple[str, ...], float] = {}
    sizes: dict[tuple[str, ...], float] = {}
    max_messages: dict[tuple[str, ...], float] = {}
    max_bytes: dict[tuple[str, ...], float] = {}
    for account in jsz.account_details if accounts is None else accounts:
        for stream in account.stream_detail:
            key = (account.name, stream.name)
            messages[key] = float(stream.state.messages)
            sizes[key] = float(stream.state.bytes)
            if stream.config.max_msgs > 0:
                max_messages[key] = float(stream.config.max_msgs)
            if stream.config.max_bytes > 0:
                max_bytes[key] = float(stream.config.max_bytes)
    JS_STREAM_MESSAGES.set_all(messages)
    JS_STREAM_BYTES.set_all(sizes)
    JS_STREAM_MAX_MESSAGES.set_all(max_messages)
    JS_STREAM_MAX_BYTES.set_all(max_bytes)
    JS_STORAGE_BYTES.set_all({(): float(jsz.storage)})
    JS_MEMORY_BYTES.set_all({(): float(jsz.memory)})
    JS_STORAGE_LIMIT.set_all({(): float(jsz.config.max_storage)} if jsz.config.max_storage else {})
    JS_MEMORY_LIMIT.set_all({(): float(jsz.config.max_memory)} if jsz.config.max_memory else {})


class JetStreamUsage:
    """Reads ``/jsz`` every ``interval`` seconds and exports it (see the module docstring).

    The monitoring port is the operator's: it shows every account on the server. With
    ``own_stream`` (a stream's name and a function that reads its creation time over this
    engine's connection), only the streams of the account holding that stream are exported,
    so one tenant's engine does not publish another tenant's stream sizes."""

    def __init__(
        self,
        monitor: str,
        *,
        interval: float = 5.0,
        on_read: Callable[[Jsz], Awaitable[None]] | None = None,
        own_stream: tuple[str, Callable[[], Awaitable[str]]] | None = None,
    ) -> None:
        self.monitor = monitor
        self.interval = interval
        self._on_read = on_read  # what else the engine does with each reading
        self._own_stream = own_stream
        self._created = ""  # the own stream's creation time, once read
        self._unplaced = False  # warned that the own account is not among several
        self._failing = False

    async def _accounts(self, jsz: Jsz) -> list[_Account] | None:
        if self._own_stream is None:
            return None
        name, read_created = self._own_stream
        if not self._created:
            try:
                self._created = await read_created()
            except NatflowError as exc:
                log.debug("cannot read when %s was created: %s", name, exc)
        account = own_account(jsz, name, self._created) if self._created else None
        if account is None and len(jsz.account_details) > 1:
            if not self._unplaced:
                log.warning(
                    "NATS monitoring at %s shows %d accounts and none holds this engine's "
                    "%s; its per-stream gauges stay empty (the monitored server may hold no "
                    "replica of it: point --nats-monitor at one that does)",
                    self.monitor,
                    len(jsz.account_details),
                    name,
                )
                self._unplaced = True
            return []
        self._unplaced = False
        return [account] if account is not None else None

    async def run(self) -> None:
        while True:
            await self.poll()
            await anyio.sleep(self.interval)

    async def poll(self) -> None:
        try:
            jsz = await read_jsz(self.monitor)
        except NatflowError as exc:
            # Once per outage at warning level: a monitoring port that is down is worth a
            # line, not one every few seconds.
            log.log(logging.DEBUG if self._failing else logging.WARNING, "%s", exc)
            self._failing = True
            export(Jsz(config=_Limits()))  # no stale numbers: the gauges go empty
            JS_STORAGE_BYTES.set_all({})
            JS_MEMORY_BYTES.set_all({})
            return
        if self._failing:
            log.info("NATS monitoring at %s answers again", self.monitor)
        self._failing = False
        export(jsz, await self._accounts(jsz))
        if self._on_read is not None:
            await self._on_read(jsz)
