"""Heartbeats that do not depend on the worker's event loop.

A step body that blocks the worker's loop (``time.sleep`` in an ``async def`` step) must not
cost the worker its runs: if heartbeats ran on that loop, the task's ack deadline and the
run's lease would lapse, another worker would take the run and run the step again, and the
holder would be fenced when it woke up. So the heartbeat lives on a thread of its own, with
its own event loop and its own NATS connection (the same servers and credentials): every
``interval`` it marks each held task in progress (``+WPI``), renews each lease (revision
checked), and it answers the engine's pings. A lease found taken, or not renewed for a whole
lease period, is reported back to the worker's loop, which steps back from the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import nats
from natflow_engine import (
    Connection,
    Lease,
    Leases,
    NatflowError,
    logged_callbacks,
    ping_subject,
    wrap,
)
from nats.aio.msg import Msg

log = logging.getLogger("natflow.worker")

# A worker's answer to a ping naming a run: it holds the run, or it does not.
HELD: Final = b"held"
FREE: Final = b"free"

_OPTIONS = (
    "user",
    "password",
    "token",
    "tls",
    "tls_hostname",
    "tls_handshake_first",
    "connect_timeout",
    "ping_interval",
    "max_outstanding_pings",
)


class HeldRun(Protocol):
    """What the heartbeat needs of a run the worker holds."""

    msg: Msg
    run_id: str
    lease: Lease | None
    revision: int
    renewed_at: float
    lost: bool
    released: bool
    guard: threading.Lock


def connect_options(conn: Connection) -> dict[str, Any]:
    """Options that open a second connection like ``conn`` (servers and credentials)."""
    nc: Any = conn.nc
    options: dict[str, Any] = {k: nc.options.get(k) for k in _OPTIONS if nc.options.get(k)}
    pool = getattr(nc, "_server_pool", None) or []
    options["servers"] = [srv.uri.geturl() for srv in pool] or [conn.url]
    for attribute, option in (
        ("_user_credentials", "user_credentials"),
        ("_nkeys_seed", "nkeys_seed"),
        ("_nkeys_seed_str", "nkeys_seed_str"),
        ("_signature_cb", "signature_cb"),
        ("_user_jwt_cb", "user_jwt_cb"),
        ("_inbox_prefix", "inbox_prefix"),
    ):
        value = getattr(nc, attribute, None)
        if value:
            options[option] = bytes(value) if isinstance(value, bytearray) else value
    return options


class Pulse:
    """The worker's heartbeat thread; see the module docstring."""

    def __init__(
        self,
        conn: Connection,
        identity: str,
        interval: float,
        held: Callable[[], list[HeldRun]],
        holds: Callable[[str], bool],
        lost: Callable[[HeldRun, str], object],
    ) -> None:
        self._options = connect_options(conn)
        self._domain = conn.domain
        self._identity = identity
        self.interval = interval
        self._held = held
        self._holds = holds
        self._lost = lost  # called on this thread: must only hand over to the worker's loop
        self.lease_ttl = interval * 3
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closing = False  # our own close: its disconnect is no lost connection
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> bool:
        """Start the thread; False if its connection could not be opened in time."""
        self._thread = threading.Thread(target=self._main, name="natflow-pulse", daemon=True)
        self._thread.start()
        return self._started.wait(timeout) and self.error is None

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # its loop has ended already
                return
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the worker falls back
            self.error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(
            **self._options,
            name=f"natflow-pulse-{self._identity}",
            **logged_callbacks("heartbeat connection", closing=lambda: self._closing),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        conn = wrap(nc, self._domain)
        leases = Leases(conn)
        await nc.subscribe(ping_subject(self._identity), cb=self.on_ping)
        self._started.set()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                if self._stop.is_set():
                    break
                await self.beat_all(nc, leases)
        finally:
            self._closing = True
            await nc.close()

    async def beat_all(self, nc: Any, leases: Leases) -> None:
        """One heartbeat for every held run, on ``nc`` (this thread's connection, or the
        worker's own when the thread could not connect)."""
        try:
            await asyncio.gather(*(self._beat(nc, leases, h) for h in self._held()))
        except Exception as exc:  # a bug must not stop the heartbeat of every run
            log.error("heartbeat failed: %s", exc, exc_info=exc)

    async def _beat(self, nc: Any, leases: Leases, held: HeldRun) -> None:
        try:  # on this thread's connection: the task's own one is on the worker's loop
            await nc.publish(held.msg.reply, b"+WPI")
        except Exception as exc:  # the task comes back if this keeps failing
            log.debug("run %s: in-progress mark failed: %s", held.run_id, exc)
        lease, revision = held.lease, held.revision
        if lease is None or held.lost or held.released:  # released: its lease is being dropped
            return
        try:
            renewed = await leases.renew(lease, revision)
        except (NatflowError, nats.errors.Error, OSError) as exc:
            # No stepping back for that: a worker handed the run's task meanwhile asks this
            # one (its ping, answered on this thread) before it claims, and history's
            # conditional append fences this one if one claimed all the same (this worker
            # unreachable). Stepping back would only run steps twice.
            overdue = time.monotonic() - held.renewed_at - self.lease_ttl
            if 0 < overdue <= self.interval:  # said once per outage
                log.warning("run %s: lease not renewed for a while (%s)", held.run_id, exc)
            return
        if renewed is None and held.lease is lease and not held.released:
            renewed = await self._write_back(nc, leases, lease)
            if renewed is None:
                self._lost(held, "lease taken by another worker")
                return
        if renewed is None:
            return
        with held.guard:  # the worker's loop releases under it (RunLeases.release)
            let_go = held.released
            if not let_go and held.lease is lease:
                held.lease, held.revision = renewed
                held.renewed_at = time.monotonic()
        if let_go:  # released while this renewal was out: what it wrote must not outlive it
            with contextlib.suppress(NatflowError, nats.errors.Error, OSError):
                await leases.release(held.run_id, renewed[1])

    async def _write_back(self, nc: Any, leases: Leases, lease: Lease) -> tuple[Lease, int] | None:
        """The lease written back, if the worker that wrote over it does not hold the run.

        A worker handed the run's task (a redelivery during an election, read before this
        worker's claim landed) writes its lease beside its own claim; when its claim loses it
        lets the run go, and history still names this worker as the holder. Stepping back then
        would leave the run to no one until its task came back. The writer is asked, as a
        worker handed a task asks the holder (``RunGuard.held_elsewhere``)."""
        found = await leases.get(lease.run_id)
        if found is not None and found[0].worker != self._identity:
            try:
                reply = await nc.request(
                    ping_subject(found[0].worker), lease.run_id.encode(), timeout=1.0
                )
            except nats.errors.NoRespondersError:
                pass  # its process is gone: the run is this worker's still
            except (nats.errors.Error, OSError):
                return None  # unknown: step back, history fences whichever is not the holder
            else:
                if reply.data != FREE:
                    return None
        try:
            written = await leases.write_back(lease)
        except (NatflowError, nats.errors.Error, OSError) as exc:
            log.debug("run %s: lease not written back: %s", lease.run_id, exc)
            return None
        if written is not None:
            log.info(
                "run %s: lease written over by a worker that does not hold the run; written back",
                lease.run_id,
            )
        return written

    async def on_ping(self, msg: Msg) -> None:
        """Answer a ping: with the identity, or (asked about a run) whether it is held here."""
        if not msg.reply:
            return
        if msg.data:
            answer = HELD if self._holds(msg.data.decode(errors="replace")) else FREE
        else:
            answer = self._identity.encode()
        try:
            await msg.respond(answer)
        except Exception as exc:  # the asker retries
            log.debug("ping answer failed: %s", exc)
