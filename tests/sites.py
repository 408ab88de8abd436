"""The sites layout in ops/sites started on loopback: a hub and two sites (leaf nodes with
JetStream domains of their own), the first site's link to the hub through a proxy a test
can cut. Shared by the site tests and scripts/site_cut.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from natflow import Client
from natflow_engine._server import EmbeddedServer, PortInUse

from tests.helpers import wait_for
from tests.links import Link, free_port
from tests.test_topologies import ports_in, render

SITES_DIR = Path(__file__).resolve().parent.parent / "ops" / "sites"
HUB_LEAF_PORT = 7422  # the hub's leafnode port in ops/sites/hub.conf


@dataclass
class Sites:
    hub: EmbeddedServer  # the hub, or the hub cluster's node n1 (the one berlin's link reaches)
    berlin: EmbeddedServer
    paris: EmbeddedServer
    link: Link  # berlin <-> hub
    more_hub_nodes: list[EmbeddedServer] = field(default_factory=list)  # n2, n3 of a cluster


def _start(tmp: Path, hub_cluster: bool) -> Sites:
    hubs = (
        [SITES_DIR / "hub-cluster" / f"n{i}.conf" for i in (1, 2, 3)]
        if hub_cluster
        else [SITES_DIR / "hub.conf"]
    )
    sources = [*hubs, SITES_DIR / "berlin.conf", SITES_DIR / "paris.conf"]
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
    *hub_nodes, berlin, paris = servers
    sites = Sites(hub_nodes[0], berlin, paris, Link(proxy, ports[HUB_LEAF_PORT]), hub_nodes[1:])
    try:
        for node in hub_nodes:
            node.start()
        sites.link.up()
        sites.berlin.start()
        sites.paris.start()
    except BaseException:
        _stop(sites)
        raise
    return sites


def _stop(sites: Sites) -> None:
    sites.link.cut()
    for server in (sites.paris, sites.berlin, sites.hub, *sites.more_hub_nodes):
        server.stop()


@contextmanager
def started_sites(tmp: Path, *, hub_cluster: bool = False) -> Iterator[Sites]:
    """ops/sites on loopback: the single hub, or (``hub_cluster``) the 3-node hub cluster."""
    for attempt in range(3):
        try:
            sites = _start(tmp, hub_cluster)
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
