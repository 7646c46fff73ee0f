"""Prometheus metrics: `Metrics`, a hook counting what the runner and the bus report, and
`ConsumerGauges`, the consumers' lag as JetStream reports it, read every few seconds.

Every name starts with `gdc_worker_`; labels are bounded (app, handler, consumer, outcome,
result), never an event id. Under `--processes` the replicas write their counters to a shared
directory (prometheus-client's multiprocess mode) and the supervisor serves their sum; the
consumer gauges are read once for the group, so each has one value, not one per replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .bus import NATSEventBus
from .errors import GDCWorkerError
from .hooks import Hook
from .settle import Ack, DeadLetter, Decision, Nak

if TYPE_CHECKING:
    from .app import HandlerSpec
    from .bus.pull import Delivery
    from .bus.state import ConsumerState
    from .config import NATSConfig
    from .events import Event
    from .outbox import OutboxStats

__all__ = ["CONSUMER_POLL_S", "ConsumerGauges", "Metrics", "watch_consumers", "watch_outbox"]

log = logging.getLogger(__name__)

#: How often the consumer gauges are read from JetStream.
CONSUMER_POLL_S = 5.0
#: Handler durations, in seconds: from a fast in-memory handler to one near a 30 s ack_wait.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Publish latencies, in seconds: an ack on loopback, to a publish riding out an election.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_OUTCOMES = (Ack.outcome, Nak.outcome, DeadLetter.outcome)
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics(Hook):
    """The worker's metrics, for the app `app`, in `registry` (a new one by default).

    Register it as a hook (`gdc-worker run --metrics-port` does); every metric of one handler
    starts at 0 once the worker is ready, so rates and alerts need no first event.
    """

    def __init__(self, app: str, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self.registry = registry or CollectorRegistry()
        handler = ["app", "handler"]
        r = self.registry
        self.deliveries = Counter(
            "gdc_worker_deliveries",
            "Deliveries settled, by outcome: acked, nakd (redelivered later) or dead_lettered.",
            [*handler, "consumer", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "gdc_worker_handler_retries",
            "In-process attempts of a handler after the first, within one delivery.",
            handler,
            registry=r,
        )
        self.redeliveries = Counter(
            "gdc_worker_redeliveries",
            "Deliveries of an event this consumer had delivered before (count above 1).",
            handler,
            registry=r,
        )
        self.duration = Histogram(
            "gdc_worker_handler_duration_seconds",
            "Time of one handler call (one attempt).",
            handler,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gdc_worker_handlers_in_flight",
            "Handler calls running now.",
            handler,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.publishes = Counter(
            "gdc_worker_publishes",
            "Event publishes, by result: stored, duplicate (stored before), queued (in the "
            "outbox) or failed.",
            ["app", "result"],
            registry=r,
        )
        self.publish_duration = Histogram(
            "gdc_worker_publish_duration_seconds",
            "Time from sending an event to its JetStream ack (or failure).",
            ["app"],
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.connected = Gauge(
            "gdc_worker_connected",
            "1 while connected to NATS, else 0 (the lowest of the replicas).",
            ["app"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.reconnects = Counter(
            "gdc_worker_reconnects", "Reconnections to NATS after a drop.", ["app"], registry=r
        )
        self.breaker_state = Gauge(
            "gdc_worker_breaker_state",
            "A handler's circuit breaker: 0 closed, 1 half open, 2 open (the highest replica).",
            handler,
            multiprocess_mode="livemax",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "gdc_worker_breaker_transitions",
            "Changes of a handler's circuit breaker, by the state entered.",
            [*handler, "state"],
            registry=r,
        )
        self.outbox_events = Gauge(
            "gdc_worker_outbox_events",
            "Events waiting in the publish outbox for NATS.",
            ["app"],
            multiprocess_mode="livemax",  # replicas share the file: each sees the same totals
            registry=r,
        )
        self.outbox_bytes = Gauge(
            "gdc_worker_outbox_bytes",
            "Bytes the publish outbox holds.",
            ["app"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.outbox_age = Gauge(
            "gdc_worker_outbox_oldest_age_seconds",
            "Age of the oldest event in the publish outbox, 0 when it is empty.",
            ["app"],
            multiprocess_mode="livemax",
            registry=r,
        )
        #: Attempts so far of each delivery being handled, by consumer, sequence and count.
        self._attempts: dict[tuple[str, int, int], int] = {}

    def worker_ready(self, app: str, handlers: Sequence[HandlerSpec]) -> None:
        for spec in handlers:
            for outcome in _OUTCOMES:
                self.deliveries.labels(self.app, spec.name, spec.durable, outcome)
            self.retries.labels(self.app, spec.name)
            self.redeliveries.labels(self.app, spec.name)
            self.in_flight.labels(self.app, spec.name).set(0)
        for result in ("stored", "duplicate", "queued", "failed"):
            self.publishes.labels(self.app, result)
            if spec.breaker is not None:
                self.breaker_state.labels(self.app, spec.name).set(0)
        self.reconnects.labels(self.app)
        self.connected.labels(self.app).set(1)

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        if delivery.deliveries > 1:
            self.redeliveries.labels(self.app, handler.name).inc()

    def call_started(self, handler: HandlerSpec, delivery: Delivery, event: Event) -> None:
        key = (handler.durable, delivery.stream_seq, delivery.deliveries)
        attempts = self._attempts.get(key, 0)
        if attempts:
            self.retries.labels(self.app, handler.name).inc()
        self._attempts[key] = attempts + 1
        self.in_flight.labels(self.app, handler.name).inc()

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self.in_flight.labels(self.app, handler.name).dec()
        self.duration.labels(self.app, handler.name).observe(duration_s)

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        self._attempts.pop((handler.durable, delivery.stream_seq, delivery.deliveries), None)
        self.deliveries.labels(self.app, handler.name, handler.durable, decision.outcome).inc()

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self.publishes.labels(self.app, outcome).inc()
        self.publish_duration.labels(self.app).observe(duration_s)

    def connection_changed(self, connected: bool) -> None:
        self.connected.labels(self.app).set(1 if connected else 0)
        if connected:
            self.reconnects.labels(self.app).inc()

    def breaker_changed(self, handler: HandlerSpec, state: str) -> None:
        self.breaker_state.labels(self.app, handler.name).set(_BREAKER_STATES[state])
        self.breaker_transitions.labels(self.app, handler.name, state).inc()

    def observe_outbox(self, stats: OutboxStats) -> None:
        """Set the outbox gauges from `Outbox.stats()`."""
        self.outbox_events.labels(self.app).set(stats.events)
        self.outbox_bytes.labels(self.app).set(stats.bytes)
        self.outbox_age.labels(self.app).set(stats.oldest_age_s or 0.0)

    def worker_stopping(self, app: str) -> None:
        self._attempts.clear()  # deliveries handed back on a forced stop are never settled


_CONSUMER_GAUGES = (
    ("pending", "Messages the consumer has not delivered yet (num_pending)."),
    ("ack_pending", "Messages delivered and not acked yet (num_ack_pending)."),
    ("redelivered", "Messages delivered more than once and not acked yet."),
    ("waiting", "Pull requests waiting at the server."),
    ("oldest_unacked_age_seconds", "Age of the oldest message not acked yet, 0 when none."),
)


class ConsumerGauges(Collector):
    """`gdc_worker_consumer_*{consumer}` from the last consumer states read (`update`).

    A collector, not gauges: it holds one reading for the whole process (or supervised group),
    and a consumer that disappears stops being reported.
    """

    def __init__(self) -> None:
        self._states: list[ConsumerState] = []

    def update(self, states: Iterable[ConsumerState]) -> None:
        """Report these readings from now on."""
        self._states = list(states)

    def collect(self) -> Iterator[Metric]:
        states = self._states
        for field, text in _CONSUMER_GAUGES:
            family = GaugeMetricFamily(f"gdc_worker_consumer_{field}", text, labels=["consumer"])
            for state in states:
                value = (
                    state.oldest_unacked_age_s
                    if field.startswith("oldest")
                    else getattr(state, field)
                )
                family.add_metric([state.name], float(value))
            yield family


async def watch_consumers(
    config: NATSConfig,
    durables: Sequence[str],
    gauges: ConsumerGauges,
    interval: float = CONSUMER_POLL_S,
) -> None:
    """Read the states of `durables` every `interval` seconds into `gauges`, until cancelled.

    On its own connection, through the JetStream API (the consumer leader answers; followers'
    num_pending is stale). A reading that fails is logged once until one succeeds again; the
    gauges then keep their last values.
    """
    wanted = set(durables)
    failing = False
    bus: NATSEventBus | None = None
    try:
        while True:
            try:
                if bus is None:
                    bus = await NATSEventBus.connect(
                        config, name="gdc-worker:metrics", setup_stream=False
                    )
                states = await bus.consumer_states()
            except GDCWorkerError as exc:
                if not failing:
                    log.warning("consumer metrics not updated: %s (trying again)", exc)
                failing = True
            else:
                gauges.update(s for s in states if s.name in wanted)
                failing = False
            await anyio.sleep(interval)
    finally:
        if bus is not None:
            with anyio.CancelScope(shield=True):
                await bus.close()


async def watch_outbox(
    stats: Callable[[], OutboxStats | None], metrics: Metrics, interval: float = 1.0
) -> None:
    """Copy `stats()` (the worker's outbox, None while it has none) into `metrics` every
    `interval` seconds, until cancelled. The stats are kept in memory: reading costs no I/O."""
    while True:
        current = stats()
        if current is not None:
            metrics.observe_outbox(current)
        await anyio.sleep(interval)
