"""Testing gdc-worker apps: the in-memory `TestApp`, and pytest fixtures on a real `nats-server`.

Installing gdc-worker registers this module as a pytest plugin (the `pytest11` entry point), so
its fixtures need no `pytest_plugins`:

- `nats_server`: one server per test session; its tests are skipped, saying why, when no
  `nats-server` binary is found (a `GDC_NATS_SERVER` that names none is an error instead).
- `nats_config`: a `NATSConfig` for that server with a stream and subjects of the test's own,
  so tests never see each other's events (`isolated_config` makes one for any server).
- `event_bus`: a connected `NATSEventBus` on that config; an async test using it runs on
  anyio's plugin, marked `pytest.mark.anyio` or not.
- `nats_cluster`: a `NATSCluster` of three routed `nats-server -js` nodes of the test's own,
  for failover tests (kill a node, find a stream's leader); stopped after the test.
- `anyio_backend`: "asyncio", since nats-py runs on asyncio only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..errors import NATSServerError
from ..server import NATSServer, find_nats_server
from .app import TestApp
from .cluster import FORM_TIMEOUT_S, NATSCluster

__all__ = [
    "NATSCluster",
    "TestApp",
    "event_bus",
    "isolated_config",
    "isolated_env",
    "nats_cluster",
    "nats_config",
    "nats_server",
    "pytest_configure",
]

_counter = itertools.count(1)


def isolated_config(url: str) -> NATSConfig:
    """Config for `url` with a stream, subjects and dead-letter stream no other call gets
    (`T<n>_EVENTS` on `t<n>.events.>`), quick reconnects, and no byte limits."""
    n = next(_counter)
    return NATSConfig(
        url=url,
        stream_name=f"T{n}_EVENTS",
        stream_subjects=(f"t{n}.events.>",),
        dlq_stream_name=f"T{n}_DLQ",
        dlq_subject_prefix=f"t{n}.dlq",
        connect_timeout=5.0,
        reconnect_wait=0.2,
        max_reconnect_attempts=-1,
        # JetStream reserves a stream's max_bytes up front: with many test streams a limit
        # would exhaust the store, so leave them unlimited.
        max_bytes=0,
    )


def isolated_env(config: NATSConfig) -> dict[str, str]:
    """The `GDC_NATS_*` variables that point a `gdc-worker` command, run as a subprocess or
    through click's runner, at `config`'s server and streams (see `isolated_config`)."""
    return {
        "GDC_NATS_URL": config.url,
        "GDC_NATS_STREAM_NAME": config.stream_name,
        "GDC_NATS_STREAM_SUBJECTS": ",".join(config.stream_subjects),
        "GDC_NATS_DLQ_STREAM_NAME": config.dlq_stream_name,
        "GDC_NATS_DLQ_SUBJECT_PREFIX": config.dlq_subject_prefix,
    }


def _server_binary() -> str:
    """The nats-server binary, or a skip saying how to get one; a `GDC_NATS_SERVER` naming no
    executable fails the test's setup instead, since that is a mistake to fix, not a gap."""
    try:
        return find_nats_server()
    except NATSServerError as exc:
        if os.environ.get("GDC_NATS_SERVER"):
            raise
        pytest.skip(str(exc))


class _AsyncioOnly:
    """Holds `anyio_backend`, registered after every installed plugin (`pytest_configure`): of
    two plugins' fixtures the later one wins, and anyio's own runs each async test on every
    backend it finds installed, trio included."""

    @pytest.fixture(scope="module")
    @staticmethod
    def anyio_backend() -> str:
        """Async tests and fixtures run on asyncio: nats-py does not support trio."""
        return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    """Pin anyio's backend to asyncio for the whole run."""
    config.pluginmanager.register(_AsyncioOnly(), "gdc_worker.testing.asyncio")


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NATSServer]:
    """A nats-server with JetStream on a free loopback port, for the whole session."""
    with NATSServer(binary=_server_binary()) as server:
        yield server


@pytest.fixture
def nats_config(nats_server: NATSServer) -> NATSConfig:
    """Config for the session's server with a stream of this test's own (`T<n>_EVENTS`)."""
    return isolated_config(nats_server.url)


@pytest.fixture
async def event_bus(nats_config: NATSConfig, anyio_backend: str) -> AsyncIterator[NATSEventBus]:
    """A bus connected to this test's stream, closed after the test.

    It asks for `anyio_backend`, so anyio's plugin runs it, and the async test using it, even
    without `pytest.mark.anyio`.
    """
    async with await NATSEventBus.connect(nats_config) as bus:
        yield bus


@pytest.fixture
def nats_cluster() -> Iterator[NATSCluster]:
    """Three routed nats-server nodes with JetStream on free loopback ports, for this test.

    Yields once they agree on a JetStream meta leader; fails the test's setup with
    `NATSServerError` (naming what each node saw) if that takes over `FORM_TIMEOUT_S`.
    Every node is stopped and its store removed after the test, killed ones included.
    """
    with NATSCluster(3, binary=_server_binary(), form_timeout=FORM_TIMEOUT_S) as cluster:
        yield cluster
