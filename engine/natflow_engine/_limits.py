"""Concurrency slots in KV: how many runs of a limit (and key) execute now, and who waits.

Bucket ``natflow_limits`` holds three kinds of entry per limit and key (``<l>`` and ``<k>``
are short hashes of the limit's id and of the key's value; the readable names are in the
values):

* ``s.<l>.<k>.<n>``: slot ``n`` (``0 <= n < max``), naming the run that holds it and the
  worker running it. A slot is taken by a conditional create (expected last revision =
  the subject's last one, a delete marker's included), so two takers of slot ``n`` never
  both win and a limit never has more than ``max`` holders, whatever the race.
* ``w.<l>.<k>.<run_id>``: a run that waits for a slot of that limit and key, with its
  priority, the time it was started, and its fairness key. The engine's limit service
  (``_limit_service``) watches the bucket and grants each freed slot to the best waiter:
  it writes the slot naming the run (``worker=""``, state ``granted``), drops the waiter
  entry and enqueues the run's task.
* ``q.<l>.<k>``: present while runs wait in line (the engine sets and clears it when the
  wait list fills or empties), so a worker that finds a free slot can tell in the same
  read, however long the line, that it must leave the slot to them.

A run waits for at most one limit at a time, so the last message on ``w.*.*.<run_id>``
says whether (and for what) it waits: :func:`waiting_for` is one direct get.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

import msgspec
from nats.aio.msg import Msg

from ._connection import Connection, JetStreamError, NoResponders
from ._errors import PermissionDenied
from ._kv import KV_OPERATION, kv_delete_nowait, kv_put, kv_stream
from ._reader import reader
from ._state import RunInfo
from ._streams import SIGNAL_STREAM, signal_subject
from ._undecodable import UNDECODABLE

LIMITS_BUCKET: Final = "natflow_limits"
_PREFIX: Final = f"$KV.{LIMITS_BUCKET}."
_MULTI_LAST_MAX: Final = 1024  # the server refuses a multi_last over more subjects (413)
MAX_SLOTS: Final = 1000  # so one read of a group's slots fits one multi_last

SlotState = Literal["held", "granted", "kept"]


class Slot(msgspec.Struct, kw_only=True):
    """Who holds slot ``n`` of a limit and key.

    ``state``: ``held`` (a worker runs the run), ``granted`` (given to a waiting run by
    the engine; its task is on the way), ``kept`` (the run waits for a timer or signal and
    its limit keeps the slot while it waits: ``hold_while_waiting``).
    """

    v: int = 1
    run_id: str
    worker: str = ""
    state: SlotState = "held"
    limit: str
    key: str = ""
    label: str
    max: int
    workflow: str
    queue: str
    at: datetime


class Waiter(msgspec.Struct, kw_only=True):
    """A run waiting for a slot: granted in order of priority (higher first), then
    round-robin over ``fair`` keys, then by ``since`` (when the run was started)."""

    v: int = 1
    run_id: str
    workflow: str
    queue: str
    limit: str
    key: str = ""
    label: str
    max: int
    priority: int = 0
    since: datetime
    fair: str = ""
    at: datetime


_slot_encoder = msgspec.json.Encoder()
_slot_decoder = msgspec.json.Decoder(Slot)
_waiter_decoder = msgspec.json.Decoder(Waiter)


def encode_entry(entry: Slot | Waiter) -> bytes:
    return _slot_encoder.encode(entry)


def decode_slot(data: bytes) -> Slot:
    return _slot_decoder.decode(data)


def decode_waiter(data: bytes) -> Waiter:
    return _waiter_decoder.decode(data)


def digest(text: str) -> str:
    """A short hash that is a KV key token whatever ``text`` holds."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Group:
    """One limit and one key value: the unit that has ``max`` slots."""

    limit: str  # the limit's id, e.g. "workflow:order/customer"
    key: str  # the key's value ("" for a limit without a key)

    @property
    def token(self) -> str:
        return f"{digest(self.limit)}.{digest(self.key)}"

    def slot_key(self, n: int) -> str:
        return f"s.{self.token}.{n}"

    def waiter_key(self, run_id: str) -> str:
        return f"w.{self.token}.{run_id}"

    @property
    def queue_key(self) -> str:
        return f"q.{self.token}"


@dataclass
class Slots:
    """The slots of a group as read: live holders, and each subject's last revision (a
    delete marker's too), which a conditional create must expect."""

    held: dict[int, tuple[Slot, int]] = field(default_factory=dict)
    revisions: dict[int, int] = field(default_factory=dict)

    def free(self, max_: int) -> list[int]:
        return [n for n in range(max_) if n not in self.held]

    def of_run(self, run_id: str) -> list[tuple[int, Slot, int]]:
        return [(n, slot, rev) for n, (slot, rev) in self.held.items() if slot.run_id == run_id]


def _is_deleted(msg: Msg) -> bool:
    return (msg.headers or {}).get(KV_OPERATION) in ("DEL", "PURGE") or not msg.data


@dataclass
class View:
    """A group as one read saw it: its slots, and whether runs wait in line."""

    slots: Slots
    queued: bool  # the engine's mark that the group's wait list is not empty


def _subject(msg: Msg) -> str:
    return (msg.headers or {}).get("Nats-Subject", msg.subject)


async def read_slots(conn: Connection, group: Group) -> Slots:
    """Every slot of ``group`` in one batch direct get."""
    return (await read_group(conn, group)).slots


async def read_group(conn: Connection, group: Group) -> View:
    """The group's slots and its queue mark in one batch direct get (at most ``max`` + 1
    entries, however many runs wait)."""
    view = View(Slots(), False)
    subjects = [f"{_PREFIX}s.{group.token}.*", f"{_PREFIX}{group.queue_key}"]
    try:
        page = await reader(conn).read_last(kv_stream(LIMITS_BUCKET), subjects, _MULTI_LAST_MAX)
    except NoResponders:  # no bucket yet: every slot is free
        return view
    for msg in page.messages:
        subject = _subject(msg)
        if not subject.startswith(f"{_PREFIX}s."):
            view.queued = not _is_deleted(msg)
            continue
        n = int(subject.rsplit(".", 1)[-1])
        revision = int((msg.headers or {}).get("Nats-Sequence", "0"))
        view.slots.revisions[n] = revision
        if _is_deleted(msg):
            continue
        try:
            view.slots.held[n] = (decode_slot(msg.data), revision)
        except UNDECODABLE:
            continue  # not ours: a slot never reused until someone deletes it
    return view


async def mark_queued(conn: Connection, group: Group, queued: bool) -> None:
    """Set or clear the group's queue mark (the engine keeps it: runs wait in line, so a
    worker that finds a free slot leaves it to them)."""
    if queued:
        await kv_put(conn, LIMITS_BUCKET, group.queue_key, b'{"queued":true}')
    else:
        await kv_delete_nowait(conn, LIMITS_BUCKET, group.queue_key)


async def put_slot(conn: Connection, group: Group, n: int, slot: Slot, revision: int) -> int | None:
    """Write slot ``n`` if its subject is still at ``revision``; its new revision, or None
    when someone else wrote it first."""
    try:
        return await kv_put(
            conn, LIMITS_BUCKET, group.slot_key(n), encode_entry(slot), revision=revision
        )
    except JetStreamError as exc:
        if exc.wrong_last_sequence:
            return None
        raise


async def free_slot(conn: Connection, group: Group, n: int, revision: int) -> None:
    """Delete slot ``n`` if it is still at ``revision`` (else someone took it over)."""
    await kv_delete_nowait(conn, LIMITS_BUCKET, group.slot_key(n), revision=revision)


async def park(conn: Connection, group: Group, waiter: Waiter) -> None:
    """Put the run on the group's wait list (the engine grants it a slot in turn)."""
    await kv_put(conn, LIMITS_BUCKET, group.waiter_key(waiter.run_id), encode_entry(waiter))


async def unpark(conn: Connection, group: Group, run_id: str) -> None:
    await kv_delete_nowait(conn, LIMITS_BUCKET, group.waiter_key(run_id))


async def waiting_for(conn: Connection, run_id: str) -> Waiter | None:
    """The slot the run waits for now, or None (one direct get: the last message of any of
    its waiter entries)."""
    try:
        msg = await conn.request(
            f"{conn.api}.DIRECT.GET.{kv_stream(LIMITS_BUCKET)}.{_PREFIX}w.*.*.{run_id}", b""
        )
    except NoResponders:
        return None
    headers = msg.headers or {}
    if "Status" in headers or _is_deleted(msg):
        return None
    try:
        return decode_waiter(msg.data)
    except UNDECODABLE:
        return None


async def explain_all(conn: Connection, infos: Sequence[RunInfo]) -> None:
    """Each open run on a limit's wait list: ``current`` names the limit and its usage and
    ``status`` is ``pending`` (it runs again once it gets its slot). One read of the open
    runs' wait list entries (the index, which folds events, does not know a run waits for a
    slot), and one of each limit's slots. Says nothing to a connection that may not read the
    bucket (a role from before limits existed)."""
    ids = {info.run_id for info in infos if not info.is_closed}
    if not ids:
        return
    subjects = [f"{_PREFIX}w.*.*.{run_id}" for run_id in sorted(ids)]
    try:
        # A run that waited for several limits in turn has an entry (or its delete
        # marker) for each (its workflow's limits, at most one key each); the newest of
        # them says whether it waits now.
        found = await reader(conn).read_last_each(kv_stream(LIMITS_BUCKET), subjects, 16)
    except (NoResponders, PermissionDenied):  # no limits yet, or a role that may not read
        return
    newest: dict[str, tuple[int, Msg]] = {}
    for msg in found:
        headers = msg.headers or {}
        run_id = headers.get("Nats-Subject", msg.subject).rsplit(".", 1)[-1]
        seq = int(headers.get("Nats-Sequence", "0"))
        if run_id in ids and seq > newest.get(run_id, (0, msg))[0]:
            newest[run_id] = (seq, msg)
    usages: dict[tuple[str, str], str] = {}
    for info in infos:
        entry = newest.get(info.run_id)
        if entry is None or info.is_closed or _is_deleted(entry[1]):
            continue
        try:
            waiter = decode_waiter(entry[1].data)
        except UNDECODABLE:
            continue
        group = (waiter.limit, waiter.key)
        if group not in usages:
            usages[group] = await usage(conn, waiter)
        info.current = usages[group]
        if info.status in ("running", "sleeping", "waiting"):
            info.status = "pending"


async def usage(conn: Connection, waiter: Waiter) -> str:
    """``"waiting for a slot of limit customer=acme 3/3"``: what a run view shows."""
    slots = await read_slots(conn, Group(waiter.limit, waiter.key))
    return f"waiting for a slot of limit {waiter.label} {len(slots.held)}/{waiter.max}"


async def stopping(conn: Connection, run_id: str) -> bool:
    """Whether the run was asked to cancel or terminate, or (last) to pause (one batch direct
    get): such a run goes on without waiting for a slot, so a queued run can be stopped at
    once, and a paused one shows it is paused rather than waiting its turn (it waits in line
    again once resumed)."""
    controls = ("$cancel", "$terminate", "$pause", "$resume")
    subjects = [signal_subject(run_id, control) for control in controls]
    try:
        page = await reader(conn).read_last(SIGNAL_STREAM, subjects)
    except NoResponders:
        return False
    last: dict[str, int] = {}
    for msg in page.messages:
        headers = msg.headers or {}
        control = headers.get("Nats-Subject", msg.subject).rsplit(".", 1)[-1]
        last[control] = int(headers.get("Nats-Sequence", "0"))
    if "cancel" in last or "terminate" in last:  # natflow.signal.<run>.$control.<kind>
        return True
    return last.get("pause", 0) > last.get("resume", 0)


async def explain(conn: Connection, info: RunInfo) -> None:
    """:func:`explain_all` for one run."""
    await explain_all(conn, [info])
