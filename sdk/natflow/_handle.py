"""``RunHandle``: one run's status and its outcome, waited for without polling.

``result()`` looks at the run's last stored event once, then listens on the run's stored
feed (``natflow.stored.<run_id>``: each run-level event, republished by nats-server once
stored) and takes the final event it hears as the outcome. On a history stream that does not
republish (an older one this connection may not update) it listens on the run-level history
subject instead, where a final event only wakes it: the outcome is then read from history,
again within moments where the event was seen before it was readable. Where nothing was heard
from a running run at all, it looks again.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import msgspec
from natflow_engine import (
    CLOSED_STATUSES,
    TRANSIENT,
    UNDECODABLE,
    InvalidInput,
    MissingKey,
    NatflowError,
    PermissionDenied,
    RunCancelled,
    RunFailed,
    RunInfo,
    RunNotFound,
    Runs,
    check_cancelled,
    decode_value,
    ensure_streams,
    load_events,
    open_events,
    quietly,
    run_level_subject,
    sealed_key,
    site_start_stored,
    stored_feed,
    stored_feed_listeners,
    stored_feed_open,
    stored_feed_refused,
    stored_subject,
    to_seconds,
    value_ref,
)
from natflow_engine.events import (
    TERMINAL_EVENTS,
    Event,
    RunBlocked,
    RunCompleted,
    RunPaused,
    RunRestarted,
    RunStarted,
    RunTerminated,
    SignalWaited,
    TimerScheduled,
    decode_event,
    event_kind,
)
from natflow_engine.events import RunCancelled as RunCancelledEvent
from natflow_engine.events import RunFailed as RunFailedEvent
from nats.aio.msg import Msg

from ._workflow import Workflow

_RECHECK_FIRST = 0.005  # seconds: a final event seen, not yet readable
_RECHECK_MAX = 0.5
# Nothing heard on the run's subject since subscribing, and the run read as running: its
# final event, published just before the subscription existed, reaches no subscriber, and
# the stream may store it only after the first read (its ingest lags the subject under
# load). Look again at 0.5 s, 2 s and 8 s. Only a running run: one pending or asleep ends
# only after a worker takes it again (heard), short of a cancel (left to the safety net), so
# a queue of waiting handles costs no reads (the bench: +1.3 reads per run otherwise).
_UNHEARD_FIRST = 0.5
_UNHEARD_LAST = 8.0
_SAFETY_NET = 30.0  # seconds: an event lost in a reconnect
_LAST_LOOK = 2.0  # seconds for the look once the deadline passed
log = logging.getLogger("natflow.client")


@dataclass(frozen=True)
class _Open:
    """A run that has not ended: whether it is a site's run seen from a hub, and whether it
    runs now (its waits are what the result's wait may hear nothing of for a while)."""

    site: bool
    running: bool


_TERMINAL_TYPES = ("run_completed", "run_failed", "run_cancelled", "run_terminated")
# A run whose last event is one of these waits for a worker to take it (again): not running.
_LEFT_WAITING = (RunStarted, TimerScheduled, SignalWaited, RunPaused, RunBlocked)


class RunHandle:
    """A handle on one run: its status and its result.

    Made by :class:`Client` (``start``, ``handle``, ``restart``), which hands it the run
    reader of its connection.
    """

    def __init__(self, runs: Runs, run_id: str, workflow: Workflow | None = None) -> None:
        self._runs = runs
        self.run_id = run_id
        self._workflow = workflow

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"

    async def status(self) -> RunInfo:
        """The run's current :class:`RunInfo`."""
        return await self._runs.describe(self.run_id)

    async def result(self, timeout: float | timedelta | None = None) -> Any:
        """Wait for the run to end and return its result.

        Raises :class:`RunFailed` (with the error's type, message and traceback),
        :class:`RunCancelled`, or ``TimeoutError`` when ``timeout`` passes first. Waits on
        the run's stored events, so it costs nothing while the run is busy.
        """
        seconds = None if timeout is None else to_seconds("timeout", timeout)
        conn = self._runs.conn
        nc = conn.nc
        stored = await self._stored_feed()
        # On the stored feed a final event heard is the outcome: nats-server republishes an
        # event only once stored. The run-level subject itself (a stream that does not
        # republish) carries every publish, also an append the stream refused (a fenced,
        # stale worker's), and a plain subscriber may see it before it is readable: a final
        # event heard there only wakes this up, and the outcome is read from history.
        woken = anyio.Event()
        heard_final: list[bytes] = []
        # Any event heard proves the ones before it stored: every append names the last
        # sequence it follows. Until then, one stored just before subscribing may be neither
        # heard nor yet readable (the lifecycle test's 30 s waits under load).
        heard = False

        async def on_event(msg: Msg) -> None:
            nonlocal heard
            heard = True
            if event_kind(msg.data) in _TERMINAL_TYPES:
                if stored:
                    heard_final.append(msg.data)
                woken.set()

        # Final events are run-level: the run's step events never reach this subscription.
        subject = stored_subject(self.run_id) if stored else run_level_subject(self.run_id)

        def refused() -> None:  # the connection was refused the stored feed: change subjects
            woken.set()

        def reconnected() -> None:  # what was published meanwhile was not heard: look now
            woken.set()  # (or the client closed: the look says so)

        listeners = stored_feed_listeners(conn)
        conn.check_open(subject)
        listeners.add(refused)
        conn.on_reconnect.append(reconnected)
        conn.on_close.append(reconnected)  # the next look then raises ClientClosed
        subs = [await nc.subscribe(subject, cb=on_event)]
        try:
            # The deadline's own expiry, told from a RequestTimeout (a TimeoutError too) of a
            # look during an outage, which is no reason to stop waiting.
            with anyio.move_on_after(seconds) as deadline:
                recheck, settling, unheard = 0.0, False, _UNHEARD_FIRST
                while True:
                    if stored and not stored_feed_open(conn, subject):
                        # Permissions written before the stored feed (seen for this run, or
                        # for another on this connection): the run's own subject.
                        stored_feed_refused(conn)
                        stored = False
                        woken = anyio.Event()  # set by the refusal: nothing was heard there
                        subject = run_level_subject(self.run_id)
                        subs.append(await nc.subscribe(subject, cb=on_event))
                    check_cancelled()  # one lost in the subscribe or a look (3.11)
                    try:
                        looked = await self._look(heard_final)
                    except TRANSIENT as exc:  # the server away: wait on, look once it is back
                        log.debug("run %s: cannot look now (%s); waiting on", self.run_id, exc)
                        with anyio.move_on_after(_SAFETY_NET):
                            await woken.wait()
                        woken = anyio.Event()
                        continue
                    if not isinstance(looked, _Open):
                        return looked
                    site, running = looked.site, looked.running
                    unsure = not heard and running and not site
                    if woken.is_set():  # look again soon: it is stored within moments, if ever
                        woken = anyio.Event()
                        recheck, settling = _RECHECK_FIRST, True
                    elif settling and recheck < _RECHECK_MAX:
                        recheck = min(_RECHECK_MAX, recheck * 2)
                    elif unsure and unheard <= _UNHEARD_LAST:
                        recheck, settling, unheard = unheard, False, unheard * 4
                    else:
                        # A safety net for an event lost in a reconnect; each second for a
                        # site's run at a hub (its history is at the site).
                        recheck, settling = (1.0 if site else _SAFETY_NET), False
                    check_cancelled()
                    with anyio.move_on_after(recheck):
                        await self._woken(woken, subject if stored else None)
            assert deadline.cancelled_caught
            # A deadline too short for even the first look (timeout=0) still sees a run that
            # had ended already, as asyncio.wait_for(done_future, 0) gives its result; one
            # look, briefly: the deadline has passed.
            with anyio.move_on_after(_LAST_LOOK), contextlib.suppress(*TRANSIENT):
                last = await self._last_event()
                if isinstance(last, TERMINAL_EVENTS):
                    return self._ended(last)
            raise TimeoutError(f"run {self.run_id!r} did not finish within {seconds} s")
        finally:
            listeners.discard(refused)
            for hooks in (conn.on_reconnect, conn.on_close):
                with contextlib.suppress(ValueError):
                    hooks.remove(reconnected)
            for sub in subs:  # (on a connection the client closed meanwhile: nothing to do)
                await quietly(sub.unsubscribe(), "unsubscribe")

    async def _look(self, heard_final: list[bytes]) -> Any:
        """The run's outcome if it has ended (returned, or raised as RunFailed or
        RunCancelled), else :class:`_Open`. The run's last stored event (one message) tells
        whether it has ended, and how; only where it does not tell is the run described."""
        last = await self._heard(heard_final)
        if last is None:
            last = await self._last_event()
        if isinstance(last, TERMINAL_EVENTS):
            return self._ended(last)
        if last is None or isinstance(last, RunRestarted):
            try:
                info = await self._runs.describe(self.run_id, explain=False)
            except RunNotFound:
                # A start this hub stored for a site (client.site(...).start): the run is
                # the site's, and the hub's copy comes once it ran.
                if not await site_start_stored(self._runs.conn, self.run_id):
                    raise
                return _Open(site=True, running=False)
            if info.status in CLOSED_STATUSES:
                return self._outcome(info)
            return _Open(site=info.site is not None, running=info.status == "running")
        return _Open(site=False, running=not isinstance(last, _LEFT_WAITING))

    async def _woken(self, woken: anyio.Event, feed: str | None) -> None:
        """Wait for ``woken``; on the stored ``feed``, also for the server to refuse this
        connection a subscription to it (then at once: the caller changes subjects)."""
        conn = self._runs.conn
        if feed is None:
            await woken.wait()
        elif stored_feed_open(conn, feed):  # not refused already (while it looked)
            with contextlib.suppress(PermissionDenied):  # refused now
                await conn.guarded(feed, woken.wait())

    async def _stored_feed(self) -> bool:
        """Whether the history stream republishes stored run-level events (as the streams
        read on this connection show; read now if they were not)."""
        conn = self._runs.conn
        if not conn.streams_ready:
            try:
                await ensure_streams(conn)
            except NatflowError:  # may not read the streams: the run's subject, as before
                return False
        return stored_feed(conn)

    async def _heard(self, heard_final: list[bytes]) -> Event | None:
        """The final event heard on the stored feed, opened; None if none was heard, or it
        does not decode (history then tells)."""
        if not heard_final:
            return None
        try:
            event = decode_event(heard_final[-1])
        except UNDECODABLE:
            return None
        return await self._opened(event)

    async def _last_event(self) -> Event | None:
        """The run's last stored event (a final one with its values read back and opened
        where this client holds the key); None when that does not tell (no such run here, as
        for a site's run at a hub, or an event that does not decode)."""
        try:
            found = await self._runs.history.last(self.run_id)
        except NatflowError:
            return None
        if found is None:
            return None
        return await self._opened(found[0])

    async def _opened(self, event: Event) -> Event:
        """A final event with its values read back and opened where this client holds the
        key; any other as it is (only its kind counts)."""
        if not isinstance(event, TERMINAL_EVENTS):
            return event
        conn = self._runs.conn
        events = await load_events(conn, [event], self.run_id)
        return open_events(conn.codec, events, self.run_id, strict=False)[0]

    def _ended(self, event: Event) -> Any:
        """The outcome a run's final event records (as :meth:`_outcome` reads a summary)."""
        if isinstance(event, RunCompleted):
            value = msgspec.json.decode(event.result)
            key_id = sealed_key(value)
            if key_id is not None:  # left sealed: this client cannot open it
                raise MissingKey(key_id, f"the result of run {self.run_id!r}")
            return self._typed(bytes(event.result))
        if isinstance(event, RunFailedEvent):
            raise RunFailed(self.run_id, event.error)
        assert isinstance(event, RunCancelledEvent | RunTerminated)
        terminated = isinstance(event, RunTerminated)
        raise RunCancelled(self.run_id, event.reason, terminated=terminated)

    def _outcome(self, info: RunInfo) -> Any:
        key_id = sealed_key(info.result)
        if key_id is not None:  # describe leaves sealed what this client cannot open
            raise MissingKey(key_id, f"the result of run {self.run_id!r}")
        if info.status == "completed":
            ref = value_ref(info.result) if info.site else None
            if ref is not None:  # the value itself stayed in the site's object store
                raise NatflowError(
                    f"the result of run {self.run_id!r} is {ref.size} bytes, kept at site "
                    f"{info.site!r}: its hub has only a reference; read it at the site"
                )
            return self._typed(msgspec.json.encode(info.result))
        if info.status == "failed":
            assert info.error is not None
            raise RunFailed(self.run_id, info.error)
        raise RunCancelled(
            self.run_id,
            info.error.message if info.error else None,
            terminated=info.status == "terminated",
        )

    def _typed(self, data: bytes) -> Any:
        result_type = self._workflow.result_type if self._workflow is not None else Any
        try:
            return decode_value(f"result of run {self.run_id!r}", data, result_type)
        except InvalidInput:
            return msgspec.json.decode(data)
