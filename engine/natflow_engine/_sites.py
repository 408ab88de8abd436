"""Sites: the hub's view of runs homed at sites, and the hub's commands for them.

A site is a leaf node with a JetStream domain of its own that holds its runs (ops/sites).
Two things cross the link, both by JetStream sourcing between domains, so both survive a cut
and catch up after it by themselves:

* **Site -> hub, the run index.** The hub's ``NATFLOW_SITE_RUNS`` sources each site's
  ``NATFLOW_RUNS`` (``$JS.<site>.API``), its subjects moved to
  ``natflow.siteruns.<site>.<run_id>``, one message (the latest summary) per run. ``list``
  and ``describe`` at the hub read it beside the hub's own index.
* **Hub -> site, commands.** Starts and signals (cancel is the ``$cancel`` signal) for a site's
  runs are stored at the hub in ``NATFLOW_OUTBOX`` on ``natflow.outbox.<site>.start.<run_id>``
  and ``natflow.outbox.<site>.signal.<run_id>.<name>``, accepted while the link is down. Each
  site's ``NATFLOW_INBOX`` sources its own subjects from there (``$JS.hub.API``), and the
  site's engine applies them in order: a start by run id, a signal by its id, so a command
  delivered twice takes effect once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any, Final

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from ._connection import ERR_STREAM_NAME_IN_USE, TRANSIENT, Connection, quietly, retrying
from ._errors import InvalidInput, NatflowError
from ._names import check_run_id, check_token
from ._runs import Runs
from ._signals import send as send_signal
from ._site_index import SITE_RUNS_PREFIX, SITE_RUNS_STREAM
from ._start_service import StartRequest
from ._streams import replicas as stream_replicas
from ._undecodable import UNDECODABLE
from ._values import INLINE_BYTES

log = logging.getLogger("natflow.sites")

OUTBOX_STREAM: Final = "NATFLOW_OUTBOX"
OUTBOX_PREFIX: Final = "natflow.outbox"
INBOX_STREAM: Final = "NATFLOW_INBOX"
INBOX_CONSUMER: Final = "natflow-site-inbox"
SIGNAL_ID_HEADER: Final = "Natflow-Signal-Id"
# How long the hub keeps a command no site has read yet, and the window in which the outbox
# drops a repeated publish of one command (a client retry).
OUTBOX_MAX_AGE: Final = 30 * 86400.0
OUTBOX_DUPLICATE_WINDOW: Final = 3600.0


class _Reply(msgspec.Struct):
    error: dict[str, Any] | None = None
    config: dict[str, Any] | None = None


# The outbox's stream metadata names the sites the hub's engine serves (--sites), so a
# command for a site no engine serves is refused instead of stored for no one to read.
SITES_METADATA: Final = "natflow_sites"


def check_site(site: str) -> str:
    """A site's name is its JetStream domain, and a subject token."""
    return check_token("site", site)


async def upsert_stream(conn: Connection, config: api.StreamConfig) -> None:
    """Create the stream, or update it to ``config``."""
    try:
        await conn.admin(f"stream {config.name}", lambda: conn.jsm.add_stream(config))
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != ERR_STREAM_NAME_IN_USE:
            raise NatflowError(f"stream {config.name}: {exc.description}") from None
        try:
            await conn.admin(f"stream {config.name}", lambda: conn.jsm.update_stream(config))
        except nats.js.errors.APIError as exc:
            raise NatflowError(f"stream {config.name}: {exc.description}") from None


def site_runs_config(sites: list[str], replicas: int | None = None) -> api.StreamConfig:
    """``NATFLOW_SITE_RUNS`` sourcing the run index of each of ``sites``. Its own subject
    (which nothing publishes to) keeps it valid while a source is taken out (_site_links)."""
    sources = [
        api.StreamSource(
            name="NATFLOW_RUNS",
            external=api.ExternalStream(api=f"$JS.{site}.API"),
            subject_transforms=[
                api.SubjectTransform(src="natflow.runs.>", dest=f"{SITE_RUNS_PREFIX}.{site}.>")
            ],
        )
        for site in sorted(set(sites))
    ]
    return api.StreamConfig(
        name=SITE_RUNS_STREAM,
        subjects=["natflow.sites.none"],
        sources=sources,
        storage=api.StorageType.FILE,
        num_replicas=replicas or stream_replicas(),
        max_msgs_per_subject=1,
        allow_direct=True,
    )


def inbox_config(
    site: str, hub_domain: str | None, replicas: int | None = None
) -> api.StreamConfig:
    """``NATFLOW_INBOX`` at ``site``, sourcing its commands from the hub's outbox (none when
    ``hub_domain`` is None: its own subject keeps it valid then)."""
    sources = [
        api.StreamSource(
            name=OUTBOX_STREAM,
            filter_subject=f"{OUTBOX_PREFIX}.{site}.>",
            external=api.ExternalStream(api=f"$JS.{hub_domain}.API"),
        )
    ]
    return api.StreamConfig(
        name=INBOX_STREAM,
        subjects=[f"natflow.inbox.{site}"],
        sources=sources if hub_domain is not None else [],
        storage=api.StorageType.FILE,
        num_replicas=replicas or stream_replicas(),
        max_age=OUTBOX_MAX_AGE,
    )


async def ensure_hub(conn: Connection, sites: list[str], replicas: int | None = None) -> None:
    """At the hub: the outbox, and ``NATFLOW_SITE_RUNS`` sourcing each site's run index."""
    for site in sites:
        check_site(site)
    await upsert_stream(
        conn,
        api.StreamConfig(
            name=OUTBOX_STREAM,
            subjects=[f"{OUTBOX_PREFIX}.>"],
            storage=api.StorageType.FILE,
            num_replicas=replicas or stream_replicas(),
            max_age=OUTBOX_MAX_AGE,
            duplicate_window=OUTBOX_DUPLICATE_WINDOW,
            metadata={SITES_METADATA: ",".join(sorted(set(sites)))},
        ),
    )
    if sites:
        await upsert_stream(conn, site_runs_config(sites, replicas))


async def ensure_site(
    conn: Connection, site: str, hub_domain: str, replicas: int | None = None
) -> None:
    """At a site: ``NATFLOW_INBOX``, sourcing this site's commands from the hub's outbox."""
    await upsert_stream(conn, inbox_config(check_site(site), hub_domain, replicas))


# -- hub -> site commands -------------------------------------------------------------------


async def check_outbox(conn: Connection, site: str | None = None) -> None:
    """Fail clearly unless this server (a hub) has the outbox the hub's engine creates and
    (given ``site``) its engine serves that site."""
    msg = await conn.request(f"{conn.api}.STREAM.INFO.{OUTBOX_STREAM}", b"", timeout=5.0)
    reply = msgspec.json.decode(msg.data, type=_Reply)
    if reply.error is not None:
        raise NatflowError(
            f"this server has no {OUTBOX_STREAM} ({reply.error.get('description', '?')}): "
            "commands for a site's runs are stored at the hub, whose engine creates it when "
            "it runs with --sites (NATFLOW_SITES); connect to the hub, or start it so"
        )
    listed = ((reply.config or {}).get("metadata") or {}).get(SITES_METADATA)
    if site is None or listed is None:  # an outbox made before the hub recorded its sites
        return
    served = [name for name in str(listed).split(",") if name]
    if site not in served:
        raise InvalidInput(
            f"site {site!r} is not served by this hub (its engine runs with --sites "
            f"{','.join(served) or '(none)'}): a command for it would wait for a site that "
            f"never reads it; check the name, or add the site to the hub engine's --sites "
            f"(NATFLOW_SITES)"
        )


async def _store(conn: Connection, subject: str, data: bytes, msg_id: str, **headers: str) -> None:
    await retrying(
        f"storing a command on {subject}",
        lambda: conn.publish(subject, data, {"Nats-Msg-Id": msg_id, **headers}),
    )


async def command_start(
    conn: Connection,
    site: str,
    workflow: str,
    queue: str,
    input_json: bytes,
    run_id: str,
    not_before: datetime | None = None,
) -> None:
    """Store at the hub a start of ``run_id`` at ``site``; it takes effect once there."""
    check_site(site)
    check_run_id(run_id)
    body = msgspec.json.encode(
        StartRequest(
            workflow=workflow, queue=queue, input=msgspec.Raw(input_json), not_before=not_before
        )
    )
    subject = f"{OUTBOX_PREFIX}.{site}.start.{run_id}"
    await _store(conn, subject, body, f"start:{site}:{run_id}")


async def command_signal(
    conn: Connection,
    site: str,
    run_id: str,
    name: str,
    payload: bytes,
    signal_id: str | None = None,
) -> None:
    """Store at the hub signal ``name`` for ``run_id`` at ``site`` (``$cancel`` cancels)."""
    check_site(site)
    check_run_id(run_id)
    signal_id = signal_id or f"hub-{uuid.uuid4().hex}"
    check_token("signal_id", signal_id)
    subject = f"{OUTBOX_PREFIX}.{site}.signal.{run_id}.{name}"
    msg_id = f"signal:{site}:{run_id}:{name}:{signal_id}"
    await _store(conn, subject, payload, msg_id, **{SIGNAL_ID_HEADER: signal_id})


async def site_start_stored(conn: Connection, run_id: str) -> bool:
    """Whether this server (a hub) holds a start of ``run_id`` for a site: the run exists
    there, or will once the site reads the command, before the hub has a copy of it."""
    body = msgspec.json.encode({"last_by_subj": f"{OUTBOX_PREFIX}.*.start.{run_id}"})
    try:
        msg = await conn.request(f"{conn.api}.STREAM.MSG.GET.{OUTBOX_STREAM}", body, timeout=2.0)
        reply = msgspec.json.decode(msg.data, type=_Reply)
    except (NatflowError, *UNDECODABLE):  # no outbox here (not a hub), or unreadable: no
        return False
    return reply.error is None


async def command_for_site(
    conn: Connection,
    site: str,
    run_id: str,
    name: str,
    payload: bytes,
    signal_id: str | None = None,
) -> None:
    """A signal, cancel, terminate, pause or resume (``name``) for a site's run, stored at
    the hub for the site: checked there first (an outbox serving the site; a payload small
    enough to travel inline, since the hub's value store is not the site's)."""
    if len(payload) > INLINE_BYTES:
        raise InvalidInput(
            f"the payload for run {run_id!r} at site {site!r} is {len(payload)} bytes; a "
            f"command for a site carries it inline, at most {INLINE_BYTES} bytes"
        )
    await check_outbox(conn, site)
    await command_signal(conn, site, run_id, name, payload, signal_id)


class SiteInbox:
    """At a site's engine: applies the hub's commands for this site, each once."""

    def __init__(self, conn: Connection, site: str, hub_domain: str) -> None:
        self._conn = conn
        self.site = check_site(site)
        self._hub = hub_domain
        self._runs = Runs(conn)
        self.applied = 0

    async def run(self) -> None:
        await ensure_site(self._conn, self.site, self._hub)
        sub = await self._conn.js.pull_subscribe(
            f"{OUTBOX_PREFIX}.{self.site}.>",
            durable=INBOX_CONSUMER,
            stream=INBOX_STREAM,
            # One command at a time, across engine replicas too: a signal must not overtake the
            # start of its run, nor a redelivered command the ones after it.
            config=api.ConsumerConfig(ack_wait=30.0, max_ack_pending=1),
        )
        log.info("site %s: applying the hub's commands from %s", self.site, INBOX_STREAM)
        try:
            while True:
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except nats.errors.Error as exc:
                    log.debug("inbox fetch failed: %s", exc)
                    await anyio.sleep(0.5)
                    continue
                for msg in msgs:
                    try:
                        await self._apply(msg)
                    except (NatflowError, nats.errors.Error, OSError) as exc:
                        # Not acknowledged: the command comes back after the ack deadline.
                        log.warning("site %s: command %s: %s", self.site, msg.subject, exc)
        finally:
            # Shielded: a pull left behind would hold up the connection's drain on close.
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is going away
                    log.debug("unsubscribe failed", exc_info=True)

    async def _apply(self, msg: Any) -> None:
        parts = msg.subject.split(".", 5)
        try:
            if len(parts) == 5 and parts[3] == "start":
                request = msgspec.json.decode(msg.data, type=StartRequest)
                await self._runs.start(
                    request.workflow,
                    request.queue,
                    bytes(request.input),
                    parts[4],
                    not_before=request.not_before,
                )
            elif len(parts) == 6 and parts[3] == "signal":
                signal_id = (msg.headers or {}).get(SIGNAL_ID_HEADER)
                await send_signal(self._conn, parts[4], parts[5], msg.data, signal_id)
            else:
                raise InvalidInput(f"not a command subject: {msg.subject!r}")
        except TRANSIENT as exc:
            log.warning("site %s: command %s not applied yet: %s", self.site, msg.subject, exc)
            await quietly(msg.nak(delay=1.0))
            return
        except (NatflowError, *UNDECODABLE, msgspec.ValidationError) as exc:
            # A command that cannot take effect (unknown workflow, bad input): said, dropped.
            log.error("site %s: command %s refused: %s", self.site, msg.subject, exc)
        self.applied += 1
        await quietly(msg.ack())
