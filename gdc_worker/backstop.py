"""The dead-letter backstop: a record for every message a consumer's MaxDeliver gave up on.

A consumer with a server-side delivery limit (a Go service's `MaxDeliver: 3`, say) drops a
message after that many deliveries, and JetStream only says so in a core-NATS advisory on
`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`. The backstop captures those
advisories in a small stream of their own (`<stream_name>_ADVISORIES`, kept a day) and
consumes them through one durable consumer that every worker of the deployment shares, so each
advisory is handled by one replica. Each one becomes a dead-letter record of the original message
(read back by its stream sequence), with the record id of the worker's own records
(`<stream>:<seq>:<consumer>`): a failure recorded twice within the dead-letter stream's duplicate
window is stored once. A worker's own consumers have no server-side limit, so the advisories come
from the other services.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import msgspec

from .bus.admin import StreamSpec
from .errors import ConfigError, GDCWorkerError, describe
from .runner import ConsumerLoop
from .subjects import safe_name

if TYPE_CHECKING:
    from .bus import NATSEventBus
    from .bus.pull import Delivery
    from .config import NATSConfig
    from .dlq import DeadLetterQueue

__all__ = [
    "ADVISORY_PREFIX",
    "Backstop",
    "MaxDeliverAdvisory",
    "advisory_stream_name",
    "backstop_durable",
]

log = logging.getLogger(__name__)

#: The subjects of JetStream's max-deliveries advisories: `<prefix>.<stream>.<consumer>`.
ADVISORY_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
#: The type of those advisories.
ADVISORY_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"
#: How long the advisory stream keeps an advisory (s): they are recorded within seconds.
ADVISORY_MAX_AGE_S = 24 * 3600.0
#: The handler name of a record the backstop writes: the server gave up, not a handler.
SERVER_HANDLER = "(server)"
#: How long a recording that failed waits before its advisory comes back (s).
RETRY_DELAY_S = 5.0
#: Advisories recorded at once per worker: plenty for something that should be rare.
CONCURRENCY = 4
#: The advisory consumer's ack wait (s): recording takes milliseconds.
ACK_WAIT_S = 30.0


def advisory_stream_name(config: NATSConfig) -> str:
    """The stream that keeps the advisories of the event stream: its name + `_ADVISORIES`.

    One per event stream, since it captures that stream's advisories only (several event
    streams may share one dead-letter stream). Raises `ConfigError` when that name is the
    dead-letter stream's.
    """
    name = f"{config.stream_name}_ADVISORIES"  # valid: the suffix adds no forbidden character
    if name == config.dlq_stream_name:
        raise ConfigError(
            f"dlq_stream_name: {config.dlq_stream_name!r} is the name of the backstop's "
            f"advisory stream for stream_name {config.stream_name!r}; change either"
        )
    return name


def backstop_durable(config: NATSConfig) -> str:
    """The consumer of the advisory stream that every worker on the event stream shares."""
    return f"gdc-dlq-backstop-{safe_name(config.stream_name)}"


class MaxDeliverAdvisory(msgspec.Struct, kw_only=True):
    """JetStream's `io.nats.jetstream.advisory.v1.max_deliver`: a consumer gave up on a message.

    `deliveries` is how often the consumer delivered it; unknown fields are ignored.
    """

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int
    type: str = ADVISORY_TYPE
    id: str = ""
    timestamp: datetime | None = None


_advisory_decoder = msgspec.json.Decoder(MaxDeliverAdvisory)


@dataclass(frozen=True)
class _Original:
    """The message an advisory names, as a `FailedMessage` for `DeadLetterQueue.record`."""

    stream: str
    stream_seq: int
    subject: str
    deliveries: int
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Backstop(ConsumerLoop):
    """Turns max-deliveries advisories of the event stream into dead-letter records.

    `prepare()` sets up the advisory stream and the shared consumer; `run()` works until
    `stop()` (or `force()`). Recording an advisory is idempotent, so one handed back or
    redelivered does no harm.
    """

    def __init__(self, bus: NATSEventBus, dlq: DeadLetterQueue) -> None:
        config = bus.config
        self.stream = advisory_stream_name(config)
        self.events_stream = config.stream_name
        self.subject = f"{ADVISORY_PREFIX}.{config.stream_name}.*"
        #: Shared by every worker on this event stream: each advisory goes to one of them.
        self.durable = backstop_durable(config)
        consumer = bus.pull_consumer(self.durable, capacity=2 * CONCURRENCY, stream=self.stream)
        super().__init__(bus, consumer, CONCURRENCY, ACK_WAIT_S)
        self._dlq = dlq
        self._process = self._record

    async def prepare(self) -> None:
        """Create or update the advisory stream and the shared consumer, then start pulling."""
        try:
            await self._bus.ensure_stream(
                StreamSpec(
                    self.stream,
                    (self.subject,),
                    max_age=ADVISORY_MAX_AGE_S,
                    replicas=self._bus.config.replicas,
                )
            )
            await self._bus.ensure_consumer(
                self.durable,
                self.subject,
                ack_wait=ACK_WAIT_S,
                max_deliver=-1,  # an advisory we fail to record comes back until it is
                stream=self.stream,
            )
        except BaseException:
            await self._forget()
            raise
        await self._start()
        log.info(
            "dead-letter backstop: max-deliveries advisories of %s kept in %s, consumer %s",
            self.events_stream,
            self.stream,
            self.durable,
        )

    async def _record(self, delivery: Delivery) -> None:
        try:
            advisory = _advisory_decoder.decode(delivery.data)
        except msgspec.DecodeError as exc:
            # Not ours to keep: something else published on the advisory subject.
            log.error(
                "backstop: %s #%d on %s is not a max-deliveries advisory (%s); dropped",
                self.stream,
                delivery.stream_seq,
                delivery.subject,
                exc,
            )
            await delivery.term("not a max-deliveries advisory")
            return
        self._running += 1
        try:
            with anyio.CancelScope(shield=True):  # a record half-written is written again: fine
                entry_id = await self.record(advisory)
        except GDCWorkerError as exc:
            log.error(
                "backstop: cannot record that %s gave up on %s #%d (%s); trying again in %gs",
                advisory.consumer,
                advisory.stream,
                advisory.stream_seq,
                describe(exc),
                RETRY_DELAY_S,
            )
            await delivery.nak(RETRY_DELAY_S)
            return
        finally:
            self._running -= 1
        await delivery.ack()
        log.error(
            "backstop: %s #%d, given up by %s after %d deliveries, dead-lettered as #%d",
            advisory.stream,
            advisory.stream_seq,
            advisory.consumer,
            advisory.deliveries,
            entry_id,
        )

    async def record(self, advisory: MaxDeliverAdvisory) -> int:
        """The dead-letter record of what `advisory` names; returns its id (the first one's,
        when that failure is already recorded). Raises `GDCWorkerError` when it cannot be
        written, or the original cannot be read.

        An original the stream no longer holds (its limits removed it) is recorded without its
        bytes, the reason saying so.
        """
        reason = (
            f"the server stopped redelivering after {advisory.deliveries} deliveries "
            f"to {advisory.consumer}"
        )
        stored = await self._bus.get_message(advisory.stream, advisory.stream_seq)
        if stored is None:
            reason += f"; the message is gone from {advisory.stream}, only its sequence is known"
            original = _Original(advisory.stream, advisory.stream_seq, "", advisory.deliveries)
        else:
            original = _Original(
                advisory.stream,
                advisory.stream_seq,
                stored.subject,
                advisory.deliveries,
                stored.data,
                dict(stored.headers),
            )
        return await self._dlq.record(
            reason=reason,
            consumer=advisory.consumer,
            handler=SERVER_HANDLER,
            delivery=original,
            error=None,
        )
