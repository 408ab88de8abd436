"""The embedded server stages atomic batches in memory (``_batch_staging``): natflow's
batched streams get ``batches`` linked into tmpfs at every start, before and after they
exist; a batch is staged there and gone at its commit; a restart, graceful or hard, links
them again, and a killed server's staging is still there for its next start; staging that
fails leaves the writes to land alone; a stop leaves nothing behind (no tmpfs folder, no
folder of a stream never created), and a folder whose store is gone is dropped by the next
server; ``NATFLOW_BATCH_STAGING=disk`` and an unusable tmpfs folder keep staging on disk."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
from natflow import Client
from natflow_engine._append_batch import MAX_BATCH, Batcher
from natflow_engine._batch_staging import (
    ENV,
    GLOBAL_ACCOUNT,
    STAGED_STREAMS,
    BatchStaging,
    staging_root,
)
from natflow_engine._lifecycle import LIFECYCLE_STREAM
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_PREFIX, HISTORY_STREAM, ensure_streams

from tests.helpers import wait_for
from tests.links import free_port

pytestmark = pytest.mark.skipif(
    not (Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)),
    reason="no writable tmpfs at /dev/shm: the server stages on disk",
)


def _links(server: EmbeddedServer, account: str = GLOBAL_ACCOUNT) -> dict[str, Path | None]:
    """Where each batched stream's ``batches`` leads (None: not a link)."""
    assert server.jetstream_dir is not None
    found: dict[str, Path | None] = {}
    for name in STAGED_STREAMS:
        link = server.jetstream_dir / account / "streams" / name / "batches"
        found[name] = link.resolve() if link.is_symlink() else None
    return found


def _expected(server: EmbeddedServer, account: str = GLOBAL_ACCOUNT) -> dict[str, Path | None]:
    assert server.jetstream_dir is not None
    root = staging_root(server.jetstream_dir)
    return {name: (root / account / name).resolve() for name in STAGED_STREAMS}


async def _write_at_once(client: Client, count: int, tag: str = "") -> Batcher:
    """``count`` first events of as many runs, at once, through a history batcher."""
    batcher = Batcher(client.connection, HISTORY_STREAM, sending=1)
    headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
    acks = await asyncio.gather(
        *(
            batcher.publish(f"{HISTORY_PREFIX}.stagetest{tag}{n}.1", b"{}", headers)
            for n in range(count)
        )
    )
    assert len({ack.seq for ack in acks}) == count  # each landed, once
    return batcher


async def test_batched_streams_stage_in_memory_before_and_after_they_exist(
    nats_server: EmbeddedServer, client: Client
) -> None:
    assert _links(nats_server) == _expected(nats_server)  # made before the streams are
    await ensure_streams(client.connection)
    assert _links(nats_server) == _expected(nats_server)  # kept by the stream's creation

    # An open batch is staged in tmpfs, and dropped at its commit.
    staged = _expected(nats_server)[HISTORY_STREAM]
    assert staged is not None
    nc = client.connection.nc
    subject = f"{HISTORY_PREFIX}.stageopen.1"
    await nc.publish(subject, b"{}", headers={"Nats-Batch-Id": "b1", "Nats-Batch-Sequence": "1"})
    await wait_for(lambda: _any(staged), what="the open batch staged in tmpfs")
    ack = await nc.request(
        subject,
        b"{}",
        headers={"Nats-Batch-Id": "b1", "Nats-Batch-Sequence": "2", "Nats-Batch-Commit": "1"},
        timeout=5,
    )
    assert b'"batch":"b1","count":2' in ack.data
    await wait_for(lambda: _none(staged), what="the committed batch's staging dropped")

    batcher = await _write_at_once(client, 3 * MAX_BATCH)
    assert batcher.batches >= 1  # staged in memory, committed


async def _any(folder: Path) -> bool:
    return bool(os.listdir(folder))


async def _none(folder: Path) -> bool:
    return not os.listdir(folder)


async def test_a_restart_graceful_or_hard_links_the_streams_again(
    nats_server: EmbeddedServer, client: Client
) -> None:
    await ensure_streams(client.connection)
    for hard in (False, True):
        reconnects = _reconnects(client)
        nats_server.restart(hard=hard)
        assert _links(nats_server) == _expected(nats_server), f"hard={hard}"
        await wait_for(partial(_reconnected, client, reconnects), what="the client back")
        batcher = await _write_at_once(client, MAX_BATCH, tag=f"r{hard}")
        assert batcher.batches >= 1


async def test_a_killed_server_leaves_what_it_staged_for_its_next_start(
    nats_server: EmbeddedServer, client: Client
) -> None:
    await ensure_streams(client.connection)
    staged = _expected(nats_server)[HISTORY_STREAM]
    assert staged is not None
    await client.connection.nc.publish(
        f"{HISTORY_PREFIX}.stagekill.1",
        b"{}",
        headers={"Nats-Batch-Id": "k1", "Nats-Batch-Sequence": "1"},
    )
    await wait_for(lambda: _any(staged), what="the open batch staged in tmpfs")
    held = sorted(os.listdir(staged))
    reconnects = _reconnects(client)
    nats_server.kill()  # SIGKILL: what a crash of the server process leaves
    assert sorted(os.listdir(staged)) == held  # there for the next start to finish from
    nats_server.start()
    assert _links(nats_server) == _expected(nats_server)
    await wait_for(partial(_reconnected, client, reconnects), what="the client back")
    assert (await _write_at_once(client, MAX_BATCH, tag="k")).batches >= 1


def _reconnects(client: Client) -> int:
    return int(client.connection.nc.stats["reconnects"])


async def _reconnected(client: Client, before: int) -> bool:
    return _reconnects(client) > before and client.connection.nc.is_connected


async def test_staging_that_fails_leaves_the_writes_to_land_alone(
    nats_server: EmbeddedServer, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_streams(client.connection)
    staged = _expected(nats_server)[HISTORY_STREAM]
    assert staged is not None
    staged.rmdir()
    staged.write_text("not a folder: the server cannot stage a batch here")
    caplog.set_level(logging.DEBUG, logger="natflow.batches")
    batcher = await _write_at_once(client, 2 * MAX_BATCH)
    assert batcher.batches == 0  # every batch refused, every write alone, none lost
    tried = [r.message for r in caplog.records if r.name == "natflow.batches"]
    assert any("each alone" in message for message in tried), tried


async def test_a_stop_leaves_no_staging_and_no_folder_of_a_stream_never_created(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats").start()
    try:
        assert server.jetstream_dir is not None and server.staging is not None
        root = server.staging.root
        assert root.is_dir() and _links(server) == _expected(server)
    finally:
        server.stop()
    assert not root.exists()
    assert not (server.jetstream_dir / GLOBAL_ACCOUNT).exists()
    server.start()
    try:
        assert "Missing stream metafile" not in server.log_tail(400)
        assert _links(server) == _expected(server)
    finally:
        server.stop()
    assert not root.exists()


async def test_disk_staging_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "disk")
    server = EmbeddedServer(store_dir=tmp_path / "nats").start()
    try:
        assert server.staging is None
        assert server.jetstream_dir is not None
        assert not (server.jetstream_dir / GLOBAL_ACCOUNT).exists()
    finally:
        server.stop()


async def test_a_configuration_of_ones_own_stages_the_streams_it_has_after_a_restart(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "own.conf"
    port = free_port()
    conf.write_text(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
    server = EmbeddedServer(conf, store_dir=tmp_path / "log").start()
    try:
        # Its accounts are the configuration's business: nothing made before the streams.
        assert server.jetstream_dir is not None
        assert not (server.jetstream_dir / GLOBAL_ACCOUNT).exists()
        client = await Client.connect(server.url)
        try:
            await ensure_streams(client.connection)
            assert _links(server) == dict.fromkeys(STAGED_STREAMS)
            reconnects = _reconnects(client)
            server.restart()
            assert _links(server) == _expected(server)
            await wait_for(partial(_reconnected, client, reconnects), what="the client back")
            assert (await _write_at_once(client, MAX_BATCH)).batches >= 1
        finally:
            await client.close()
    finally:
        server.stop()


def test_an_unusable_tmpfs_folder_keeps_staging_on_disk(tmp_path: Path) -> None:
    jetstream = tmp_path / "jetstream"
    (jetstream / GLOBAL_ACCOUNT / "streams" / LIFECYCLE_STREAM).mkdir(parents=True)
    memory = tmp_path / "shm"
    memory.mkdir()
    staging_root(jetstream, memory).write_text("someone else's file")
    staging = BatchStaging(jetstream, memory)
    assert staging.link([GLOBAL_ACCOUNT]) == []
    assert not (jetstream / GLOBAL_ACCOUNT / "streams" / LIFECYCLE_STREAM / "batches").exists()

    # A folder the server made (a batch it is committing now) is left where it is.
    staging_root(jetstream, memory).unlink()
    own = jetstream / GLOBAL_ACCOUNT / "streams" / LIFECYCLE_STREAM / "batches"
    own.mkdir()
    linked = staging.link([GLOBAL_ACCOUNT])
    assert own.is_dir() and not own.is_symlink()
    assert linked == [jetstream / GLOBAL_ACCOUNT / "streams" / HISTORY_STREAM / "batches"]


def test_a_staging_folder_whose_store_is_gone_is_removed_by_the_next_server(
    tmp_path: Path,
) -> None:
    memory = tmp_path / "shm"
    memory.mkdir()
    kept_store, gone_store = tmp_path / "kept" / "jetstream", tmp_path / "gone" / "jetstream"
    for store in (kept_store, gone_store):
        (store / GLOBAL_ACCOUNT / "streams" / HISTORY_STREAM).mkdir(parents=True)
        assert BatchStaging(store, memory).link() != []  # its server then killed outright
    gone_root = staging_root(gone_store, memory)
    (gone_root / GLOBAL_ACCOUNT / HISTORY_STREAM / "half-staged").mkdir()
    shutil.rmtree(gone_store.parent)

    fresh = tmp_path / "fresh" / "jetstream"
    fresh.mkdir(parents=True)
    BatchStaging(fresh, memory).link([GLOBAL_ACCOUNT])
    assert not gone_root.exists()
    assert staging_root(kept_store, memory).is_dir()  # its store may start again
    assert staging_root(fresh, memory).is_dir()
