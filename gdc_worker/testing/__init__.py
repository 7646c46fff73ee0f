"""Pytest fixtures on a real `nats-server`: `pytest_plugins = ["gdc_worker.testing"]` enables them.

- `nats_server`: one server per test session.
- `nats_config`: a `NATSConfig` for that server with a stream and subjects of the test's own,
  so tests never see each other's events.
- `event_bus`: a connected `NATSEventBus` on that config (async tests, anyio plugin).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..server import NATSServer

__all__ = ["event_bus", "nats_config", "nats_server"]

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NATSServer]:
    """A nats-server with JetStream on a free loopback port, for the whole session."""
    with NATSServer() as server:
        yield server


@pytest.fixture
def nats_config(nats_server: NATSServer) -> NATSConfig:
    """Config for the session's server with a stream of this test's own (`T<n>_EVENTS`)."""
    n = next(_counter)
    return NATSConfig(
        url=nats_server.url,
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


@pytest.fixture
async def event_bus(nats_config: NATSConfig) -> AsyncIterator[NATSEventBus]:
    """A bus connected to this test's stream, closed after the test."""
    async with await NATSEventBus.connect(nats_config) as bus:
        yield bus
