"""The engine's dispatcher takes a backlog in windows, never more than it can process.

A dispatcher that asked for messages as fast as they arrived, rather than as fast as it
processed them, would hold thousands unacknowledged; under load those outlive the 30 s ack
deadline, come back as duplicates and the dispatcher falls ever further behind.
"""

from __future__ import annotations

import anyio
from natflow import Client
from natflow_engine._engine import _DISPATCH_WINDOW
from natflow_engine._server import EmbeddedServer
from natflow_engine._start_watch import MAX_WATCHED
from natflow_engine._streams import DISPATCHER, HISTORY_STREAM

from tests.helpers import running_engine


async def test_a_backlog_is_taken_a_window_at_a_time(
    client: Client, nats_server: EmbeddedServer
) -> None:
    limiter = anyio.CapacityLimiter(32)

    async def start(i: int) -> None:
        async with limiter:
            await client.start("nobody-serves-this", i, run_id=f"backlog-{i}")

    async with anyio.create_task_group() as tg:
        for i in range(700):
            tg.start_soon(start, i)
    most = 0
    async with running_engine(nats_server.url):
        with anyio.fail_after(60):
            while True:
                info = await client.connection.jsm.consumer_info(HISTORY_STREAM, DISPATCHER)
                most = max(most, info.num_ack_pending)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                await anyio.sleep(0.01)
    # Starts are held unacknowledged for their grace (at most MAX_WATCHED of them), so the
    # dispatcher need not check each start's task while its worker takes the run.
    assert most <= 2 * _DISPATCH_WINDOW + MAX_WATCHED
    assert info.num_redelivered == 0
