"""Prometheus metrics: `Metrics`, a hook counting what the runner and the bus report, and
`ConsumerGauges`, the consumers' lag as JetStream reports it, read every few seconds.

Every name starts with `gdc_worker_`; labels are bounded (app, handler, consumer, outcome,
result, state), never an event id. The hook counts in plain numbers on the event loop, which
costs a few attribute updates per delivery, and builds the metric families only when scraped.
Under `--processes` each replica writes its `snapshot()` to a file every second and the
supervisor serves their sum (`families` over all snapshots): counters and histograms over every
replica that ran, gauges over the live ones; the consumer gauges are read once for the group,
so each has one value, not one per replica.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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

__all__ = [
    "CONSUMER_POLL_S",
    "ConsumerGauges",
    "Metrics",
    "Snapshot",
    "families",
    "watch_consumers",
    "watch_outbox",
]

log = logging.getLogger(__name__)

#: How often the consumer gauges are read from JetStream.
CONSUMER_POLL_S = 5.0
#: Handler durations, in seconds: from a fast in-memory handler to one near a 30 s ack_wait.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Publish latencies, in seconds: an ack on loopback, to a publish riding out an election.
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_OUTCOMES = (Ack.outcome, Nak.outcome, DeadLetter.outcome)
_RESULTS = ("stored", "duplicate", "queued", "failed")
_BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
#: The bucket of an observation: read once here, not as two lookups at every handler call.
_bucket = bisect.bisect_left

#: What one process counted, as `Metrics.snapshot()` gives it (JSON-compatible).
Snapshot = dict[str, Any]


class _Histogram:
    """Observations counted per bucket (the last one: above every bound), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class _Handler:
    """One handler's counts."""

    __slots__ = (
        "breaker_state",
        "breaker_transitions",
        "consumer",
        "deliveries",
        "duration",
        "redeliveries",
        "retries",
    )

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.deliveries = dict.fromkeys(_OUTCOMES, 0)
        self.retries = 0
        self.redeliveries = 0
        self.duration = _Histogram(DURATION_BUCKETS)
        self.breaker_state: int | None = None  # no breaker
        self.breaker_transitions = dict.fromkeys(_BREAKER_STATES, 0)

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "deliveries": dict(self.deliveries),
            "retries": self.retries,
            "redeliveries": self.redeliveries,
            "in_flight": in_flight,
            "duration": self.duration.snapshot(),
            "breaker_state": self.breaker_state,
            "breaker_transitions": dict(self.breaker_transitions),
        }


class Metrics(Hook, Collector):
    """The metrics of the app `app`: a hook that counts, and a collector of what it counted.

    Register it as a hook (`gdc-worker run --metrics-port` does) and serve `registry`, where it
    is registered. Every metric of a handler starts at 0 once the worker is ready, so rates and
    alerts need no first event. The calls in flight are read when scraped from what
    `read_in_flight()` is given (the worker's `in_flight`; 0 without it): counting them at
    each call would take a hook call more per delivery.
    """

    def __init__(self, app: str, registry: CollectorRegistry | None = None) -> None:
        self.app = app
        self._handlers: dict[str, _Handler] = {}
        self._publishes = dict.fromkeys(_RESULTS, 0)
        self._publish_duration = _Histogram(PUBLISH_BUCKETS)
        self._connected = 0
        self._reconnects = 0
        self._dropped = False  # the connection dropped since it was last up
        self._outbox: OutboxStats | None = None
        #: Deliveries between a failed attempt and their settlement: the next call is a retry.
        self._failed: set[Delivery] = set()
        self._in_flight: Callable[[], Mapping[str, int]] = dict
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)

    def _of(self, handler: HandlerSpec) -> _Handler:
        counts = self._handlers.get(handler.name)
        if counts is None:
            counts = self._handlers[handler.name] = _Handler(handler.durable)
            if handler.breaker is not None:
                counts.breaker_state = 0
        return counts

    def read_in_flight(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Read the handler calls running now from `source()` (by handler name) when scraped;
        it is called from the endpoint's thread."""
        self._in_flight = source

    def worker_ready(self, app: str, handlers: Sequence[HandlerSpec]) -> None:
        for spec in handlers:
            self._of(spec)
        self._connected = 1

    # The two methods below run at every delivery: `_of` only for a handler not seen yet.

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        counts = self._handlers.get(handler.name) or self._of(handler)
        duration = counts.duration  # its observe(), inlined: a call less at every call
        duration.counts[_bucket(duration.bounds, duration_s)] += 1
        duration.sum += duration_s
        if self._failed and delivery in self._failed:  # an attempt after a failed one
            counts.retries += 1
        elif error is not None:
            self._failed.add(delivery)

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        if self._failed:
            self._failed.discard(delivery)
        counts = self._handlers.get(handler.name) or self._of(handler)
        counts.deliveries[decision.outcome] += 1
        if delivery.deliveries > 1:  # counted here: one hook call less per delivery
            counts.redeliveries += 1

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self._publishes[outcome] += 1
        self._publish_duration.observe(duration_s)

    def connection_changed(self, connected: bool) -> None:
        if connected and self._dropped:  # not the first connect of a bus started offline
            self._reconnects += 1
        self._dropped = not connected
        self._connected = 1 if connected else 0

    def breaker_changed(self, handler: HandlerSpec, state: str) -> None:
        counts = self._of(handler)
        counts.breaker_state = _BREAKER_STATES[state]
        counts.breaker_transitions[state] += 1

    def observe_outbox(self, stats: OutboxStats) -> None:
        """Report the outbox's depth from `Outbox.stats()`."""
        self._outbox = stats

    def snapshot(self) -> Snapshot:
        """Everything counted so far, for the supervisor of a group to add up."""
        outbox = self._outbox
        in_flight = self._in_flight()
        return {
            "app": self.app,
            "handlers": {
                name: counts.snapshot(in_flight.get(name, 0))
                for name, counts in self._handlers.items()
            },
            "publishes": dict(self._publishes),
            "publish_duration": self._publish_duration.snapshot(),
            "connected": self._connected,
            "reconnects": self._reconnects,
            "outbox": None if outbox is None else list(outbox),
        }

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot()
        return families([snapshot], [snapshot])


def families(every: Iterable[Snapshot], live: Iterable[Snapshot]) -> Iterator[Metric]:
    """The metric families of the snapshots of one app's processes: counters and histograms
    summed over `every` process that ran, gauges over the `live` ones."""
    every, live = list(every), list(live)
    if not every:
        return
    app = every[0]["app"]
    handler = ["app", "handler"]
    deliveries = CounterMetricFamily(
        "gdc_worker_deliveries",
        "Deliveries settled, by outcome: acked, nakd (redelivered later) or dead_lettered.",
        labels=[*handler, "consumer", "outcome"],
    )
    retries = CounterMetricFamily(
        "gdc_worker_handler_retries",
        "In-process attempts of a handler after the first, within one delivery.",
        labels=handler,
    )
    redeliveries = CounterMetricFamily(
        "gdc_worker_redeliveries",
        "Deliveries of an event this consumer had delivered before (count above 1).",
        labels=handler,
    )
    duration = HistogramMetricFamily(
        "gdc_worker_handler_duration_seconds",
        "Time of one handler call (one attempt).",
        labels=handler,
    )
    transitions = CounterMetricFamily(
        "gdc_worker_breaker_transitions",
        "Changes of a handler's circuit breaker, by the state entered.",
        labels=[*handler, "state"],
    )
    in_flight = GaugeMetricFamily(
        "gdc_worker_handlers_in_flight",
        "Deliveries being handled now: calls running, or waiting for their outputs.",
        labels=handler,
    )
    breaker = GaugeMetricFamily(
        "gdc_worker_breaker_state",
        "A handler's circuit breaker: 0 closed, 1 half open, 2 open (the highest replica).",
        labels=handler,
    )
    names = sorted({name for snapshot in every for name in snapshot["handlers"]})
    for name in names:
        ran = [s["handlers"][name] for s in every if name in s["handlers"]]
        running = [s["handlers"][name] for s in live if name in s["handlers"]]
        consumer = ran[0]["consumer"]
        for outcome in _OUTCOMES:
            total = sum(h["deliveries"][outcome] for h in ran)
            deliveries.add_metric([app, name, consumer, outcome], total)
        retries.add_metric([app, name], sum(h["retries"] for h in ran))
        redeliveries.add_metric([app, name], sum(h["redeliveries"] for h in ran))
        _add_histogram(duration, [app, name], DURATION_BUCKETS, [h["duration"] for h in ran])
        in_flight.add_metric([app, name], sum(h["in_flight"] for h in running))
        states = [h["breaker_state"] for h in running if h["breaker_state"] is not None]
        if any(h["breaker_state"] is not None for h in ran):
            breaker.add_metric([app, name], max(states, default=0))
            for state in _BREAKER_STATES:
                count = sum(h["breaker_transitions"][state] for h in ran)
                transitions.add_metric([app, name, state], count)
    yield from (deliveries, retries, redeliveries, duration, in_flight, breaker, transitions)

    publishes = CounterMetricFamily(
        "gdc_worker_publishes",
        "Event publishes, by result: stored, duplicate (stored before), queued (in the "
        "outbox) or failed.",
        labels=["app", "result"],
    )
    for result in _RESULTS:
        publishes.add_metric([app, result], sum(s["publishes"][result] for s in every))
    publish_duration = HistogramMetricFamily(
        "gdc_worker_publish_duration_seconds",
        "Time from sending an event to its JetStream ack (or failure).",
        labels=["app"],
    )
    _add_histogram(publish_duration, [app], PUBLISH_BUCKETS, [s["publish_duration"] for s in every])
    connected = GaugeMetricFamily(
        "gdc_worker_connected",
        "1 while connected to NATS, else 0 (the lowest of the replicas).",
        labels=["app"],
    )
    connected.add_metric([app], min((s["connected"] for s in live), default=0))
    reconnects = CounterMetricFamily(
        "gdc_worker_reconnects", "Reconnections to NATS after a drop.", labels=["app"]
    )
    reconnects.add_metric([app], sum(s["reconnects"] for s in every))
    yield from (publishes, publish_duration, connected, reconnects)

    outboxes = [s["outbox"] for s in live if s["outbox"] is not None]
    if outboxes:  # replicas share the file: each sees the same totals
        for index, (field, text) in enumerate(_OUTBOX_GAUGES):
            family = GaugeMetricFamily(f"gdc_worker_outbox_{field}", text, labels=["app"])
            family.add_metric([app], max(o[index] or 0 for o in outboxes))
            yield family


_OUTBOX_GAUGES = (
    ("events", "Events waiting in the publish outbox for NATS."),
    ("bytes", "Bytes the publish outbox holds."),
    ("oldest_age_seconds", "Age of the oldest event in the publish outbox, 0 when it is empty."),
)


def _add_histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    bounds: Sequence[float],
    histograms: list[dict[str, Any]],
) -> None:
    counts = [sum(h["counts"][i] for h in histograms) for i in range(len(bounds) + 1)]
    cumulative, running = [], 0
    for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        running += count
        cumulative.append((bound, running))
    family.add_metric(labels, cumulative, sum_value=sum(h["sum"] for h in histograms))


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
    num_pending is stale). A reading that fails is logged once until one succeeds again, and
    the gauges are not reported meanwhile: a lag that cannot be read is absent (an alert on
    `absent()` or on `gdc_worker_connected` fires), not frozen at its last value.
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
                    log.warning("consumer metrics not read: %s (not reported until read)", exc)
                failing = True
                gauges.update(())
                if bus is not None and not bus.connected:  # maybe closed for good: a new one
                    with anyio.CancelScope(shield=True):
                        await bus.close()
                    bus = None
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
