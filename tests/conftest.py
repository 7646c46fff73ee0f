"""Fixtures shared by the suite: a real nats-server from `gdc_worker.testing`, asyncio via anyio."""

import pytest

pytest_plugins = ["gdc_worker.testing"]


@pytest.fixture
def anyio_backend() -> str:
    """nats-py runs on asyncio only."""
    return "asyncio"
