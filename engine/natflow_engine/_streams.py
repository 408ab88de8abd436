"""Subjects, stream layouts, and their idempotent creation on first use.

Layout (all names are public and documented in the README):

* ``NATFLOW_HISTORY``: up to three subjects per run. ``natflow.history.<run_id>.run`` holds
  run-level events (claim, timers, status changes, the end: what the engine folds) and
  ``natflow.history.<run_id>.step`` the rest (step and child outcomes, signals taken, patches).
  A run that starts now stores its start on
  ``natflow.history.<run_id>.start.<queue>.<workflow>``, where the workers of that queue and
  workflow take it through a durable consumer of their own (``natflow-start-<queue>~<wf>``), so
  no task is written for a new run; a delayed start, a start no such consumer existed for when
  it was made, and a run stored by an older natflow have it on ``.run``. The engine's dispatcher
  reads ``natflow.history.*.run`` and ``natflow.history.*.start.>`` only, so a step costs it
  nothing; a run's history is ``natflow.history.<run_id>.>`` in stream order, and every append
  is fenced against the last sequence of all of it
  (``Nats-Expected-Last-Subject-Sequence-Subject``). File storage, direct get on, append-only
  but for one thing: ``ctx.continue_as_new`` starts a fresh stretch of a run's history with one
  ``run_continued`` event published on the run-level subject with ``Nats-Rollup: sub``
  (``allow_rollup_hdrs``), which drops the run's older run-level events at once; the engine then
  purges the older start and step events, and readers ignore whatever precedes the newest
  ``run_continued`` meanwhile. Per-run literal prefixes let the server find a run's events
  through its subject index, however large the stream grows. The stream republishes each event
  on ``.run``, once stored, on ``natflow.stored.<run_id>`` (the stored feed).
* ``NATFLOW_TASKS``: work queue ``natflow.task.<queue>.<workflow>.<run_id>``, at most one
  pending task per run (``discard_new_per_subject``), one durable pull consumer per queue and
  workflow (``natflow-queue-<queue>~<workflow>``), so a worker only receives tasks it serves.
  Direct gets on: the engine looks up many runs' tasks in one request.
* ``NATFLOW_RUNS``: the run index, ``natflow.runs.<run_id>``, the latest summary of each run;
  a projection the engine rebuilds from history. On a single server it is acknowledged before
  it is fsynced (``persist_mode: async``); ``_index_guard`` repairs what a power cut takes.
* ``NATFLOW_SIGNALS``: signals as any NATS client publishes them,
  ``natflow.signal.<run_id>.<name>``, and cancel/terminate requests on
  ``natflow.signal.<run_id>.$control.<cancel|terminate|pause|resume>``; durable from the
  acknowledgement on.
* ``NATFLOW_DEADLETTER``: ``natflow.deadletter.<kind>.<run_id>``, what could not be
  delivered, with the reason.
* ``NATFLOW_EVENTS``: events from any NATS client, ``natflow.event.<name>``, that start the
  workflows declared for them (see ``_triggers``).
* ``NATFLOW_LIFECYCLE``: ``natflow.lifecycle.<workflow>.<status>.<run_id>``, one message per
  run status change (see ``_lifecycle``).
* KV buckets ``natflow_leases``, ``natflow_workers``, ``natflow_timers``, ``natflow_schedules``
  (schedules and their state), ``natflow_triggers`` (which workflows start on which event),
  ``natflow_value_refs`` (``<sha256>.<run_id>``: which runs refer to which stored value).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from collections.abc import Callable
from typing import Final

import msgspec
import nats.js.errors
from nats.js import api

from ._append_batch import HISTORY_SENDING, SYNC_ALWAYS, SYNC_INTERVAL, appender
from ._connection import ERR_STREAM_NAME_IN_USE, Connection
from ._errors import NatflowError, PermissionDenied
from ._kv import kv_stream_config
from ._lifecycle import lifecycle_stream_config
from ._undecodable import UNDECODABLE
from ._value_refs import REFS_BUCKET

log = logging.getLogger("natflow.streams")

HISTORY_STREAM: Final = "NATFLOW_HISTORY"
TASK_STREAM: Final = "NATFLOW_TASKS"
RUNS_STREAM: Final = "NATFLOW_RUNS"
SIGNAL_STREAM: Final = "NATFLOW_SIGNALS"
DEADLETTER_STREAM: Final = "NATFLOW_DEADLETTER"
EVENTS_STREAM: Final = "NATFLOW_EVENTS"

HISTORY_PREFIX: Final = "natflow.history"
TASK_PREFIX: Final = "natflow.task"
RUNS_PREFIX: Final = "natflow.runs"
SIGNAL_PREFIX: Final = "natflow.signal"
DEADLETTER_PREFIX: Final = "natflow.deadletter"
EVENT_PREFIX: Final = "natflow.event"
# Each run-level event once stored, republished by nats-server (the stream's leader) on
# natflow.stored.<run_id>: a refused append (a fenced worker's) never reaches it, so what a
# subscriber hears there is history, with no read to confirm it (RunHandle.result).
STORED_PREFIX: Final = "natflow.stored"
_STORED_FEED: Final = "stored feed"  # conn.extras: the history stream republishes there
_STORED_LISTENERS: Final = "stored feed listeners"  # conn.extras: woken when it is refused
SCHEDULES_BUCKET: Final = "natflow_schedules"
TRIGGERS_BUCKET: Final = "natflow_triggers"
RATES_BUCKET: Final = "natflow_rates"  # flow control: rate limit, singleton, debounce cells
RETENTION_DAYS: Final = 30
_PLAIN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
CONTROL_TOKEN: Final = "$control"  # natflow.signal.<run_id>.$control.<kind>


# The event kinds the engine folds (run index, timers, limits, parents): stored on the run's
# ``.run`` subject; every other kind goes on ``.step``.
RUN_LEVEL_EVENTS: Final = frozenset(
    {
        "run_started",
        "run_continued",
        "run_claimed",
        "run_released",
        "run_suspended",
        "run_blocked",
        "run_completed",
        "run_failed",
        "timer_scheduled",
        "signal_waited",
        "step_retrying",
        "timer_fired",
        "run_cancelled",
        "run_terminated",
        "run_paused",
        "run_resumed",
        "restart_seeded",
        "run_restarted",
    }
)
RUN_LEVEL_FILTER: Final = f"{HISTORY_PREFIX}.*.run"  # every run's run-level events
# The engine's durable consumers of history: run-level events, and the starts stored where
# their workers take them.
DISPATCHER: Final = "natflow-engine-dispatcher"
START_DISPATCHER: Final = "natflow-engine-starts"
DISPATCHERS: Final = (DISPATCHER, START_DISPATCHER)
START_TOKEN: Final = "start"  # natflow.history.<run_id>.start.<queue>.<workflow>
START_FILTER: Final = f"{HISTORY_PREFIX}.*.{START_TOKEN}.>"  # every run's immediate start


def history_subject(run_id: str) -> str:
    """All of a run's events (a wildcard: read, follow, purge, fence against it)."""
    return f"{HISTORY_PREFIX}.{run_id}.>"


def run_level_subject(run_id: str) -> str:
    """The run's run-level events: its start first, its end last."""
    return f"{HISTORY_PREFIX}.{run_id}.run"


def start_subject(run_id: str, queue: str, workflow: str) -> str:
    """Where a run that starts now stores its ``run_started``: the run's workers take it from
    there (``start_consumer``), with no task written for it."""
    return f"{HISTORY_PREFIX}.{run_id}.{START_TOKEN}.{queue}.{workflow_token(workflow)}"


def start_subjects(run_id: str) -> str:
    """The run's start subject, whatever its queue and workflow (a wildcard)."""
    return f"{HISTORY_PREFIX}.{run_id}.{START_TOKEN}.>"


def is_start_subject(subject: str) -> bool:
    """Whether ``subject`` is a history subject a start was stored on by :func:`start_subject`."""
    tokens = subject.split(".")
    return len(tokens) == 6 and tokens[3] == START_TOKEN


def step_level_subject(run_id: str) -> str:
    return f"{HISTORY_PREFIX}.{run_id}.step"


def event_subject(run_id: str, kind: str) -> str:
    """Where an event of ``kind`` (its ``type`` tag) is stored."""
    level = "run" if kind in RUN_LEVEL_EVENTS else "step"
    return f"{HISTORY_PREFIX}.{run_id}.{level}"


def run_id_of(subject: str) -> str:
    """The run id in a history subject (``natflow.history.<run_id>.<level>...``)."""
    return subject.split(".", 3)[2]


def workflow_token(workflow: str) -> str:
    """The workflow's name as one subject token: itself when it is a short plain token, else
    ``~`` and a hash of it (a plain token never holds ``~``, so the two never meet)."""
    if _PLAIN.fullmatch(workflow):
        return workflow
    return "~" + hashlib.sha256(workflow.encode()).hexdigest()[:40]


def task_subject(queue: str, workflow: str, run_id: str) -> str:
    return f"{TASK_PREFIX}.{queue}.{workflow_token(workflow)}.{run_id}"


def queue_consumer(queue: str, workflow: str) -> str:
    """The durable consumer of one workflow's tasks on one queue, shared by every worker that
    serves that workflow there: a task only ever reaches a worker that can run it."""
    return f"natflow-queue-{queue}~{workflow_token(workflow)}"


def start_consumer(queue: str, workflow: str) -> str:
    """The durable consumer (on the history stream) of one workflow's new runs on one queue,
    shared like :func:`queue_consumer`: a start reaches its workers with no task written."""
    return f"natflow-start-{queue}~{workflow_token(workflow)}"


def start_filter(queue: str, workflow: str) -> str:
    """The starts :func:`start_consumer` takes: every run's, of that queue and workflow."""
    return f"{HISTORY_PREFIX}.*.{START_TOKEN}.{queue}.{workflow_token(workflow)}"


def runs_subject(run_id: str) -> str:
    return f"{RUNS_PREFIX}.{run_id}"


def stored_subject(run_id: str) -> str:
    """Where the run's run-level events are republished once stored (``STORED_PREFIX``)."""
    return f"{STORED_PREFIX}.{run_id}"


def _stored_republish() -> api.RePublish:
    return api.RePublish(src=RUN_LEVEL_FILTER, dest=f"{STORED_PREFIX}.{{{{wildcard(1)}}}}")


def _republishes_stored(config: api.StreamConfig) -> bool:
    """Whether the history stream republishes as natflow asks (an operator's own republish
    is left as it is, and then there is no stored feed)."""
    ours, given = _stored_republish(), config.republish
    return given is not None and (given.src, given.dest) == (ours.src, ours.dest)


def stored_feed(conn: Connection) -> bool:
    """Whether the history stream republishes stored run-level events on
    :func:`stored_subject`, as this connection's :func:`ensure_streams` found it."""
    return conn.extras.get(_STORED_FEED) is True


def stored_feed_open(conn: Connection, subject: str) -> bool:
    """Whether a subscription to ``subject`` on the stored feed may still hear anything: the
    connection was not refused the feed, nor (lately) that subject."""
    return stored_feed(conn) and conn.denied(subject) is None


def stored_feed_refused(conn: Connection) -> None:
    """The server refused this connection a subscription to the stored feed (permissions
    written before it): from now on its calls listen on run-level subjects. Said once."""
    if conn.extras.get(_STORED_FEED) is True:
        log.warning(
            "this connection may not subscribe to %s.*, where nats-server republishes each "
            "stored run-level event: result() now reads history to confirm each run's end; "
            "grant the subscription (docs/security.md, ops/auth/permissions.conf)",
            STORED_PREFIX,
        )
    conn.extras[_STORED_FEED] = False
    for wake in list(stored_feed_listeners(conn)):
        wake()


def stored_feed_listeners(conn: Connection) -> set[Callable[[], None]]:
    """The calls listening on this connection's stored feed, each a callback that wakes one:
    :func:`stored_feed_refused` wakes them all. A burst of calls that subscribed at once is
    refused at once, before any of them waits, and the connection remembers only its last
    20 refusals: a call whose own refusal it forgot learns of it this way."""
    listeners = conn.extras.get(_STORED_LISTENERS)
    if not isinstance(listeners, set):
        listeners = conn.extras[_STORED_LISTENERS] = set()
    return listeners


def signal_subject(run_id: str, name: str) -> str:
    """Where signal ``name`` to the run is published; control requests (``$cancel``,
    ``$terminate``, ``$pause``, ``$resume``) go to ``natflow.signal.<run_id>.$control.<kind>``."""
    if name.startswith("$"):
        return f"{SIGNAL_PREFIX}.{run_id}.{CONTROL_TOKEN}.{name[1:]}"
    return f"{SIGNAL_PREFIX}.{run_id}.{name}"


def signal_filter(run_id: str) -> str:
    return f"{SIGNAL_PREFIX}.{run_id}.>"


def replicas() -> int:
    """Stream replicas: 1 on a single server, 3 on a cluster (``NATFLOW_REPLICAS``)."""
    return int(os.environ.get("NATFLOW_REPLICAS", "1"))


def stream_configs() -> list[api.StreamConfig]:
    r = replicas()
    return [
        api.StreamConfig(
            name=HISTORY_STREAM,
            description="natflow: every run's append-only event history",
            subjects=[f"{HISTORY_PREFIX}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            allow_direct=True,
            allow_rollup_hdrs=True,  # continue-as-new (see the module docstring)
            allow_atomic=True,  # many runs' appends in one batch (_append_batch)
            republish=_stored_republish(),  # STORED_PREFIX
            duplicate_window=120.0,
            num_replicas=r,
        ),
        api.StreamConfig(
            name=TASK_STREAM,
            description="natflow: runnable runs, one pending task per run",
            subjects=[f"{TASK_PREFIX}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE,
            max_msgs_per_subject=1,
            discard=api.DiscardPolicy.NEW,
            discard_new_per_subject=True,
            allow_direct=True,  # the engine looks up many runs' tasks at once (_tasks.queued)
            num_replicas=r,
        ),
        _acknowledged_before_fsync(
            kv_stream_config("natflow_leases", "natflow: run leases (holder, expiry)", r)
        ),
        kv_stream_config("natflow_workers", "natflow: live workers", r),
        kv_stream_config("natflow_timers", "natflow: pending timers (sleeps, timeouts)", r),
        api.StreamConfig(
            name=SIGNAL_STREAM,
            description="natflow: signals from any NATS client, before they reach history",
            subjects=[f"{SIGNAL_PREFIX}.>"],
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=120.0,
            max_age=RETENTION_DAYS * 86400.0,
            num_replicas=r,
        ),
        api.StreamConfig(
            name=DEADLETTER_STREAM,
            description="natflow: undeliverable signals and the reason",
            subjects=[f"{DEADLETTER_PREFIX}.>"],
            storage=api.StorageType.FILE,
            allow_direct=True,
            max_age=RETENTION_DAYS * 86400.0,
            num_replicas=r,
        ),
        kv_stream_config(SCHEDULES_BUCKET, "natflow: schedules and their state", r),
        kv_stream_config(TRIGGERS_BUCKET, "natflow: which workflows start on which event", r),
        kv_stream_config(RATES_BUCKET, "natflow: rate limit, singleton and debounce cells", r),
        kv_stream_config("natflow_limits", "natflow: concurrency slots and who waits for one", r),
        kv_stream_config(
            REFS_BUCKET, "natflow: which runs refer to which stored value (see _value_refs)", r
        ),
        api.StreamConfig(
            name=EVENTS_STREAM,
            description="natflow: events from any NATS client, starting declared workflows",
            subjects=[f"{EVENT_PREFIX}.>"],
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=120.0,
            max_age=RETENTION_DAYS * 86400.0,
            num_replicas=r,
        ),
        _acknowledged_before_fsync(
            api.StreamConfig(
                name=RUNS_STREAM,
                description="natflow: run index (latest summary per run), rebuilt from history",
                subjects=[f"{RUNS_PREFIX}.>"],
                storage=api.StorageType.FILE,
                max_msgs_per_subject=1,
                allow_direct=True,
                allow_atomic=True,  # many runs' summaries in one batch (_append_batch)
                num_replicas=r,
            )
        ),
        api.StreamConfig(  # an Object Store bucket, as nats-py's create_object_store makes it
            name="OBJ_natflow_values",
            description="natflow: values too large for history, by SHA-256 (see _values)",
            subjects=["$O.natflow_values.C.>", "$O.natflow_values.M.>"],
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
            num_replicas=r,
        ),
        lifecycle_stream_config(r, RETENTION_DAYS * 86400.0),
    ]


def _acknowledged_before_fsync(config: api.StreamConfig) -> api.StreamConfig:
    """A stream nothing depends on the fsync of, acknowledged before it, where the server may.

    * Run leases are advice: they make ownership visible and let the reaper hand a dead
      worker's task back at once; the history's conditional append is the fencing token,
      and a lost lease costs a slower hand-over (the task's ack deadline), never a step. Two
      lease writes per run (take and drop) were two of the ~16 fsyncs a run cost.
    * The run index is a projection of history, written for every status change of every
      run; its fsyncs (with the staging of its atomic batches) were a fifth of a durable
      single server's CPU per run: 2,000 runs x 3 steps at once on 2 cores, one worker, 15
      alternating pairs, 621 -> 690 runs/s, 1.15 -> 0.94 ms of server CPU and 2.80 -> 2.57
      ms in all per run (medians). What a power cut takes from it, the engine rewrites from
      history (``_index_guard``).

    Async persistence exists on R1 streams only (ADR-56; R3 relies on replication anyway)
    and excludes atomic batches, which writes acknowledged early do not need. The mode is
    fixed when a stream is created (an update may not change it): a stream an older natflow
    created keeps fsyncing until it is removed and created again.
    """
    if config.num_replicas == 1:
        config.persist_mode = api.PersistMode.ASYNC
        config.allow_atomic = False
    return config


async def ensure_streams(conn: Connection) -> None:
    """Create natflow's streams if missing. Cheap after the first call on a connection."""
    if conn.streams_ready:
        return
    async with conn.streams_lock:
        if conn.streams_ready:
            return
        held = [await _ensure_stream(conn, config) for config in stream_configs()]
        history = next(c for c in held if c.name == HISTORY_STREAM)
        _apply_sync_mode(conn, (history.metadata or {}).get(SYNC_MODE_KEY))
        runs = next(c for c in held if c.name == RUNS_STREAM)
        # One created before the index was acknowledged early keeps fsyncing, and batching.
        appender(conn, RUNS_STREAM).enabled = bool(runs.allow_atomic)
        conn.extras[_STORED_FEED] = _republishes_stored(history)
        conn.streams_ready = True


# The server's sync mode, recorded on the history stream's metadata (``SYNC_ALWAYS`` or
# ``SYNC_INTERVAL``). A client cannot ask nats-server whether it fsyncs each write: only its
# monitoring endpoint (/jsz) says, and a worker at the edge cannot reach that. Whoever reads
# /jsz (the engine given --nats-monitor, as `natflow dev` runs it; `natflow bench`) records
# the mode here, and every process reads it with the streams when it connects. History
# appends are batched unless the mode is recorded as ``SYNC_INTERVAL``: a batch costs
# nats-server a staging store of its own, which only the fsyncs it saves pay for (see
# _append_batch). On a 3-node cluster (R3) batching measured neither faster nor slower on
# the 2-core VM, so there too the recorded mode decides. The engine's own batched streams
# (lifecycle; the run index where it is replicated, see _acknowledged_before_fsync) batch in every
# mode: few writers make large batches, and on the 16-core machine, relaxed, turning theirs
# off too cost 6-11 % of the runs/s.
SYNC_MODE_KEY: Final = "natflow.sync"
_SYNC_MODE_UNRECORDED: Final = "sync mode unrecorded"  # conn.extras: the mode last refused


def _apply_sync_mode(conn: Connection, sync: str | None) -> None:
    appender(conn, HISTORY_STREAM, sending=HISTORY_SENDING).pays = sync != SYNC_INTERVAL


async def record_sync_mode(conn: Connection, sync_always: bool) -> None:
    """Record the server's sync mode (as its /jsz says) on the history stream, for every
    process that connects after, and batch this connection's appends accordingly.

    Writes only where the record changes. Where the record cannot be written (a connection
    without the engine role, a server that refuses), it says why once and tries again at the
    next call: other processes then batch as they did, which costs speed, never a write.
    """
    mode = SYNC_ALWAYS if sync_always else SYNC_INTERVAL
    if conn.extras.get(SYNC_MODE_KEY) == mode:
        return
    _apply_sync_mode(conn, mode)
    try:
        await ensure_streams(conn)
        # Each names its API subject: a denial must fail this call, not another in flight.
        info = await conn.admin(
            f"stream {HISTORY_STREAM}",
            lambda: conn.jsm.stream_info(HISTORY_STREAM),
            subject=f"{conn.api}.STREAM.INFO.{HISTORY_STREAM}",
        )
        config = info.config
        if (config.metadata or {}).get(SYNC_MODE_KEY) != mode:
            config.metadata = {**(config.metadata or {}), SYNC_MODE_KEY: mode}
            await conn.admin(
                "recording the server's sync mode",
                lambda: conn.jsm.update_stream(config),
                subject=f"{conn.api}.STREAM.UPDATE.{HISTORY_STREAM}",
            )
            log.info("recorded the server's sync mode on stream %s: %s", HISTORY_STREAM, mode)
    except (NatflowError, nats.js.errors.APIError) as exc:
        # Once per mode at warning level: the engine asks again every few seconds.
        level = logging.DEBUG if conn.extras.get(_SYNC_MODE_UNRECORDED) == mode else logging.WARNING
        conn.extras[_SYNC_MODE_UNRECORDED] = mode
        log.log(
            level,
            "cannot record the server's sync mode (%s) on stream %s: %s; the engine's role "
            "may update streams (docs/security.md)",
            mode,
            HISTORY_STREAM,
            exc,
        )
        return
    conn.extras[SYNC_MODE_KEY] = mode


# Settings added to a stream after its first release: a stream an older natflow created is
# updated in place to have them (each may only be turned on, so an update is always safe).
_ADDED_FLAGS: Final = ("allow_rollup_hdrs", "allow_atomic", "allow_direct")


async def _upgrade_stream(
    conn: Connection, current: api.StreamConfig, wanted: api.StreamConfig
) -> api.StreamConfig:
    """The stream's configuration, with what a newer natflow added turned on in place where
    this connection may (a republish is added only where the stream has none)."""
    added: dict[str, object] = {
        f: True for f in _ADDED_FLAGS if getattr(wanted, f) and not getattr(current, f)
    }
    if wanted.republish is not None and current.republish is None:
        added["republish"] = wanted.republish
    if not added:
        return current
    name = current.name
    assert name is not None
    updated = copy.copy(current)
    for setting, value in added.items():
        setattr(updated, setting, value)
    try:
        info = await conn.admin(f"updating stream {name}", lambda: conn.jsm.update_stream(updated))
        log.info("stream %s updated in place: %s turned on", name, ", ".join(added))
        return info.config
    except PermissionDenied:
        # A worker or client role may not update streams: the engine (or `natflow init` as
        # the engine role) does. Until then what needs the setting names it when refused.
        log.warning(
            "stream %s lacks %s and this connection may not update it; start the engine "
            "(`natflow engine`) or run `natflow init` as a user with the engine role",
            name,
            ", ".join(added),
        )
        return current


async def _ensure_stream(conn: Connection, config: api.StreamConfig) -> api.StreamConfig:
    """Create the stream if missing; its configuration as the server holds it."""
    name = config.name
    assert name is not None
    try:
        info = await conn.admin(f"stream {name}", lambda: conn.jsm.stream_info(name))
    except nats.js.errors.NotFoundError:
        pass
    else:
        return await _upgrade_stream(conn, info.config, config)
    try:
        info = await conn.admin(f"creating stream {name}", lambda: conn.jsm.add_stream(config))
        log.info("created stream %s", name)
        return info.config
    except PermissionDenied as exc:
        raise PermissionDenied(
            f"natflow's stream {name} does not exist and this connection may not create it "
            f"({exc}); start the engine (`natflow engine`) or run `natflow init` as a user "
            f"with the engine role (docs/security.md)"
        ) from exc
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != ERR_STREAM_NAME_IN_USE:  # another process created it first
            raise
    info = await conn.admin(f"stream {name}", lambda: conn.jsm.stream_info(name))
    return info.config


class _Created(msgspec.Struct):
    created: str = ""


async def stream_created(conn: Connection, name: str) -> str:
    """When the server created stream ``name``, as its own timestamp text (``/jsz`` gives the
    same text, which tells this account's stream from another tenant's of the same name)."""
    subject = f"{conn.api}.STREAM.INFO.{name}"
    msg = await conn.request(subject, b"")
    try:
        return msgspec.json.decode(msg.data, type=_Created).created
    except UNDECODABLE as exc:
        raise NatflowError(f"{subject} answered what is not stream info: {exc}") from exc
