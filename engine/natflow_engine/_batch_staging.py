"""Where the embedded nats-server stages atomic batches: in memory (tmpfs), not on disk.

nats-server stages every atomic batch sent to a one-replica file stream in a file store of
its own, created for that batch and deleted at its commit, under
``<jetstream>/<account>/streams/<stream>/batches/<hash>`` (``newBatchStore``); the path is not
configurable. On the 2-core VM that staging was ~1.5 ms of server CPU per batch, most of it
in the kernel (three mkdirs, a temporary file and a rename per batch; ``perf``: 24 % of the
server in ``newBatchStore``), and natflow sends a batch every ~13 runs to each of its two
batched streams. With ``batches`` a link into ``/dev/shm`` the same work is a few page-cache
operations: ``natflow bench``-like load, 3,000 runs x 3 steps, five alternating pairs:
727-833 -> 880-975 runs/s, server system CPU 0.33-0.58 -> 0.19-0.25 ms per run.

Durability is unchanged. A batch's acknowledgement comes after its commit has written (and,
with ``sync_interval: always``, fsynced) every message into the stream's own files, so
nothing acknowledged lives only in staging; staging on disk was never fsynced either
(``AsyncFlush``). A crash of the server process leaves tmpfs as it leaves the page cache,
and the restarted server finishes a half-applied commit from it as it would from disk. Only
an OS crash or power loss during a commit loses the staging, and with it the unapplied rest
of that commit: appends never acknowledged, which their writers make again alone (each keeps
its expected sequence and message id, see ``_append_batch``).

nats-server removes ``batches`` at every start (after that recovery), so the links are made
after the server is ready, for natflow's streams already on disk in any account, and for the
streams not yet created in the accounts the caller names (``$G`` where natflow wrote the
configuration). A server killed outright leaves its folder for its next start; one whose
store is gone is removed by the next server of the same user. Anything that fails here
leaves staging on disk: slower, never wrong.
``NATFLOW_BATCH_STAGING=disk`` keeps it there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ._lifecycle import LIFECYCLE_STREAM
from ._streams import HISTORY_STREAM

log = logging.getLogger("natflow.server")

# natflow's one-replica streams that take atomic batches (the run index does not: it is
# acknowledged before its fsync on one server, which excludes batches).
STAGED_STREAMS: Final = (HISTORY_STREAM, LIFECYCLE_STREAM)
GLOBAL_ACCOUNT: Final = "$G"  # nats-server's account where the configuration names none
MEMORY_ROOT: Final = Path("/dev/shm")
ENV: Final = "NATFLOW_BATCH_STAGING"
_BATCHES: Final = "batches"
_PREFIX: Final = "natflow-batches-"
# In each staging folder: the JetStream folder it serves (no account is named so).
_STORE_NOTE: Final = ".store"


def staging_root(jetstream_dir: Path, memory_root: Path = MEMORY_ROOT) -> Path:
    """The tmpfs folder of one JetStream store (one name per store: servers side by side
    keep apart, and a restarted server finds what its predecessor staged)."""
    key = hashlib.sha256(str(jetstream_dir.resolve()).encode()).hexdigest()[:16]
    return memory_root / f"{_PREFIX}{key}"


def in_memory_wanted() -> bool:
    value = os.environ.get(ENV, "memory").strip().lower()
    if value not in ("memory", "disk"):
        log.warning("%s=%r is neither memory nor disk; staging batches in memory", ENV, value)
    return value != "disk"


class BatchStaging:
    """The links from one JetStream store's ``batches`` folders into tmpfs."""

    def __init__(self, jetstream_dir: Path, memory_root: Path = MEMORY_ROOT) -> None:
        self.jetstream_dir = jetstream_dir
        self.root = staging_root(jetstream_dir, memory_root)
        self._made: list[Path] = []  # stream folders made here, for streams not yet created

    def link(self, accounts: Iterable[str] = ()) -> list[Path]:
        """Link ``batches`` of every natflow stream on disk, and of those in ``accounts``
        not created yet; the links in place afterwards."""
        linked: list[Path] = []
        if not self._own_root():
            return linked
        try:
            stream_dirs = self._stream_dirs_to_link(accounts)
        except OSError as exc:
            log.warning("atomic batches stay staged on disk: %s", exc)
            return linked
        for stream_dir in stream_dirs:
            link = stream_dir / _BATCHES
            try:
                if self._link(link, self.root / stream_dir.parent.parent.name / stream_dir.name):
                    linked.append(link)
            except OSError as exc:
                log.warning("atomic batches of %s stay staged on disk: %s", stream_dir, exc)
        return linked

    def remove(self) -> None:
        """Drop the staging folder and the folders made for streams that were never created
        (after the server has stopped: a graceful stop leaves no batch half committed)."""
        for stream_dir in self._made:
            if not (stream_dir / "meta.inf").exists():
                with contextlib.suppress(OSError):
                    (stream_dir / _BATCHES).unlink()
                for empty in (stream_dir, stream_dir.parent, stream_dir.parent.parent):
                    try:
                        empty.rmdir()
                    except OSError:
                        break  # not empty: the server keeps something there
        self._made = []
        shutil.rmtree(self.root, ignore_errors=True)

    def _stream_dirs_to_link(self, accounts: Iterable[str]) -> list[Path]:
        """The batched streams' folders on disk, and those of ``accounts``, made here for
        streams not created yet (:meth:`remove` takes them away if they stay so)."""
        found = {
            stream_dir
            for stream_dir in self.jetstream_dir.glob("*/streams/*")
            if stream_dir.name in STAGED_STREAMS and stream_dir.is_dir()
        }
        for account in accounts:
            for name in STAGED_STREAMS:
                stream_dir = self.jetstream_dir / account / "streams" / name
                if stream_dir not in found:
                    stream_dir.mkdir(parents=True, exist_ok=True)
                    self._made.append(stream_dir)
                    found.add(stream_dir)
        return sorted(found)

    def _own_root(self) -> bool:
        """The staging folder exists, is a folder of this user's and no one else can enter
        (/dev/shm is shared by every user of the machine)."""
        try:
            self.root.parent.mkdir(parents=False, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.root.mkdir(mode=0o700)
            info = self.root.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                log.warning(
                    "atomic batches stay staged on disk: %s is not a folder of this user's",
                    self.root,
                )
                return False
            if stat.S_IMODE(info.st_mode) & 0o077:
                os.chmod(self.root, 0o700)
            (self.root / _STORE_NOTE).write_text(str(self.jetstream_dir.resolve()))
        except OSError as exc:
            log.info("atomic batches stay staged on disk (%s: %s)", self.root, exc)
            return False
        self._drop_orphans()
        return True

    def _drop_orphans(self) -> None:
        """Remove this user's staging folders whose store is gone (a server killed outright,
        its temporary store deleted since): nothing can ever be recovered from them."""
        for other in self.root.parent.glob(f"{_PREFIX}*"):
            try:
                if other == self.root or other.lstat().st_uid != os.getuid():
                    continue
                store = Path((other / _STORE_NOTE).read_text())
            except OSError:
                continue  # another user's, being made, or not ours to judge
            if not store.exists():
                shutil.rmtree(other, ignore_errors=True)

    @staticmethod
    def _link(link: Path, target: Path) -> bool:
        """Make ``link`` point at ``target``; False where the server already stages there
        on disk (a real folder: it holds a batch being committed now, left alone)."""
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                target.mkdir(parents=True, exist_ok=True)
                return True
            link.unlink()
        elif link.exists():
            log.debug("%s is a folder of nats-server's; its batches stay on disk", link)
            return False
        # Whatever is left in the target was staged before this server started, which
        # either finished it from there or dropped it.
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, mode=0o700)
        try:
            link.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # the server made its own folder meanwhile
            return False
        return True
