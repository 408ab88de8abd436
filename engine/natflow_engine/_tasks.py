"""The task queue: "this run has something to do", one pending task per run.

A task is a message on ``natflow.task.<queue>.<workflow>.<run_id>`` in the ``NATFLOW_TASKS``
work-queue stream, read through one consumer per queue and workflow (so a worker is handed
only runs it can run, with no bouncing between workers of one queue that serve different
workflows). The stream keeps at most one message per subject, so a wake-up that finds a task
pending or in flight is refused (error 10077) and costs nothing: the holder re-checks the
run's history after it acknowledges, which closes the lost-wake-up race (NATS.md §8).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import msgspec
import nats.errors
from nats.js import api

from ._connection import ERR_MAX_MSGS_PER_SUBJECT, Connection, JetStreamError, retrying
from ._errors import NatflowError
from ._puller import QueuePuller, ensure_durable, queue_consumer_config
from ._reader import reader
from ._start_watch import START_GRACE
from ._streams import TASK_PREFIX, TASK_STREAM, queue_consumer, task_subject, workflow_token

log = logging.getLogger("natflow.tasks")

DEFAULT_ACK_WAIT: Final = 15.0


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a task message. Only ``run_id`` matters; history holds the truth."""

    v: int = 1
    run_id: str
    workflow: str = ""  # decides the subject, so the consumer, that the task reaches
    reason: str = ""
    # A new run's task carries its first event and that event's stream sequence, so the
    # worker can claim it without reading history first; if the run has moved on since,
    # the claim's conditional append fails and the worker reads history after all.
    start_seq: int = 0  # 0: not inline
    start: msgspec.Raw = msgspec.Raw(b"null")


_task_encoder = msgspec.json.Encoder()
_task_decoder = msgspec.json.Decoder(Task)


def decode_task(data: bytes) -> Task:
    return _task_decoder.decode(data)


async def enqueue(conn: Connection, queue: str, task: Task) -> bool:
    """Make the run runnable. False if a task for it is already pending or in flight.

    Retried through a reconnect or a leader election (a duplicate is refused as pending).
    """
    if not task.workflow:
        raise ValueError(f"task for run {task.run_id!r} names no workflow")
    subject = task_subject(queue, task.workflow, task.run_id)
    data = _task_encoder.encode(task)

    async def attempt() -> bool:
        try:
            await conn.publish(subject, data)
            return True
        except JetStreamError as exc:
            if exc.err_code == ERR_MAX_MSGS_PER_SUBJECT:
                return False
            raise

    return await retrying(f"enqueueing run {task.run_id}", attempt, kind="enqueueing runs")


async def send_start_task(conn: Connection, queue: str, task: Task) -> None:
    """Write a new run's task (its start stored already) without waiting for the stream's
    acknowledgement: the start's write is the one its caller waits for.

    Nothing is lost if this write is: the engine's dispatcher holds every start it reads
    until the run moves on, and enqueues the task of one still alone after
    ``START_GRACE`` (``natflow_engine._start_watch``), as for a starter that died before
    writing it. So a refusal (the run's task pending already), a write the connection drops
    or a denied subject costs that run a few seconds, never the start.
    """
    subject = task_subject(queue, task.workflow, task.run_id)
    try:
        await conn.send(subject, _task_encoder.encode(task))
    except (NatflowError, nats.errors.Error) as exc:
        log.warning(
            "run %s: its task was not sent (%s); the engine enqueues it within %.0f s",
            task.run_id,
            exc,
            START_GRACE,
        )


async def queued(conn: Connection, tasks: Sequence[tuple[str, str, str]]) -> set[str]:
    """The runs among ``tasks`` (queue, workflow, run id) that have a task, pending or in
    flight: looked up together, up to 256 runs a request (multi-last direct gets), where an
    enqueue attempt would cost a request for each."""
    subjects = [task_subject(queue, workflow, run_id) for queue, workflow, run_id in tasks]
    found = await reader(conn).read_last_each(TASK_STREAM, subjects)
    # The run id is the subject's last token: ids never hold a dot (_names).
    return {(msg.headers or {}).get("Nats-Subject", "").rsplit(".", 1)[-1] for msg in found}


def consumer_config(
    queue: str, workflow: str, ack_wait: float = DEFAULT_ACK_WAIT
) -> api.ConsumerConfig:
    return queue_consumer_config(
        queue_consumer(queue, workflow),
        f"natflow workers of queue {queue!r} serving workflow {workflow!r}",
        f"{TASK_PREFIX}.{queue}.{workflow_token(workflow)}.*",
        ack_wait,
    )


async def ensure_consumer(
    conn: Connection, queue: str, workflow: str, ack_wait: float = DEFAULT_ACK_WAIT
) -> None:
    """Create the durable consumer of the workflow's tasks on the queue if missing (shared by
    every worker that serves the workflow on that queue)."""
    config = consumer_config(queue, workflow, ack_wait)
    what = f"consumer for workflow {workflow!r} on queue {queue}"
    await ensure_durable(conn, TASK_STREAM, config, what)


class TaskPuller(QueuePuller):
    """One workflow's tasks on a queue as they arrive (see
    :class:`~natflow_engine._puller.Puller`)."""

    def __init__(self, conn: Connection, queue: str, workflow: str, expires: float = 5.0) -> None:
        consumer = queue_consumer(queue, workflow)
        super().__init__(conn, TASK_STREAM, consumer, queue, workflow, expires=expires)
