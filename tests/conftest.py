"""Fixtures shared by the suite: a real nats-server from `gdc_worker.testing`, asyncio via anyio."""

from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext

from gdc_worker import NATSConfig

pytest_plugins = ["gdc_worker.testing"]


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only."""
    return "asyncio"


@pytest.fixture
async def jetstream(nats_config: NATSConfig) -> AsyncIterator[JetStreamContext]:
    """A plain nats-py JetStream client on the test's server, to look behind gdc-worker."""
    nc = await nats.connect(nats_config.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()
