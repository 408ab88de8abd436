"""Removes the bench's runs, tasks and consumers from a server the bench does not own
(``--url``): best effort, once the measurements are done."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from natflow_engine import (
    HISTORY_STREAM,
    RUNS_STREAM,
    TASK_PREFIX,
    TASK_STREAM,
    history_subject,
    queue_consumer,
    runs_subject,
    start_consumer,
)

from ._replay import REPLAY_QUEUE
from ._session import BenchSession
from ._workflows import BENCH_QUEUE

log = logging.getLogger("natflow.bench")


async def remove_bench_runs(bench: BenchSession) -> None:
    jsm = bench.client.connection.jsm
    with _quietly():
        for queue in (BENCH_QUEUE, REPLAY_QUEUE):
            await jsm.purge_stream(TASK_STREAM, subject=f"{TASK_PREFIX}.{queue}.>")
    with _quietly():
        for consumer in await jsm.consumers_info(TASK_STREAM):
            if consumer.name.startswith(queue_consumer(BENCH_QUEUE, "x")[:-1]):
                await jsm.delete_consumer(TASK_STREAM, consumer.name)
    with _quietly():
        for consumer in await jsm.consumers_info(HISTORY_STREAM):
            if consumer.name.startswith(start_consumer(BENCH_QUEUE, "x")[:-1]):
                await jsm.delete_consumer(HISTORY_STREAM, consumer.name)
    for run_id in bench.run_ids:
        with _quietly():
            await jsm.purge_stream(HISTORY_STREAM, subject=history_subject(run_id))
            await jsm.purge_stream(RUNS_STREAM, subject=runs_subject(run_id))


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # cleanup is best effort; the measurements are done
        log.debug("bench cleanup: %s", exc)
