"""Quarantined runs: poisoned, corrupt or parked runs are held as ``blocked`` with the reason.

A run is held (a ``run_blocked`` event whose error type says why) when

* its workers died three times while holding it with no progress in between
  (``PoisonedRun``): the run, most likely one of its steps, kills the process (``os._exit``,
  a crash in native code, the memory it takes); another worker would only die too;
* an event in its history does not decode (``CorruptHistory``): it cannot be replayed;
* its task failed the same way on every one of many deliveries (``ParkedRun``).

A held run's tasks are acknowledged without running any of its code, so nothing loops. It
can still be cancelled or terminated: a ``$cancel`` or ``$terminate`` signal ends it as
terminated.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Final

from natflow_engine import (
    CANCEL,
    TERMINATE,
    AppendConflict,
    Connection,
    CorruptHistory,
    ErrorInfo,
    History,
    HistoryStore,
    NatflowError,
    NoResponders,
    Task,
    control_request,
    dead_letter_item,
    fields,
    pending_signals,
    ping_subject,
    quarantined,
)
from natflow_engine.events import (
    TERMINAL_EVENTS,
    Event,
    RunBlocked,
    RunClaimed,
    RunReleased,
    RunTerminated,
    StepStarted,
    decode_event,
    utcnow,
)
from nats.aio.msg import Msg
from prometheus_client import Counter

from ._pulse import HELD

log = logging.getLogger("natflow.worker")

POISONED: Final = "PoisonedRun"
CORRUPT: Final = "CorruptHistory"
PARKED: Final = "ParkedRun"
HELD_TYPES: Final = (POISONED, CORRUPT, PARKED)
# Deaths of the run's holders, with no progress in between, that hold it as poisoned. A
# worker that dies of something else takes its claims of every run it held with it: under
# churn (an OOM killer, lost nodes) two such deaths in a row held innocent runs forever.
# History cannot tell those from a poisoned run (a quick step that ends its process leaves
# no step_started), so one more death is the price of not blocking them.
DEATHS_TO_POISON: Final = 3
REDELIVERIES_DECLINED = Counter(
    "natflow_worker_redeliveries_declined",
    "Tasks (mostly redeliveries) a worker left with the live worker that holds the run.",
)
# What a worker writes before it gets anywhere (a release: it let go on purpose, see below).
_NO_PROGRESS: Final = (RunClaimed, StepStarted, RunReleased)


def held_block(last: Event | None) -> RunBlocked | None:
    """The block that holds the run in quarantine, if ``last`` (its last event) is one."""
    if isinstance(last, RunBlocked) and last.error.type in HELD_TYPES:
        return last
    return None


def unfinished_holders(events: list[Event], me: str) -> tuple[list[str], str | None]:
    """Workers (other than ``me``) that claimed the run since its last progress and did not
    let it go on purpose (a ``run_released``: a graceful stop past its grace, which a
    rolling deploy repeats), oldest first, and the step the last of them had been running,
    if history says."""
    holders: list[str] = []
    released: set[str] = set()  # releases seen (later in history than the claims to come)
    step: str | None = None
    for event in reversed(events):
        if not isinstance(event, _NO_PROGRESS):
            break
        if isinstance(event, RunReleased):
            released.add(event.worker)
        if isinstance(event, StepStarted) and step is None:
            step = event.name
        if (
            isinstance(event, RunClaimed)
            and event.worker != me
            and event.worker not in holders
            and event.worker not in released
        ):
            holders.append(event.worker)
    return holders[::-1], step


async def is_gone(conn: Connection, identity: str) -> bool:
    """Whether a worker's connection is gone (nothing answers its pings)."""
    try:
        await conn.request(ping_subject(identity), b"", timeout=1.0)
    except NoResponders:
        return True
    except NatflowError:  # slow or unreachable: not proof of death
        return False
    return False


class RunGuard:
    """Decides whether a run is held in quarantine, and holds it there."""

    def __init__(self, conn: Connection, store: HistoryStore, identity: str) -> None:
        self._conn = conn
        self._store = store
        self._identity = identity
        self._failures: dict[tuple[str, str], None] = {}

    async def poisoned(self, run_id: str, events: list[Event]) -> ErrorInfo | None:
        """The reason to hold the run as poisoned, or None."""
        holders, step = unfinished_holders(events, self._identity)
        if len(holders) < DEATHS_TO_POISON:
            return None
        dead = [w for w in holders if await is_gone(self._conn, w)]
        if len(dead) < DEATHS_TO_POISON:
            return None
        doing = f" while running step {step!r}" if step else ""
        return ErrorInfo(
            type=POISONED,
            message=f"the run's workers died {len(dead)} times{doing} with no progress in "
            f"between ({', '.join(dead)}); it is held so that it kills no more workers. Fix "
            "the code that ends the process, then start the run again (cancel this one)",
        )

    async def hold(
        self, run_id: str, error: ErrorInfo, *, last_seq: int, count: int, path: str
    ) -> None:
        """Append the ``run_blocked`` that holds the run (once), count and log it."""
        quarantined(path, f"run {run_id}", error.message, logger=log)
        event = RunBlocked(id=f"{run_id}:{count + 1}", at=utcnow(), position=0, error=error)
        try:
            await self._store.append(run_id, event, last_seq)
        except AppendConflict:
            log.info("run %s changed while being held; it will be looked at again", run_id)

    async def end_if_asked(self, run_id: str, why: str, *, last_seq: int, count: int) -> bool:
        """Terminate a held run that was asked to cancel or terminate; True if it was."""
        asked = [
            m
            for m in await pending_signals(self._conn, run_id, 0)
            if control_request((m.headers or {}).get("Nats-Subject", m.subject))
            in (CANCEL, TERMINATE)  # a pause or resume does not end a held run
        ]
        if not asked:
            return False
        event = RunTerminated(
            id=f"{run_id}:{count + 1}", at=utcnow(), reason=f"stopped while held: {why}"
        )
        try:
            await self._store.append(run_id, event, last_seq)
        except AppendConflict:
            return False
        log.info("run %s: terminated while held (%s)", run_id, why, extra=fields(run_id))
        return True

    async def holds(self, run_id: str, history: History) -> bool:
        """Whether the run is held (already, or now: as poisoned); a held run asked to stop
        is terminated."""
        count = len(history.events)
        block = held_block(history.events[-1])
        if block is not None:
            await self.end_if_asked(
                run_id, block.error.message, last_seq=history.last_seq, count=count
            )
            return True
        poison = await self.poisoned(run_id, history.events)
        if poison is None:
            return False
        await self.hold(run_id, poison, last_seq=history.last_seq, count=count, path="run_poisoned")
        return True

    async def hold_corrupt(self, run_id: str, bad: CorruptHistory) -> None:
        """Hold a run whose history does not decode (once), or end it if asked to."""
        if isinstance(bad.last, TERMINAL_EVENTS) or await self.end_if_asked(
            run_id, str(bad), last_seq=bad.last_seq, count=bad.count
        ):
            return
        if held_block(bad.last) is not None:
            quarantined("history_event", f"run {run_id}", str(bad), logger=log)
            return
        error = ErrorInfo(type=CORRUPT, message=str(bad))
        await self.hold(run_id, error, last_seq=bad.last_seq, count=bad.count, path="history_event")

    async def failed(self, run_id: str, exc: Exception, delivered: int, park_after: int) -> bool:
        """Log a failed task (with its traceback once); True if the run is now held as
        parked, after ``park_after`` failed deliveries in a row."""
        if delivered == 1 or self._first_failure(run_id, exc):
            log.error(
                "run %s: task failed, retrying later: %s",
                run_id,
                exc,
                exc_info=exc,
                extra=fields(run_id),
            )
        else:
            log.debug(
                "run %s: task failed again (delivery %d): %s",
                run_id,
                delivered,
                exc,
                extra=fields(run_id),
            )
        if delivered < park_after:
            return False
        error = ErrorInfo(
            type=PARKED,
            message=f"its task failed {delivered} times in a row; the last error: "
            f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        )
        try:
            history = await self._store.read(run_id)
            await self.hold(
                run_id,
                error,
                last_seq=history.last_seq,
                count=len(history.events),
                path="run_parked",
            )
        except NatflowError as failed:
            log.warning("run %s: could not park the run (%s)", run_id, failed)
            return False
        return True

    def _first_failure(self, run_id: str, exc: Exception) -> bool:
        key = (run_id, type(exc).__name__)
        if key in self._failures:
            return False
        self._failures[key] = None
        if len(self._failures) > 10_000:
            self._failures.pop(next(iter(self._failures)))
        return True

    async def set_task_aside(self, msg: Msg, reason: str) -> None:
        """Count, log and dead-letter (once) a task message that cannot be used."""
        seq = msg.metadata.sequence.stream
        if not quarantined("task", f"task #{seq} on {msg.subject}", reason, logger=log):
            return
        run_id = msg.subject.rsplit(".", 1)[-1]
        try:
            await dead_letter_item(
                self._conn, "task", msg.subject, reason, seq, msg.data, run_id=run_id
            )
        except NatflowError as exc:
            log.warning("task #%d: could not dead-letter it (%s)", seq, exc)

    async def held_elsewhere(self, run_id: str, holder: str | None) -> bool:
        """Whether ``holder`` (the run's last claimer, by history) is another worker that is
        alive and says it holds the run."""
        if holder is None or holder == self._identity:
            return False
        try:
            reply = await self._conn.request(ping_subject(holder), run_id.encode(), timeout=1.0)
        except NatflowError:  # gone, or not answering: the run may move
            return False
        if reply.data != HELD:
            return False
        log.info(
            "run %s: task handed here while worker %s holds it; leaving it there",
            run_id,
            holder,
            extra=fields(run_id, worker=holder),
        )
        REDELIVERIES_DECLINED.inc()
        return True


def check_inline_start(task: Task, history: History, decoded: Event | None = None) -> None:
    """Count and log a task whose inline start disagrees with history (it is ignored).

    ``decoded``: the task's start as the caller decoded it already (not decoded again)."""
    inline: Any = decoded
    if inline is None:
        try:
            inline = decode_event(task.start)
        except Exception:  # undecodable: as forged as a wrong one
            inline = None
    first = history.events[0] if history.events else None
    if first is not None and inline != first:
        quarantined(
            "task_forged",
            f"task for run {task.run_id}",
            "its inline run_started disagrees with the run's history; history was used",
            logger=log,
        )
