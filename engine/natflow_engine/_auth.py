"""Roles as NATS permissions: which subjects each kind of natflow process may use.

NATS checks every publish and subscribe against the connected user's permissions; the
JetStream API is request/reply on ``$JS.API.<...>`` subjects, so "may read runs" or "may
take tasks of queue A" are subject permissions too (NATS.md §11). The roles:

* ``engine``: the engine services. Creates and updates natflow's streams (never deletes
  them), writes the run index, tasks, dead letters and lifecycle events, reads everything,
  and creates the runs a ``frontend`` asks it to start. It purges a closed run's messages
  when retention deletes the run (a purge cannot be limited to some subjects by permission),
  and pauses queues: ``natflow runs delete`` and ``natflow queues pause`` run as the engine.
* ``worker``: takes tasks (of all queues, or only of ``queues`` and ``workflows``), reads and
  appends history, reads signals, keeps leases, timers and its registry entry, answers pings,
  declares its workflows' event triggers and writes their schedules (only theirs when it
  names its workflows).
* ``client``: starts runs, sends signals, cancels, terminates, pauses and resumes, emits
  events, creates and changes schedules, and reads (``viewer``).
* ``frontend``: what ``client`` does, but starts runs by asking the engine
  (``Client.connect(..., start_via_engine=True)``), so it cannot write any history: the role
  for untrusted starters. It may emit events (the engine checks them and starts their runs),
  not change schedules.
* ``signaller``: sends ordinary signals, nothing else: no cancel, terminate, pause or resume,
  no reads.
* ``viewer``: reads runs, histories, the run index (also live, as the console does), workers
  and the runs they hold, dead letters, schedules, events and their triggers, and lifecycle
  events.

Cancel, terminate, pause and resume are grants of their own (``control``): they travel on
``natflow.signal.<run>.$control.<cancel|terminate|pause|resume>``, five tokens, which the
ordinary signal grant ``natflow.signal.*.*`` (four tokens) does not match.

What permissions cannot do (per subject, never per header or payload): a user who may start
runs publishes on ``natflow.history.*.*`` and so could append any event to any run; a worker
limited to some queues still reads and appends the histories of every run. Give ``client``
and ``worker`` only to code you trust as much as the workflows themselves; give untrusted
starters ``frontend`` (see docs/security.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ._errors import InvalidInput
from ._kv import kv_stream
from ._leases import LEASES_BUCKET
from ._lifecycle import LIFECYCLE_PREFIX, LIFECYCLE_STREAM
from ._limits import LIMITS_BUCKET
from ._names import check_queue, check_token, check_workflow_name
from ._registry import WORKERS_BUCKET, safe_identity
from ._schedules import declared_schedule_id
from ._site_index import SITE_RUNS_STREAM
from ._sites import INBOX_STREAM, OUTBOX_PREFIX, OUTBOX_STREAM
from ._start_service import START_PREFIX
from ._streams import (
    CONTROL_TOKEN,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    EVENT_PREFIX,
    EVENTS_STREAM,
    HISTORY_PREFIX,
    HISTORY_STREAM,
    RATES_BUCKET,
    RUNS_PREFIX,
    RUNS_STREAM,
    SCHEDULES_BUCKET,
    SIGNAL_PREFIX,
    SIGNAL_STREAM,
    START_TOKEN,
    STORED_PREFIX,
    TASK_PREFIX,
    TASK_STREAM,
    TRIGGERS_BUCKET,
    queue_consumer,
    start_consumer,
    workflow_token,
)
from ._timers import TIMERS_BUCKET
from ._value_refs import REFS_BUCKET
from ._values import VALUES_BUCKET, VALUES_STREAM

ROLES: Final = ("engine", "worker", "client", "frontend", "signaller", "viewer")
CONTROLS: Final = ("cancel", "terminate", "pause", "resume")
USER_INFO: Final = "$SYS.REQ.USER.INFO"  # who am I: the server's answer (worker identity)

# A worker writes these (natflow_rates: rate limits of steps, a debounced run's input;
# natflow_limits: the concurrency slots its runs take and give back).
_BUCKETS: Final = (LEASES_BUCKET, WORKERS_BUCKET, TIMERS_BUCKET, RATES_BUCKET, LIMITS_BUCKET)
_ALL_BUCKETS: Final = (*_BUCKETS, SCHEDULES_BUCKET, TRIGGERS_BUCKET, REFS_BUCKET)
# What a viewer reads: workers and the runs they hold (leases), schedules, event triggers,
# and which runs wait for a concurrency slot (the run view says so).
_READ_BUCKETS: Final = (
    WORKERS_BUCKET,
    LEASES_BUCKET,
    SCHEDULES_BUCKET,
    TRIGGERS_BUCKET,
    LIMITS_BUCKET,
    RATES_BUCKET,  # which run an event started (natflow events list), flow declarations
)
_STREAMS: Final = (
    HISTORY_STREAM,
    TASK_STREAM,
    RUNS_STREAM,
    SIGNAL_STREAM,
    DEADLETTER_STREAM,
    EVENTS_STREAM,
    LIFECYCLE_STREAM,
    *(kv_stream(b) for b in _ALL_BUCKETS),
    VALUES_STREAM,
    SITE_RUNS_STREAM,  # sites (ops/sites): at the hub, the sites' runs and the commands
    OUTBOX_STREAM,
    INBOX_STREAM,  # at a site: the hub's commands for it
)


@dataclass(frozen=True)
class Permissions:
    """Subjects a NATS user may publish to and subscribe to.

    ``allow_responses`` lets the user answer requests (publish to their reply subjects)
    without publish rights on every inbox.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def to_conf(self) -> str:
        """The permissions as a nats.conf block (the value of a user's ``permissions``)."""

        def block(subjects: tuple[str, ...]) -> str:
            lines = "".join(f'      "{s}"\n' for s in subjects)
            return f"{{\n    allow: [\n{lines}    ]\n  }}"

        text = f"{{\n  publish: {block(self.publish)}\n  subscribe: {block(self.subscribe)}\n"
        if self.allow_responses:
            text += "  allow_responses: true\n"
        return text + "}"


def role_permissions(
    role: str,
    *,
    queues: Sequence[str] = (),
    workflows: Sequence[str] = (),
    control: Sequence[str] = (),
    domain: str | None = None,
    identity: str | None = None,
    processes: int = 0,
) -> Permissions:
    """The permissions of ``role`` (one of :data:`ROLES`).

    ``queues`` limits a worker to those task queues (default: all), serving ``workflows``
    there: each workflow of a queue has its own task consumer, and a consumer name is one
    subject token that no wildcard can match by prefix, so a queue-limited worker names the
    workflows it serves. ``identity`` limits it to its own
    registry entry, pings and wake-ups (``Worker(identity=...)``, ``natflow worker
    --identity``), so it cannot answer for another worker; with ``processes`` (``natflow
    worker --identity NAME --processes N``) also to the names its processes take,
    ``NAME-0`` to ``NAME-<N-1>`` (a subject wildcard cannot match part of a token, so each is
    named). ``control`` adds any of
    :data:`CONTROLS` (cancel, terminate, pause, resume) to any role (``client`` has them
    all). ``domain`` names the JetStream domain the streams live in, for a process on a leaf
    node (NATS.md §9).
    """
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if (queues or workflows or identity) and role != "worker":
        raise InvalidInput("only the worker role takes queues, workflows and an identity")
    if queues and not workflows:
        raise InvalidInput(
            "a worker limited to queues must also name the workflows it serves there "
            "(--workflow NAME, repeatable): each workflow of a queue has its own task consumer"
        )
    if workflows and not queues:
        raise InvalidInput("--workflow limits a queue-limited worker; name its queues (--queue)")
    if identity is not None and safe_identity(identity) != identity:
        raise InvalidInput(
            f"worker identity {identity!r} must use A-Z, a-z, 0-9, '_' and '-' (at most 128)"
        )
    if processes and identity is None:
        raise InvalidInput("--processes names the processes of one worker identity: add --identity")
    if isinstance(processes, bool) or not isinstance(processes, int) or not 0 <= processes <= 256:
        raise InvalidInput(f"processes must be a whole number from 0 to 256, not {processes!r}")
    for kind in control:
        if kind not in CONTROLS:
            raise InvalidInput(f"unknown control {kind!r}; choose from {', '.join(CONTROLS)}")
    if domain:  # one subject token: a wildcard would grant every domain's API
        check_token("JetStream domain", domain)
    api = f"$JS.{domain}.API" if domain else "$JS.API"
    kv = f"{api}.$KV" if domain else "$KV"
    build = _BUILDERS[role]
    scoped = [check_queue(q) for q in queues]
    publish, subscribe, responses = (
        _worker(api, kv, scoped, [check_workflow_name(w) for w in workflows])
        if role == "worker"
        else build(api, kv, scoped)
    )
    if identity is not None:  # the worker's own registry entry and subjects only
        names = [identity, *(f"{identity}-{n}" for n in range(processes))]
        publish = [
            own
            for s in publish
            for own in (
                [f"{kv}.{WORKERS_BUCKET}.{name}" for name in names]
                if s == f"{kv}.{WORKERS_BUCKET}.>"
                else [s]
            )
        ]
        subscribe = [
            own
            for s in subscribe
            for own in (
                [f"natflow.worker.{name}.*" for name in names] if s == "natflow.worker.*.*" else [s]
            )
        ]
    extra = [_control_subject(kind) for kind in control if kind not in _CONTROL_ROLES.get(role, ())]
    return Permissions(_unique(publish + extra), _unique(subscribe), responses)


_Parts = tuple[list[str], list[str], bool]


_START_SUBJECTS: Final = f"{HISTORY_PREFIX}.*.{START_TOKEN}.>"  # start_subject()


def _control_subject(kind: str) -> str:
    return f"{SIGNAL_PREFIX}.*.{CONTROL_TOKEN}.{kind}"


def _unique(subjects: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def _direct_get(api: str, stream: str) -> list[str]:
    return [f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>"]


def _ordered_consumer(api: str, stream: str) -> list[str]:
    # nats-py creates an ordered consumer on the bare CREATE subject (NATS.md §11), deletes it
    # when done, and answers the server's flow-control requests.
    return [
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _values(api: str, kv: str, *, write: bool) -> list[str]:
    """Large values in the natflow_values object store (nats-py reads an object's meta with
    a stream message get, its chunks with an ordered consumer, whose stream it looks up by
    subject: STREAM.NAMES, without which no role could read a large value; writes publish
    to ``$O``)."""
    read = [
        f"{api}.STREAM.MSG.GET.{VALUES_STREAM}",
        f"{api}.STREAM.NAMES",
        *_ordered_consumer(api, VALUES_STREAM),
    ]
    # A writer marks the run that refers to a value and checks for a delete in progress
    # (see _value_refs).
    marks = [f"{kv}.{REFS_BUCKET}.>", *_direct_get(api, kv_stream(REFS_BUCKET))]
    return [*read, f"$O.{VALUES_BUCKET}.>", *marks] if write else read


def _stream_info(api: str) -> list[str]:
    # Every process checks on first use that natflow's streams exist (ensure_streams).
    return [f"{api}.STREAM.INFO.{s}" for s in _STREAMS]


def _viewer(api: str, kv: str, queues: list[str]) -> _Parts:
    publish = [
        *_stream_info(api),
        *_direct_get(api, HISTORY_STREAM),
        *_direct_get(api, RUNS_STREAM),
        *_direct_get(api, SITE_RUNS_STREAM),  # at a hub: the sites' runs
        *_direct_get(api, DEADLETTER_STREAM),
        *_direct_get(api, EVENTS_STREAM),  # natflow events list
        *(s for b in _READ_BUCKETS for s in _direct_get(api, kv_stream(b))),
        *_ordered_consumer(api, HISTORY_STREAM),  # Client.watch
        *_values(api, kv, write=False),
        *_ordered_consumer(api, LIFECYCLE_STREAM),  # Client.events
        # Client.events(durable=...): a durable pull consumer that remembers how far it got.
        f"{api}.CONSUMER.MSG.NEXT.{LIFECYCLE_STREAM}.>",
        f"$JS.ACK.{LIFECYCLE_STREAM}.>",
    ]
    # RunHandle.result listens for the run's final event on its stored feed (on the history
    # subject itself where the stream does not republish); the console follows the run
    # index live.
    subscribe = [
        "_INBOX.>",
        f"{STORED_PREFIX}.*",
        f"{HISTORY_PREFIX}.*.*",
        _START_SUBJECTS,  # a run's whole history, followed live
        f"{RUNS_PREFIX}.*",
    ]
    return publish, subscribe, False


def _signaller(api: str, kv: str, queues: list[str]) -> _Parts:
    # No object store: reading it would read any run's large values, writing it could
    # replace them. So a signaller's payload travels inline (at most 64 KiB).
    publish = [*_stream_info(api), f"{SIGNAL_PREFIX}.*.*"]
    return publish, ["_INBOX.>"], False


def _client(api: str, kv: str, queues: list[str]) -> _Parts:
    publish, subscribe, _ = _viewer(api, kv, queues)
    publish += [
        f"{HISTORY_PREFIX}.*.*",  # a delayed start appends the run's first event
        _START_SUBJECTS,  # a start that runs now, where its workers take it
        # ... and enqueues its task where no worker takes its starts from history: which it
        # looks up (any history consumer's info: a wildcard cannot name a prefix)
        f"{TASK_PREFIX}.>",
        f"{api}.CONSUMER.INFO.{HISTORY_STREAM}.*",
        f"{SIGNAL_PREFIX}.*.*",
        *(_control_subject(kind) for kind in CONTROLS),
        f"{EVENT_PREFIX}.>",  # client.emit
        f"{OUTBOX_PREFIX}.>",  # client.site(...): commands for a site's runs
        f"{kv}.{SCHEDULES_BUCKET}.>",  # client.schedules: create, change, delete
        f"{kv}.{RATES_BUCKET}.>",  # starts under flow control: rate limit, singleton, debounce
        *_direct_get(api, kv_stream(RATES_BUCKET)),
        *_values(api, kv, write=True),
    ]
    return publish, subscribe, False


def _frontend(api: str, kv: str, queues: list[str]) -> _Parts:
    publish, subscribe, _ = _viewer(api, kv, queues)
    publish += [
        f"{START_PREFIX}.*",  # the engine checks the request and creates the run
        f"{SIGNAL_PREFIX}.*.*",
        *(_control_subject(kind) for kind in CONTROLS),
        f"{EVENT_PREFIX}.>",  # events too start runs through the engine, which checks them
        f"{OUTBOX_PREFIX}.>",  # client.site(...): commands for a site's runs
        *_values(api, kv, write=True),  # a large input is stored before the request
    ]
    return publish, subscribe, False


def _worker(api: str, kv: str, queues: list[str], workflows: Sequence[str] = ()) -> _Parts:
    consumers = [queue_consumer(q, w) for q in queues for w in workflows] or ["*"]
    starts = [start_consumer(q, w) for q in queues for w in workflows] or ["*"]
    tasks = [f"{TASK_PREFIX}.{q}.{workflow_token(w)}.*" for q in queues for w in workflows] or [
        f"{TASK_PREFIX}.>"
    ]
    # At start a worker creates or updates the schedule of each workflow with ``cron=``
    # (key: the workflow's name made a token), so a worker naming its workflows gets only
    # theirs; and declares the events its workflows start on (keys begin with the event's
    # dotted name, which no wildcard but ``>`` can skip).
    schedules = [f"{kv}.{SCHEDULES_BUCKET}.{declared_schedule_id(w)}" for w in workflows] or [
        f"{kv}.{SCHEDULES_BUCKET}.>"
    ]
    schedules_stream = f"{api}.DIRECT.GET.{kv_stream(SCHEDULES_BUCKET)}"
    publish = [
        *_stream_info(api),
        f"{HISTORY_PREFIX}.*.*",
        _START_SUBJECTS,  # a child run's start
        f"{api}.CONSUMER.INFO.{HISTORY_STREAM}.*",  # ... and whether its workers take it
        *_direct_get(api, HISTORY_STREAM),
        *_direct_get(api, SIGNAL_STREAM),
        *_direct_get(api, kv_stream(LEASES_BUCKET)),
        *_direct_get(api, kv_stream(RATES_BUCKET)),
        *_direct_get(api, kv_stream(LIMITS_BUCKET)),
        *(f"{kv}.{bucket}.>" for bucket in _BUCKETS),
        f"{kv}.{TRIGGERS_BUCKET}.>",
        *schedules,
        *(f"{schedules_stream}.{s}" for s in _kv_keys(kv, schedules)),
        *tasks,  # a holder re-enqueues its run when it must look again
        # Asks another worker whether it holds a run whose task came here (else it takes
        # the run over, and a step of a run still held ran twice), or is alive at all (the
        # poison check), and whether its own identity is free at its start.
        "natflow.worker.*.ping",
        USER_INFO,
        # A parent's worker cancels or terminates its open children as the parent closes
        # (parent_close); it could append their run_terminated anyway (history.*).
        *(_control_subject(kind) for kind in CONTROLS),
        *_values(api, kv, write=True),
    ]
    for consumer in consumers:
        publish += [
            f"{api}.CONSUMER.CREATE.{TASK_STREAM}.{consumer}.>",
            f"{api}.CONSUMER.INFO.{TASK_STREAM}.{consumer}",
            f"{api}.CONSUMER.MSG.NEXT.{TASK_STREAM}.{consumer}",
            f"$JS.ACK.{TASK_STREAM}.{consumer}.>",
        ]
    for consumer in starts:  # new runs, taken from history
        publish += [
            f"{api}.CONSUMER.CREATE.{HISTORY_STREAM}.{consumer}.>",
            f"{api}.CONSUMER.MSG.NEXT.{HISTORY_STREAM}.{consumer}",
            f"$JS.ACK.{HISTORY_STREAM}.{consumer}.>",
        ]
    # Pings and wake-ups for this worker's identity; answering a ping needs allow_responses.
    return publish, ["_INBOX.>", "natflow.worker.*.*"], True


def _kv_keys(kv: str, subjects: list[str]) -> list[str]:
    # A direct get names the entry by its plain ``$KV.<bucket>.<key>`` subject, also through
    # a domain's API prefix.
    return [f"$KV.{s[len(kv) + 1 :]}" for s in subjects]


def _engine(api: str, kv: str, queues: list[str]) -> _Parts:
    publish = [
        f"{HISTORY_PREFIX}.>",  # the first event of a run a frontend asked for, and purges
        f"{RUNS_PREFIX}.>",
        f"{TASK_PREFIX}.>",
        f"{DEADLETTER_PREFIX}.>",
        f"{LIFECYCLE_PREFIX}.>",  # one message per run status change
        "natflow.worker.*.ping",  # is this worker alive?
        "natflow.worker.*.wake",  # a run it holds has something new
        f"{SIGNAL_PREFIX}.*.{CONTROL_TOKEN}.child",  # a closed child's outcome, to its parent
        *(f"{kv}.{bucket}.>" for bucket in _ALL_BUCKETS),
        *_values(api, kv, write=True),  # retention deletes values no run refers to any more
    ]
    for stream in _STREAMS:
        publish += [
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.STREAM.CREATE.{stream}",
            f"{api}.STREAM.UPDATE.{stream}",
            f"{api}.STREAM.PURGE.{stream}",  # retention: a closed run's messages
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.>",
            f"{api}.CONSUMER.LIST.{stream}",
            f"{api}.CONSUMER.DELETE.{stream}.>",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
            *_direct_get(api, stream),
            f"$JS.ACK.{stream}.>",  # its own consumers, and a dead worker's task (-NAK)
            f"$JS.FC.{stream}.>",
        ]
    # natflow queues pause|resume: the queues' task consumers and start consumers
    publish.append(f"{api}.CONSUMER.PAUSE.>")
    # Start requests from frontends, answered (allow_responses) to their inboxes.
    return publish, ["_INBOX.>", f"{START_PREFIX}.*"], True


_BUILDERS: Final = {
    "engine": _engine,
    "worker": _worker,
    "client": _client,
    "frontend": _frontend,
    "signaller": _signaller,
    "viewer": _viewer,
}
_CONTROL_ROLES: Final = {"client": CONTROLS, "frontend": CONTROLS}


def permissions_conf(domain: str | None = None) -> str:
    """nats.conf variables, one per role (``$NATFLOW_ENGINE``, ...), for ``include``."""
    header = (
        "# natflow's roles as NATS permissions; generated by `natflow auth --all`.\n"
        "# Use as `permissions: $NATFLOW_WORKER` in a user; see docs/security.md.\n"
    )
    blocks = [
        f"NATFLOW_{role.upper()} = {role_permissions(role, domain=domain).to_conf()}\n"
        for role in ROLES
    ]
    return header + "\n".join(blocks)
