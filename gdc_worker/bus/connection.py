"""The NATS connection: the first connect, reconnects, and what the bus hears about them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import nats.errors
from nats.aio.client import Client as NATS

from ..config import NATSConfig
from ..errors import ConnectionFailed, describe

__all__ = ["ConnectionEvents", "connect"]

log = logging.getLogger("gdc_worker.bus")


class ConnectionEvents:
    """What the bus does when the connection comes back or is gone for good.

    The callbacks are set once the bus exists; until then (during the first connect) the
    client's errors are kept, to name the cause if that connect fails.
    """

    def __init__(self, url: str) -> None:
        self.url = url  # the configured servers, passwords hidden
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        #: The server the client is (or was last) connected to, set by the bus.
        self.server: Callable[[], str] = lambda: url
        self.closing = False  # set by the bus before it closes on purpose
        self.first_errors: list[BaseException] = []

    async def disconnected(self) -> None:
        if self.on_lost is not None and not self.closing:
            log.warning("disconnected from NATS at %s", self.server())

    async def reconnected(self) -> None:
        log.warning("reconnected to NATS at %s", self.server())
        if self.on_reconnect is not None:
            await self.on_reconnect()

    async def error(self, exc: Exception) -> None:
        if self.on_lost is None:  # the first connect reports its cause from these
            self.first_errors.append(exc)
        log.debug("NATS client error: %r", exc)

    async def closed(self) -> None:
        if self.on_lost is not None and not self.closing:
            # Reconnects are exhausted: nothing will arrive any more.
            log.error("connection to NATS at %s is closed for good", self.server())
            self.on_lost()


class _Client(NATS):
    """nats-py's client with a cheaper header parser (every event carries two headers).

    nats-py checks each header name for whitespace with a generator over its characters, the
    largest single cost of receiving an event. This does the same check with one `split()`;
    `tests/test_bus.py` compares it with nats-py's own on tricky inputs.
    """

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:  # whitespace inside the name: not a header
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


async def connect(config: NATSConfig, events: ConnectionEvents, name: str | None) -> NATS:
    """A connected client; raises `ConnectionFailed` naming the server and the cause.

    The first connect fails within `connect_timeout`, as the Go client's does; the configured
    reconnect settings apply once connected.
    """
    nc = _Client()
    try:
        with anyio.fail_after(config.connect_timeout):
            await nc.connect(
                config.servers,
                name=name,
                connect_timeout=config.connect_timeout,  # type: ignore[arg-type]  # float works
                # nats-py would otherwise retry the first connect per the reconnect settings
                # (forever for 0 or -1).
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                disconnected_cb=events.disconnected,
                reconnected_cb=events.reconnected,
                error_cb=events.error,
                closed_cb=events.closed,
            )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await nc.close()
        errors = events.first_errors
        cause = errors[-1] if errors and not isinstance(exc, OSError) else exc
        raise ConnectionFailed(
            f"cannot connect to NATS at {events.url}: {describe(cause)}"
        ) from None
    # Once connected, reconnect as configured (nats-py: 0 attempts would mean forever).
    nc.options["allow_reconnect"] = config.max_reconnect_attempts != 0
    nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
    nc.options["reconnect_time_wait"] = config.reconnect_wait
    return nc
