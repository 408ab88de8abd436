"""Large stored values are deleted with the last run that refers to them (and not before)."""

from __future__ import annotations

import contextlib
import hashlib
import time

import anyio
import msgspec
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine import ensure_streams, load_value, store_value
from natflow_engine._engine import Engine
from natflow_engine._kv import kv_delete, kv_put
from natflow_engine._value_refs import REFS_BUCKET, TOMBSTONE, ref_key, run_values
from natflow_engine._values import VALUES_BUCKET, delete_object

from tests.helpers import running_worker, wait_for
from tests.workflows_values import blob


def shout(text: str) -> str:
    return text.upper()


@workflow(name="shouter")
async def shouter(ctx: WorkflowContext, text: str) -> int:
    loud = await ctx.step("shout", shout, text)
    return len(loud)


def sha(text: str) -> str:
    return hashlib.sha256(msgspec.json.encode(text)).hexdigest()


async def present(client: Client, digest: str) -> bool:
    store = await client.connection.js.object_store(VALUES_BUCKET)
    try:
        info = await store.get_info(digest)
    except Exception:  # not found
        return False
    return not info.deleted


async def test_a_value_goes_with_the_last_run_that_refers_to_it(
    client: Client, engine: Engine
) -> None:
    text = blob(200_000, "shared")  # over the 64 KiB inline limit
    shared, loud = sha(text), sha(text.upper())
    async with running_worker(client, [shouter]):
        for run_id in ("share-a", "share-b"):
            assert await (await client.start(shouter, text, run_id=run_id)).result(10) == 200_000
    assert await run_values(client.connection, "share-a") == sorted([shared, loud])
    assert await present(client, shared) and await present(client, loud)

    await client.delete("share-a")
    # share-b still refers to both values: nothing is deleted.
    assert await run_values(client.connection, "share-a") == []
    assert await present(client, shared) and await present(client, loud)
    await client.start(shouter, text, run_id="share-c")  # no worker: it only waits

    await client.delete("share-b")
    # share-c refers to the input only: the input stays, the shouted result goes.
    assert await present(client, shared)
    assert not await present(client, loud)
    assert await run_values(client.connection, "share-c") == [shared]


async def test_a_value_written_while_its_last_run_is_deleted_survives(
    client: Client, engine: Engine
) -> None:
    """The interleaving that would lose it: the deleter has looked for other runs' markers
    (none yet) and is about to delete the object; a writer storing the same value for another
    run now writes its marker and finds the object still there. It must wait for the delete
    and write the object again, not skip the upload."""
    conn = client.connection
    data = msgspec.json.encode(blob(100_000, "race"))
    digest = hashlib.sha256(data).hexdigest()
    await store_value(conn, "the value", data, "race-old")
    # The deleter (for run race-old): marker gone, tombstone written, no other marker seen.
    await kv_delete(conn, REFS_BUCKET, ref_key(digest, "race-old"))
    await kv_put(conn, REFS_BUCKET, ref_key(digest, TOMBSTONE), str(time.time()).encode())
    stored: list[bytes] = []

    async def writer() -> None:
        stored.append(await store_value(conn, "the value", data, "race-new"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await wait_for(lambda: _marked(client, "race-new"), timeout=5, what="the writer's marker")
        await anyio.sleep(0.3)
        assert not stored, "the writer went on while a delete of its value was in progress"
        # The deleter carries on: deletes the object, removes its tombstone.
        await delete_object(conn, digest)
        await kv_delete(conn, REFS_BUCKET, ref_key(digest, TOMBSTONE))
    assert await present(client, digest)
    assert await load_value(conn, stored[0]) == data


async def _marked(client: Client, run_id: str) -> bool:
    return bool(await run_values(client.connection, run_id))


async def test_a_stale_tombstone_does_not_hold_writers(client: Client) -> None:
    """A deleter that died between its tombstone and its end holds no writer for long."""
    conn = client.connection
    data = msgspec.json.encode(blob(100_000, "stale"))
    digest = hashlib.sha256(data).hexdigest()
    await ensure_streams(conn)
    await kv_put(conn, REFS_BUCKET, ref_key(digest, TOMBSTONE), b"1000.0")  # long ago
    with anyio.fail_after(5):
        ref = await store_value(conn, "the value", data, "stale-run")
    assert await load_value(conn, ref) == data


@workflow(name="louder")
async def louder(ctx: WorkflowContext, text: str) -> str:
    return await ctx.step("shout", shout, text)


async def test_a_large_result_is_listed_as_itself_and_named_by_the_console(
    client: Client, engine: Engine
) -> None:
    """client.list() reads a large result back as describe() does (the index holds its
    reference); the console names it with its size instead of pulling it into the page."""
    from natflow_engine.console._format import pretty_json

    text = blob(150_000, "listed")
    async with running_worker(client, [louder]):
        await (await client.start(louder, text, run_id="listed-1")).result(10)

    async def indexed() -> bool:
        return any(r.status == "completed" for r in await client.list(workflow="louder"))

    await wait_for(indexed, what="the run indexed as completed")
    [listed] = await client.list(workflow="louder")
    assert listed.result == text.upper()
    reference = {"$natflow_ref": sha(text.upper()), "size": 150_002}
    assert pretty_json(reference) == (
        f"a stored value of 150,002 bytes (natflow_values, sha256 {sha(text.upper())})"
    )


def raise_long(size: int) -> None:
    raise ValueError("e" * size)


@workflow(name="long_error")
async def long_error(ctx: WorkflowContext, size: int) -> int:
    await ctx.step("explode", raise_long, size)
    return 0


async def test_a_large_error_is_stored_by_reference_and_read_back_whole(
    client: Client, engine: Engine
) -> None:
    from natflow import RunFailed
    from natflow_engine import HistoryStore
    from natflow_engine.events import RunFailed as RunFailedEvent
    from natflow_engine.events import StepFailed, encode_event

    async with running_worker(client, [long_error]):
        handle = await client.start(long_error, 300_000, run_id="long-err")
        try:
            await handle.result(timeout=20)
        except RunFailed as failed:
            error = failed.error
    assert error.message.endswith("e" * 1000) and len(error.message) >= 300_000
    raw = await HistoryStore(client.connection).read("long-err")
    assert all(len(encode_event(e)) < 64 * 1024 for e in raw.events)
    stored = [e for e in raw.events if isinstance(e, StepFailed | RunFailedEvent)]
    assert len(stored) == 2 and all(e.error.stored for e in stored)
    [step] = await client.steps("long-err")
    assert step.error is not None and step.error.message == "e" * 300_000
    assert (await client.describe("long-err")).error.message == error.message  # type: ignore[union-attr]


async def test_a_restarted_run_keeps_the_values_it_copied_after_the_original_is_deleted(
    client: Client, engine: Engine
) -> None:
    """A restart copies the original's events as stored (values by reference): the copy
    marks them as the new run's, so deleting the original leaves them readable."""
    text = blob(120_000, "restarted")
    async with running_worker(client, [louder, shouter]):
        await (await client.start(shouter, text, run_id="orig-1")).result(10)
        restarted = await client.restart("orig-1", from_step=("shout", 1))
        await restarted.result(timeout=10)
        await client.delete("orig-1")
    assert await present(client, sha(text))  # the restarted run's input
    info = await client.describe(restarted.run_id)
    assert info.status == "completed" and info.result == 120_000


def fails_large(size: int) -> None:
    raise ValueError("detail " + blob(size, "copied-error"))


def passes_once_allowed(flag: str) -> str:
    if not ALLOWED.get(flag):
        raise RuntimeError("not yet")
    return "b ok"


ALLOWED: dict[str, bool] = {}


@workflow(name="caught_large_error")
async def caught_large_error(ctx: WorkflowContext, size: int) -> str:
    from natflow import StepError

    with contextlib.suppress(StepError):
        await ctx.step("a", fails_large, size)
    return await ctx.step("b", passes_once_allowed, "b")


async def test_a_restarted_run_keeps_a_large_error_it_copied_after_the_original_is_deleted(
    client: Client, engine: Engine
) -> None:
    """The copy marked a result's, input's and signal's stored value as the new run's, but
    not an error's: deleting the original deleted it, and the restarted run never ran."""
    from natflow import RunFailed

    ALLOWED.clear()
    async with running_worker(client, [caught_large_error]):
        original = await client.start(caught_large_error, 100_000, run_id="err-orig")
        with pytest.raises(RunFailed):
            await original.result(timeout=10)
        ALLOWED["b"] = True
        restarted = await client.restart("err-orig", from_step="b")
        await client.delete("err-orig")
        assert await restarted.result(timeout=10) == "b ok"
    a, _ = await client.steps(restarted.run_id)
    assert a.error is not None and len(a.error.message) > 100_000


async def test_an_error_over_max_value_bytes_is_cut_to_its_ends_not_refused(
    client: Client, engine: Engine
) -> None:
    """Its store was refused (InvalidInput) and the task retried for good: the run never
    ended."""
    from natflow import RunFailed

    client.connection.max_value_bytes = 200_000  # the worker shares this connection
    async with running_worker(client, [long_error]):
        handle = await client.start(long_error, 300_000, run_id="huge-err")
        with pytest.raises(RunFailed) as failed:
            await handle.result(timeout=10)
    error = failed.value.error
    assert len(error.message) < 10_000, len(error.message)
    assert "e" * 1000 in error.message and "cut to its ends" in error.message


def bulky(stretch: int) -> str:
    return blob(100_000, f"stretch-{stretch}")  # over 64 KiB: stored by reference


@workflow(name="bulky_loop")
async def bulky_loop(ctx: WorkflowContext, stretch: int) -> int:
    await ctx.step("bulky", bulky, stretch)
    if stretch < 6:
        ctx.continue_as_new(stretch + 1)
    return stretch


async def test_a_continued_run_frees_the_values_only_its_older_stretches_used(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stretch's large step result stayed stored until the whole run was deleted: a loop
    that continues as new for good grew the object store for good."""
    from datetime import timedelta

    from natflow_engine import _value_release

    # Markers of the 5 s before a stretch began stay (servers' clocks); these take a second.
    monkeypatch.setattr(_value_release, "_CLOCK_SLACK", timedelta(0))
    async with running_worker(client, [bulky_loop]):
        assert await (await client.start(bulky_loop, 1, run_id="loop-1")).result(20) == 6
    latest = hashlib.sha256(msgspec.json.encode(bulky(6))).hexdigest()

    async def freed() -> list[str] | None:
        held = await run_values(client.connection, "loop-1")
        return held if len(held) <= 2 else None  # the last stretch's (and one just before)

    held = await wait_for(freed, timeout=15, what="the older stretches' values freed")
    assert latest in held and await present(client, latest)
    first = hashlib.sha256(msgspec.json.encode(bulky(1))).hexdigest()
    assert not await present(client, first)
    info = await client.describe("loop-1")
    assert info.status == "completed" and info.stretch == 6


async def test_chunks_of_one_value_stored_at_once_by_many_writers_are_purged_but_its_own(
    client: Client,
) -> None:
    """Each writer wrote chunks under a nuid of its own and the last meta won: the others'
    chunks were named by nothing, and no delete ever found them."""
    from datetime import timedelta

    from natflow_engine._value_chunks import purge_orphan_chunks
    from natflow_engine._values import VALUES_STREAM

    conn = client.connection
    await ensure_streams(conn)
    data = b'"' + b"x" * 200_000 + b'"'

    async def chunk_subjects() -> set[str]:
        info = await conn.jsm.stream_info(VALUES_STREAM, subjects_filter=f"$O.{VALUES_BUCKET}.C.>")
        return set(info.state.subjects or {})

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(store_value, conn, "an input", data, f"writer-{i}")
    assert len(await chunk_subjects()) > 1  # the race this guards against did happen
    assert await purge_orphan_chunks(conn) == 0  # too recent: a put may still be writing
    assert await purge_orphan_chunks(conn, older_than=timedelta(0)) >= 1
    assert len(await chunk_subjects()) == 1
    ref = await store_value(conn, "an input", data, "writer-0")  # present: nothing written
    assert await load_value(conn, ref) == data


@workflow(name="large_result")
async def large_result(ctx: WorkflowContext, size: int) -> str:
    return "r" * size


async def test_a_list_holding_a_run_whose_large_result_went_meanwhile_still_lists(
    client: Client, engine: Engine
) -> None:
    """A run deleted between the index's read and its result's (retention beside a list)
    failed the whole list with UnreadableValue."""
    from natflow_engine._history import HistoryStore
    from natflow_engine._values import value_ref

    async with running_worker(client, [large_result]):
        handle = await client.start(large_result, 100_000, run_id="gone-result")
        assert len(await handle.result(timeout=20)) == 100_000

    async def indexed() -> bool:
        return any(r.run_id == "gone-result" for r in await client.list())

    await wait_for(indexed, what="the run in the index")
    stored = await HistoryStore(client.connection).read("gone-result")  # as written: refs
    (ref,) = [value_ref(msgspec.json.decode(bytes(e.result))) for e in stored.events
              if type(e).__name__ == "RunCompleted"]  # fmt: skip
    assert ref is not None
    await delete_object(client.connection, ref.digest)  # as a delete would, meanwhile
    (listed,) = [r for r in await client.list() if r.run_id == "gone-result"]
    assert value_ref(listed.result) is not None  # its reference, shown
