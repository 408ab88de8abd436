"""Where a process is connected, and whether "no responders" from a worker proves it gone.

On one server or within one cluster, a ping that meets "no responders" means the worker's
connection closed: the reaper hands its runs back at once. A worker connected to another
server (a leaf node at an edge site) is different: when the link between that server and this
one is cut, every subscription behind it disappears from here, so a live worker also looks
gone. Such a worker keeps its runs until its lease lapses (the task's ack deadline moves them
then), unless its server is seen reachable: its JetStream domain answers, or another worker
registered on it does. Only then does "no responders" mean the worker itself is gone.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Place(msgspec.Struct, frozen=True):
    """The server a connection is on: its name, its cluster and JetStream domain ("" if none)."""

    server: str = ""
    cluster: str = ""
    domain: str = ""


def place_of(nc: Any) -> Place:
    """Where ``nc`` (a nats-py client) is connected now, from the server's INFO."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return Place(
        server=str(info.get("server_name") or ""),
        cluster=str(info.get("cluster") or ""),
        domain=str(info.get("domain") or ""),
    )


def is_near(there: Place, here: Place) -> bool:
    """Whether a process at ``there`` is reached from ``here`` without crossing a leaf link or
    a gateway: the same server, or servers of one cluster. Unknown places count as near (the
    way workers were treated before they said where they were)."""
    if not there.server or not here.server or there.server == here.server:
        return True
    return bool(there.cluster) and there.cluster == here.cluster
