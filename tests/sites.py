"""The sites layout in ops/sites started on loopback: a hub and two sites (leaf nodes with
JetStream domains of their own), the first site's link to the hub through a proxy a test
can cut. Shared by the site tests and scripts/site_cut.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from natflow import Client
from natflow_engine._server import EmbeddedServer, PortInUse

from tests.helpers import wait_for
from tests.links import Link
from tests.test_topologies import free_port, ports_in, render

SITES_DIR = Path(__file__).resolve().parent.parent / "ops" / "sites"
HUB_LEAF_PORT = 7422  # the hub's leafnode port in ops/sites/hub.conf


@dataclass
class Sites:
    hub: EmbeddedServer
    berlin: EmbeddedServer
    paris: EmbeddedServer
    link: Link  # berlin <-> hub


def _start(tmp: Path) -> Sites:
    sources = [SITES_DIR / f"{name}.conf" for name in ("hub", "berlin", "paris")]
    ports = ports_in(*sources)
    proxy = free_port()
    servers = []
    for src in sources:
        mapping = dict(ports)
        if src.stem == "berlin":  # berlin dials the proxy, which forwards to the hub
            mapping[HUB_LEAF_PORT] = proxy
        servers.append(
            EmbeddedServer(
                render(src, tmp / src.name, mapping, tmp / src.stem),
                store_dir=tmp / f"{src.stem}-log",
            )
        )
    sites = Sites(*servers, link=Link(proxy, ports[HUB_LEAF_PORT]))
    try:
        sites.hub.start()
        sites.link.up()
        sites.berlin.start()
        sites.paris.start()
    except BaseException:
        _stop(sites)
        raise
    return sites


def _stop(sites: Sites) -> None:
    sites.link.cut()
    for server in (sites.paris, sites.berlin, sites.hub):
        server.stop()


@contextmanager
def started_sites(tmp: Path) -> Iterator[Sites]:
    for attempt in range(3):
        try:
            sites = _start(tmp)
            break
        except PortInUse:  # a free port was taken by another process before a server bound it
            if attempt == 2:
                raise
    try:
        yield sites
    finally:
        _stop(sites)


async def linked(client: Client, domain: str, timeout: float = 20) -> None:
    """Wait until ``client`` reaches JetStream domain ``domain`` over the leaf link."""

    async def answers() -> bool:
        try:
            await client.connection.request(f"$JS.{domain}.API.INFO", b"", timeout=0.5)
        except Exception:  # the link is not (yet, again) up
            return False
        return True

    await wait_for(answers, timeout=timeout, what=f"the link to domain {domain}")


def port_of(url: str) -> int:
    match = re.search(r":(\d+)$", url)
    assert match
    return int(match[1])
