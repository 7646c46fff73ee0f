"""The NATS connection: the first connect, reconnects, and what the bus hears about them."""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..config import NATSConfig
from ..errors import ConnectionFailed, describe
from .security import Refused, credentials, security_options

__all__ = [
    "Client",
    "ConnectionEvents",
    "Deliver",
    "RefusalListener",
    "RequestRefused",
    "connect",
    "denied",
]

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
        #: Told False when the connection drops (the client reconnects), True when it is back.
        self.on_change: Callable[[bool], None] | None = None
        #: The server the client is (or was last) connected to, set by the bus.
        self.server: Callable[[], str] = lambda: url
        self.closing = False  # set by the bus before it closes on purpose
        self.first_errors: list[BaseException] = []
        #: The connect going on in the background (see `connect(keep_trying=True)`), if any.
        self.connecting: asyncio.Task[None] | None = None

    async def disconnected(self) -> None:
        if self.on_lost is not None and not self.closing:
            log.warning("disconnected from NATS at %s", self.server())
            if self.on_change is not None:
                self.on_change(False)

    async def reconnected(self) -> None:
        log.warning("reconnected to NATS at %s", self.server())
        if self.on_change is not None:
            self.on_change(True)
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


#: What nats-py allows in a header name (RFC 7230 token characters), and in a subject: no
#: whitespace, which would let a name or a subject end the protocol line.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_IN_SUBJECT = re.compile(r"[ \t\r\n]")
#: nats-py turns CR and LF in a header value into spaces, so a value cannot end its line.
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: How the server's refusal of a publish starts, as nats-py's parser hands it on (lowercased).
_PUBLISH_REFUSED = "permissions violation for publish to "
#: The header names a client remembers as checked (events carry the same few).
_MAX_HEADER_NAMES = 256

#: How many of the server's permission refusals a client keeps, to tell a request refused
#: from one that got no answer.
_MAX_REFUSALS = 256


class RequestRefused(nats.errors.TimeoutError):
    """A request that got no answer because the server refused to let this client publish it.

    The server says so to the connection (`-ERR`), not to the request, which just times out;
    so this is a `TimeoutError` still, one that asking again cannot cure.
    """

    def __init__(self, said: str) -> None:
        super().__init__()
        self.said = said

    def __str__(self) -> str:
        return denied(self.said)


def denied(said: str) -> str:
    """How a publish the server refused for want of permission is reported."""
    return f"permission denied: the server says {said}"


#: Told of each publish the server refuses: its subject and what the server said (both
#: lowercased by nats-py).
RefusalListener = Callable[[str, str], None]
#: Told of each message of a direct subscription: its subject, reply subject, payload and
#: headers (None: none), in the client's read loop.
Deliver = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]


class Client(NATS):
    """nats-py's client with a cheaper header parser and direct subscriptions.

    nats-py checks each header name for whitespace with a generator over its characters, the
    largest single cost of receiving an event. This does the same check with one `split()`;
    `tests/test_bus.py` compares it with nats-py's own on tricky inputs.

    A direct subscription (`subscribe_direct`) hands each message to a plain function as it is
    read: no `Msg`, no queue, no task of its own, for the deliveries of pull consumers and the
    publish acks, one or more per event.
    `header_block()` and `publish_block()` send a message with headers as `publish()` does,
    checking each header name once rather than once per message.
    A request that times out because the server refused its publish raises `RequestRefused`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Deliver] = {}
        self._header_lines: dict[str, str] = {}
        # When the server refused a publish, to which subject, and what it said (all
        # lowercased by nats-py); and who is told of each refusal.
        self._refusals: collections.deque[tuple[float, str, str]] = collections.deque(
            maxlen=_MAX_REFUSALS
        )
        self._refusal_listeners: set[RefusalListener] = set()

    def listen_for_refusals(self, listener: RefusalListener) -> Callable[[], None]:
        """Tell `listener` of each publish the server refuses from now on, in the read loop
        (so it must not block); returns what stops it."""
        self._refusal_listeners.add(listener)
        return lambda: self._refusal_listeners.discard(listener)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """nats-py's `request()`; one the server refused raises `RequestRefused` at its
        timeout, naming the subject: only a refusal heard since it was sent counts."""
        sent = time.monotonic()
        try:
            return await super().request(subject, payload, timeout, old_style, headers)
        except nats.errors.TimeoutError:
            lowered = subject.lower()
            for heard, refused, said in reversed(self._refusals):
                if heard < sent:
                    break
                if refused == lowered:
                    raise RequestRefused(said) from None
            raise

    async def _process_err(self, err_msg: str) -> None:
        said = err_msg.strip("'")
        if said.startswith(_PUBLISH_REFUSED):  # `... publish to "subject"`: the server goes on
            subject = said[len(_PUBLISH_REFUSED) :].strip().strip('"')
            self._refusals.append((time.monotonic(), subject, said))
            for listener in list(self._refusal_listeners):
                listener(subject, said)
        await super()._process_err(err_msg)

    def header_block(self, headers: Mapping[str, str]) -> bytes:
        """The headers as nats-py sends them: names trimmed (empty ones left out), values
        trimmed with CR and LF made spaces; raises `BadHeaderError` for a name nats-py refuses.
        """
        lines = self._header_lines
        block = ["NATS/1.0\r\n"]
        for key, value in headers.items():
            line = lines.get(key)
            if line is None:
                name = key.strip()
                if name and not _HEADER_NAME.fullmatch(name):
                    raise nats.errors.BadHeaderError(name)
                line = name + ": " if name else ""
                if len(lines) < _MAX_HEADER_NAMES:
                    lines[key] = line
            if line:
                value = value.strip()
                if "\r" in value or "\n" in value:  # rare: translate() is slow per character
                    value = value.translate(_NEWLINES)
                block += (line, value, "\r\n")
        block.append("\r\n")
        return "".join(block).encode()

    async def publish_block(self, subject: str, reply: str, payload: bytes, block: bytes) -> None:
        """`publish()` with headers already in a `header_block()`, and its checks: the subject
        (the reply is our own inbox), then those of `_check_sendable`, each raising the error
        `publish()` raises. Past the pending buffer's limit it waits for the socket, as
        `publish()` does."""
        if not self._skip_subject_validation and (not subject or _NOT_IN_SUBJECT.search(subject)):
            raise nats.errors.BadSubjectError
        size = len(payload)
        self._check_sendable(size)
        head = len(block)
        command = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
            subject.encode(),
            reply.encode(),
            head,
            head + size,
            block,
            payload,
        )
        self._queue(command, size)
        if 0 < self._max_pending_size < self._pending_data_size:
            await self._flush_pending(force_flush=True)

    def publish_now(self, subject: str, payload: bytes, reply: str = "") -> None:
        """`publish()` of a message without headers, with its checks (`_check_sendable`), queued
        without a coroutine and never waiting: for the acks and pull requests, one or more per
        delivery, a few bytes each."""
        size = len(payload)
        self._check_sendable(size)
        # Byte for byte nats-py's command, two spaces and all when there is no reply.
        command = b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), size, payload)
        self._queue(command, size)

    def _check_sendable(self, size: int) -> None:
        """What `publish()` checks before it queues a payload of `size` bytes: closed,
        draining, the buffer while reconnecting, and max_payload."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self.is_connected and (
            self._max_pending_size <= 0 or size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        if size > self._max_payload:
            raise nats.errors.MaxPayloadError

    def _queue(self, command: bytes, size: int) -> None:
        """Queue `command` (carrying `size` bytes of payload) as nats-py queues a publish, and
        have the flusher send it as `_flush_pending()` does, without a coroutine."""
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += size
        self._pending.append(command)
        self._pending_data_size += len(command)
        queue = self._flush_queue
        if queue is None or not queue.empty() or not self.is_connected:
            return  # a flush is due already, or the buffer goes out once reconnected
        if self._transport is not None and (
            self._flusher_task is None or self._flusher_task.done()
        ):
            self._transport.writelines(self._pending)  # as `_flush_pending()` does then
            self._pending = []
            self._pending_data_size = 0
        else:
            queue.put_nowait(asyncio.get_running_loop().create_future())

    async def close(self) -> None:
        """nats-py's `close()`, but what was queued while disconnected is dropped first: it
        cannot be sent any more, and nats-py's close would try to, on the lost socket, and
        raise `ConnectionResetError` half-way through (a closing bus or gauge reader crashed
        on it during an outage). Acks among it come back as redeliveries."""
        if not self.is_connected:
            self._pending = []
            self._pending_data_size = 0
        await super().close()

    async def subscribe_direct(self, subject: str, deliver: Deliver) -> Subscription:
        """Subscribe `deliver` to `subject`, called in the read loop, so it must not block.

        The subscription is nats-py's own, renewed after a reconnect as the others are;
        `unsubscribe()` it to stop. What `deliver` raises goes to the error callback.
        """
        sub = await self.subscribe(subject)
        self._direct[sub._id] = deliver
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        deliver = self._direct.get(sid)
        if deliver is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            hdrs = await self._process_headers(headers) if headers else None
            deliver(subject, reply, data, hdrs)
        except Exception as exc:  # as nats-py treats a failing subscription callback
            await self._error_cb(exc)

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


#: How long closing a client whose first connect failed may take (nothing is left to flush).
_CLOSE_FAILED_S = 0.5


async def connect(
    config: NATSConfig, events: ConnectionEvents, name: str | None, *, keep_trying: bool = False
) -> Client:
    """A connected client; raises `ConnectionFailed` naming the server and the cause.

    The first connect fails within `connect_timeout`, as the Go client's does; the configured
    reconnect settings apply once connected. Credential and TLS files are checked first: one
    that cannot be read, or a creds file whose JWT has expired, fails before any attempt.

    With `keep_trying` (the bus has an outbox), a client reconnects forever, and when no
    server answers the first connect it is returned unconnected: it goes on connecting in the
    background (`events.connecting`). A server that refuses the credentials or TLS still
    raises.
    """
    try:
        servers, options = security_options(config)
    except Refused as exc:
        raise ConnectionFailed(f"cannot connect to NATS at {events.url}: {exc}") from None
    options.update(
        name=name,
        connect_timeout=config.connect_timeout,
        disconnected_cb=events.disconnected,
        reconnected_cb=events.reconnected,
        error_cb=events.error,
        closed_cb=events.closed,
    )
    nc = Client()
    try:
        with anyio.fail_after(config.connect_timeout):
            await nc.connect(
                servers,
                # nats-py would otherwise retry the first connect per the reconnect settings
                # (forever for 0 or -1).
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                **options,
            )
    except anyio.get_cancelled_exc_class():
        # Cancelled (the worker stopped while the server does not answer): close the socket.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_FAILED_S):
            await nc.close()
        raise
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        # After a failed TLS handshake nats-py's close() waits forever for a socket the TLS
        # layer already closed (a tls:// worker hung here): bound it.
        with anyio.move_on_after(_CLOSE_FAILED_S):
            await nc.close()
        cause = _cause(exc, events.first_errors, config, options)
        failure = ConnectionFailed(f"cannot connect to NATS at {events.url}: {cause}")
        if not keep_trying or _refused(exc, events.first_errors):
            raise failure from None
        log.warning("%s; connecting in the background, events wait in the outbox", failure)
        nc = Client()
        events.connecting = asyncio.create_task(
            nc.connect(
                servers,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=config.reconnect_wait,  # type: ignore[arg-type]  # float works
                **options,
            )
        )
        return nc
    # Once connected, reconnect as configured (nats-py: 0 attempts would mean forever).
    nc.options["allow_reconnect"] = keep_trying or config.max_reconnect_attempts != 0
    nc.options["max_reconnect_attempts"] = -1 if keep_trying else config.max_reconnect_attempts
    nc.options["reconnect_time_wait"] = config.reconnect_wait
    return nc


def _refused(exc: BaseException, errors: list[BaseException]) -> bool:
    """Whether a server answered the first connect and refused it (credentials, TLS)."""
    return any(
        isinstance(error, nats.errors.AuthorizationError | ssl.SSLError)
        or "authorization violation" in str(error).lower()
        for error in (*errors, exc)
    )


def _cause(
    exc: BaseException, errors: list[BaseException], config: NATSConfig, options: dict[str, Any]
) -> str:
    """Why the first connect failed, in words: the server's refusal before a reset socket."""
    for error in (*errors, exc):
        if isinstance(error, nats.errors.AuthorizationError) or (
            "authorization violation" in str(error).lower()
        ):
            return f"authorization violation: the server refused {credentials(config, options)}"
    first = (
        " (does the server expect the TLS handshake first? unset tls_handshake_first)"
        if config.tls_handshake_first
        else ""
    )
    for error in (exc, *reversed(errors)):
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS: the server's certificate is not trusted: {error.verify_message}"
        if isinstance(error, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(error.reason):
            return "TLS: the server requires a client certificate (tls_cert_file and tls_key_file)"
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake failed: {error.reason or describe(error)}{first}"
    cause = errors[-1] if errors and not isinstance(exc, OSError) else exc
    if isinstance(cause, TimeoutError):
        return f"no answer within {config.connect_timeout:g}s{first}"
    if isinstance(cause, ConnectionError) and config.uses_tls and not config.tls_cert_file:
        # A TLS 1.3 server refuses a missing client certificate after the handshake: the
        # client may only see the connection end.
        hint = " (does the server require a client certificate? tls_cert_file, tls_key_file)"
        return describe(cause) + hint
    return describe(cause)
