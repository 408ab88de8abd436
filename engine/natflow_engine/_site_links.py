"""Catching up at once when a link between domains returns.

JetStream sourcing resumes by itself after a cut, but on its own clock: the server checks a
source's health every 10 s and, after failed attempts, waits 10 s more per failure (up to
2 minutes) before it tries again, so after a 30 s cut the hub's copy of a site's runs lags
for tens of seconds, after a long cut for up to two minutes. An engine that serves a link
(the hub's, for each site; a site's, for the hub) probes the other domain every second and,
the moment it answers again after not answering, takes that domain's source out of the
stream and puts it back: the server then sets the source up at once, from the sequence after
the last message it holds from that source, so nothing is copied twice or skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import anyio
import nats.errors
from nats.js import api

from ._connection import Connection
from ._errors import NatflowError
from ._sites import inbox_config, site_runs_config, upsert_stream

log = logging.getLogger("natflow.sites")

PROBE_EVERY: Final = 1.0


async def domain_answers(conn: Connection, domain: str, timeout: float = 1.0) -> bool:
    """Whether JetStream domain ``domain`` is reachable from this connection now."""
    try:
        await conn.request(f"$JS.{domain}.API.INFO", b"", timeout=timeout)
    except NatflowError:
        return False
    return True


class LinkWatch:
    """Probes ``domains``; when one answers again after a cut, re-adds its source.

    ``config(without)`` is the stream's configuration with the source of domain ``without``
    taken out (None: every source in).
    """

    def __init__(
        self,
        conn: Connection,
        domains: list[str],
        config: Callable[[str | None], api.StreamConfig],
        every: float = PROBE_EVERY,
    ) -> None:
        self._conn = conn
        self._domains = domains
        self._config = config
        self._every = every
        self.down_since: dict[str, float] = {}
        self.resyncs = 0

    async def run(self) -> None:
        while True:
            for domain in self._domains:
                await self.probe(domain)
            await anyio.sleep(self._every)

    async def probe(self, domain: str) -> None:
        if not await domain_answers(self._conn, domain):
            if domain not in self.down_since:
                self.down_since[domain] = time.monotonic()
                log.warning("JetStream domain %s does not answer (a cut link?)", domain)
            return
        since = self.down_since.pop(domain, None)
        if since is None:
            return
        log.info(
            "JetStream domain %s answers again after %.1f s; catching up",
            domain,
            time.monotonic() - since,
        )
        try:
            await upsert_stream(self._conn, self._config(domain))
            await upsert_stream(self._conn, self._config(None))
        except (NatflowError, nats.errors.Error) as exc:  # the server's retries catch up later
            log.warning("could not restart the source from %s: %s", domain, exc)
            return
        self.resyncs += 1


def site_links(
    conn: Connection, sites: list[str], site: str | None, hub_domain: str
) -> LinkWatch | None:
    """The watch an engine runs: at a hub over its sites, at a site over the hub."""
    if sites:
        return LinkWatch(
            conn, sites, lambda without: site_runs_config([s for s in sites if s != without])
        )
    if site:
        return LinkWatch(
            conn,
            [hub_domain],
            lambda without: inbox_config(site, None if without else hub_domain),
        )
    return None
