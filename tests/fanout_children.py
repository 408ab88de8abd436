"""Measure a fan-out of child runs from one parent (a script, not a test).

``python -m tests.fanout_children [COUNT]`` starts an embedded nats-server, the engine and one
worker in this process, runs ``fanout(COUNT)`` (COUNT children of ``kid`` at once through
``ctx.parallel``) and prints the wall time and the parent's history length.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from natflow import Client
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_engine, running_worker
from tests.workflows_children import WORKFLOWS, fanout


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(store_dir=Path(tmp) / "nats")
        server.start()
        try:
            async with running_engine(server.url):
                client = await Client.connect(server.url)
                async with client, running_worker(client, WORKFLOWS, max_concurrent_runs=200):
                    began = time.monotonic()
                    handle = await client.start(fanout, count, run_id="fanout")
                    result = await handle.result(timeout=600)
                    took = time.monotonic() - began
                    history = await client.history("fanout")
                    kinds = Counter(e.__struct_config__.tag for e in history)
                    assert result == sum(10 * i for i in range(count)), result
                    print(
                        f"fan-out of {count} children: {took:.1f} s wall, parent history "
                        f"{len(history)} events ({dict(kinds)})"
                    )
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
