"""Fixtures of the suite's own; `gdc_worker.testing`'s (a real nats-server, the asyncio backend)
come from its pytest plugin, which installing gdc-worker registers."""

from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext

from gdc_worker import NATSConfig
from tests.processes import spawn

__all__ = ["jetstream", "spawn"]  # fixtures, used by name


@pytest.fixture
async def jetstream(nats_config: NATSConfig) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream client on the test's server, to look behind gdc-worker."""
    nc = await nats.connect(nats_config.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()
