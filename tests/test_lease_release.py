"""A run's lease is gone once the run is let go, even when the heartbeat's renewal of it was
in flight at that moment. Before, the renewal either moved the revision on under the release
(whose delete, conditional on the revision it had read, then missed) or, landing after the
delete, wrote the lease anew: 44 of 2,000 bench runs left a lease behind for its time to live,
and the engine's reaper counted their stopped worker as a holder."""

from __future__ import annotations

import anyio
import pytest
from natflow import Client
from natflow._held import Held
from natflow._pulse import Pulse
from natflow._run_leases import RunLeases
from natflow_engine import Connection, Lease, Leases
from natflow_engine._kv import kv_stream
from natflow_engine._leases import LEASES_BUCKET
from natflow_engine._reader import reader
from natflow_engine._streams import ensure_streams
from nats.aio.msg import Msg

from tests.helpers import wait_for


class PausedRenewal(Leases):
    """Renews for real, but stops before sending (``first``) or after it landed, until told
    to go on."""

    def __init__(self, conn: Connection, *, first: bool) -> None:
        super().__init__(conn)
        self.first = first
        self.entered = anyio.Event()
        self.go = anyio.Event()

    async def renew(self, lease: Lease, revision: int) -> tuple[Lease, int] | None:
        if self.first:
            self.entered.set()
            await self.go.wait()
            return await super().renew(lease, revision)
        renewed = await super().renew(lease, revision)
        self.entered.set()
        await self.go.wait()
        return renewed


@pytest.mark.anyio
@pytest.mark.parametrize("renewal", ["lands before the release", "lands after the release"])
async def test_a_renewal_racing_the_release_leaves_no_lease_behind(
    client: Client, renewal: str
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    run_leases = RunLeases(Leases(conn), conn, "worker-1", ttl=30.0)
    held = Held(msg=Msg(conn.nc, subject="t", reply="_INBOX.test.wpi"), run_id="raced", queue="q")
    assert await run_leases.take(held)
    pulse = Pulse(conn, "worker-1", 10.0, lambda: [held], lambda _: True, lambda *_: None)
    renewing = PausedRenewal(conn, first=renewal == "lands after the release")
    async with anyio.create_task_group() as tg:
        tg.start_soon(pulse._beat, conn.nc, renewing, held)
        await renewing.entered.wait()
        await run_leases.release(held)  # the run ends while its renewal is out
        await conn.nc.flush()
        renewing.go.set()

    async def gone() -> bool:
        return await Leases(conn).get("raced") is None

    # Well under the lease's 31 s time to live: a lease left behind would still be there.
    await wait_for(gone, timeout=5.0, what="the released run's lease to be deleted")


async def test_a_released_lease_leaves_no_marker_past_a_second_or_two(client: Client) -> None:
    """Nothing watches the leases, so their delete markers only fill the reaper's reads of
    the bucket (every 30 s, and before it hands a dead worker's runs back): they last a
    second, not the minute other buckets' markers last for their watchers."""
    conn = client.connection
    await ensure_streams(conn)
    leases = Leases(conn)
    _, revision = await leases.acquire("ended", "worker-1", "q", "_INBOX.test.ack", ttl=30.0)
    await leases.release("ended", revision)

    async def stored() -> list[object]:
        page = await reader(conn).read_all(
            kv_stream(LEASES_BUCKET), f"$KV.{LEASES_BUCKET}.ended", headers=True
        )
        return list(page.messages)

    async def no_marker() -> bool:
        return not await stored()

    await wait_for(no_marker, timeout=10.0, what="the lease's delete marker to expire")
