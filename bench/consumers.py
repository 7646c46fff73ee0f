"""One consumer implementation, run in its own process so its time and peak memory are its own.

    python -m bench.consumers gdc|raw|faststream --url URL --stream S --subject-prefix P \
        --durable D --n N [--fail-ratio 0.1]

Consumes until N events were handled (each decoded as an `Event`), then prints one JSON line:
{"elapsed": seconds from the first handled event to the N-th, "startup": seconds from the start
(connect, set-up) to the first, "peak_rss_kb": ...}. Throughput is N / elapsed: the same
steady-state measure for every implementation, whatever each spends on starting up.
With `--fail-ratio`, that share of events fails once (nak, no delay) before succeeding.
The pipeline implementations (`*-pipeline*`) turn each pin.requested into one stored
plan.ready (`output_for`) before acking it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Context,
    Decision,
    Delivery,
    Event,
    HandlerSpec,
    Hook,
    NATSConfig,
    PinRequestedEvent,
    Retry,
    Worker,
)
from gdc_worker.events import event_headers

#: The event type an implementation's consumer filters on, where it is not every type (">"):
#: a typed handler takes one type (the bench's events are all pin.requested), and a pipeline
#: does not consume its own outputs.
FILTERS = {
    "gdc-typed": "pin.requested",
    "gdc-pipeline": "pin.requested",
    "raw-pipeline-async": "pin.requested",
    "raw-pipeline-sync": "pin.requested",
}
#: The type of what a pipeline publishes for each event it consumes.
OUTPUT_TYPE = "plan.ready"


#: The bench's streams' duplicate window (`bench.run.Bench.fresh_stream`); no other limits.
DUPLICATE_WINDOW_S = 120


def bench_config(url: str, stream: str, prefix: str) -> NATSConfig:
    """gdc-worker's configuration for a bench stream: its limits as the stream has them, so
    that the bus finds nothing to warn about."""
    return NATSConfig(
        url=url,
        stream_name=stream,
        stream_subjects=(f"{prefix}>",),
        max_age=0,
        max_bytes=0,
        max_msgs=0,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


def output_for(event: Event) -> Event:
    """The event a pipeline publishes for `event`: its id derived from the input's, so a
    redelivery publishes the same one again and the stream drops the duplicate."""
    return msgspec.structs.replace(event, id=f"{event.id}-plan", type=OUTPUT_TYPE)


class Progress:
    """Counts handled events and notes when the N-th one was handled."""

    def __init__(self, n: int, fail_ratio: float) -> None:
        self.n = n
        self.handled = 0
        self.done = anyio.Event()
        self.first_at = 0.0
        self.finished_at = 0.0
        self._fail_below = int(fail_ratio * 1000)

    def fails_first(self, event_id: str) -> bool:
        """Whether this event is one of the `fail_ratio` share that fails its first delivery."""
        return zlib.crc32(event_id.encode()) % 1000 < self._fail_below

    def handled_one(self) -> None:
        self.handled += 1
        if self.handled == 1:
            self.first_at = time.perf_counter()
        if self.handled == self.n:
            self.finished_at = time.perf_counter()
            self.done.set()


class Noop(Hook):
    """A hook at every point of a delivery that does nothing: the cost of the seam itself."""

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        pass

    def call_started(self, handler: HandlerSpec, delivery: Delivery, event: Event) -> None:
        pass

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        pass

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        pass


async def run_gdc_hooked(args: argparse.Namespace, progress: Progress) -> None:
    """`run_gdc` with a no-op hook at every delivery point."""
    await run_gdc(args, progress, hooks=[Noop()])


async def run_gdc_traced(args: argparse.Namespace, progress: Progress) -> None:
    """`run_gdc` with `Tracing` on an SDK tracer provider that records spans and exports none:
    what the spans cost, without an exporter's."""
    from opentelemetry.sdk.trace import TracerProvider

    from gdc_worker.tracing import Tracing

    await run_gdc(args, progress, hooks=[Tracing(TracerProvider())])


async def run_gdc_metrics(args: argparse.Namespace, progress: Progress) -> None:
    """`run_gdc` with the Prometheus metrics hook that `gdc-worker run --metrics-port` adds."""
    from gdc_worker.metrics import Metrics

    await run_gdc(args, progress, hooks=[Metrics("bench")])


async def run_gdc_typed(args: argparse.Namespace, progress: Progress) -> None:
    """`run_gdc` with a handler annotated `PinRequestedEvent`: the data is decoded for it."""
    await run_gdc(args, progress, typed=True)


async def run_gdc_pipeline(args: argparse.Namespace, progress: Progress) -> None:
    """`run_gdc` with a handler that publishes one event per event, with `ctx.publish`."""
    await run_gdc(args, progress, pipeline=True)


async def run_gdc(
    args: argparse.Namespace,
    progress: Progress,
    hooks: Sequence[Hook] = (),
    typed: bool = False,
    pipeline: bool = False,
) -> None:
    """gdc-worker's runner with default settings and a no-op handler."""
    config = bench_config(args.url, args.stream, args.subject_prefix)
    app = App("bench", config, hooks=hooks)

    if args.fail_ratio:

        @app.on(">", durable=args.durable)
        async def failing_once(event: Event, ctx: Context) -> None:
            if ctx.deliveries == 1 and progress.fails_first(event.id):
                raise Retry(delay=0)
            progress.handled_one()

    elif pipeline:

        @app.on(FILTERS["gdc-pipeline"], durable=args.durable)
        async def schedule(event: Event, ctx: Context) -> None:
            await ctx.publish(output_for(event))
            progress.handled_one()

    elif typed:

        @app.on(FILTERS["gdc-typed"], durable=args.durable)
        async def plan(pin: PinRequestedEvent) -> None:
            progress.handled_one()

    else:

        @app.on(">", durable=args.durable)
        async def handle(event: Event) -> None:
            progress.handled_one()

    worker = Worker(app)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await progress.done.wait()
        worker.stop()


async def run_raw(args: argparse.Namespace, progress: Progress) -> None:
    """A hand-written nats-py durable pull loop: fetch(batch=100), decode, ack."""

    async def batch(js: JetStreamContext, msgs: list[Msg]) -> None:
        for msg in msgs:
            event = Event.from_json(msg.data)
            if (
                args.fail_ratio
                and msg.metadata.num_delivered == 1
                and progress.fails_first(event.id)
            ):
                await msg.nak()
                continue
            await msg.ack()
            progress.handled_one()

    await _raw_loop(args, progress, batch)


async def run_raw_pipeline_async(args: argparse.Namespace, progress: Progress) -> None:
    """A hand-written nats-py pipeline: fetch(batch=100), publish_async one output per
    message, one gather of the batch's publish acks, then ack the batch."""

    async def batch(js: JetStreamContext, msgs: list[Msg]) -> None:
        acks = []
        for msg in msgs:
            output = output_for(Event.from_json(msg.data))
            subject, data, headers = _publish_args(args, output)
            acks.append(await js.publish_async(subject, data, headers=headers))
        await asyncio.gather(*acks)
        for msg in msgs:
            await msg.ack()
            progress.handled_one()

    await _raw_loop(args, progress, batch)


async def run_raw_pipeline_sync(args: argparse.Namespace, progress: Progress) -> None:
    """A hand-written nats-py pipeline: fetch(batch=100), then for each message `await
    js.publish` of its output (its ack) before acking it."""

    async def batch(js: JetStreamContext, msgs: list[Msg]) -> None:
        for msg in msgs:
            output = output_for(Event.from_json(msg.data))
            subject, data, headers = _publish_args(args, output)
            await js.publish(subject, data, headers=headers)
            await msg.ack()
            progress.handled_one()

    await _raw_loop(args, progress, batch)


def _publish_args(args: argparse.Namespace, event: Event) -> tuple[str, bytes, dict[str, str]]:
    return args.subject_prefix + event.type, event.to_json(), event_headers(event)


async def _raw_loop(
    args: argparse.Namespace,
    progress: Progress,
    batch: Callable[[JetStreamContext, list[Msg]], Awaitable[None]],
) -> None:
    """The raw consumers' loop: fetch(batch=100) from the durable, `batch` each, until done."""
    nc = await nats.connect(args.url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(args.durable, args.stream)
    while not progress.done.is_set():
        try:
            msgs = await sub.fetch(batch=100, timeout=5)
        except nats.errors.TimeoutError:
            continue
        await batch(js, msgs)
    await nc.drain()


async def run_faststream(args: argparse.Namespace, progress: Progress) -> None:
    """FastStream's NatsBroker JetStream pull subscriber (batch 100) doing the same work."""
    from faststream.nats import JStream, NatsBroker, PullSub
    from faststream.nats.annotations import NatsMessage

    broker = NatsBroker(args.url, logger=None)  # no per-message log lines, as for the others

    @broker.subscriber(
        f"{args.subject_prefix}>",
        stream=JStream(name=args.stream, declare=False),
        durable=args.durable,
        pull_sub=PullSub(batch_size=100),
    )
    async def handle(body: dict[str, Any], msg: NatsMessage) -> None:
        # FastStream has already parsed the JSON; validating it as an Event is the same work.
        event = msgspec.convert(body, Event)
        first = args.fail_ratio and msg.raw_message.metadata.num_delivered == 1
        if first and progress.fails_first(event.id):
            await msg.nack()
            return
        progress.handled_one()

    await broker.start()
    await progress.done.wait()
    await broker.stop()


IMPLEMENTATIONS: dict[str, Callable[[argparse.Namespace, Progress], Any]] = {
    "gdc": run_gdc,
    "gdc-hooked": run_gdc_hooked,
    "gdc-traced": run_gdc_traced,
    "gdc-metrics": run_gdc_metrics,
    "gdc-typed": run_gdc_typed,
    "gdc-pipeline": run_gdc_pipeline,
    "raw": run_raw,
    "raw-pipeline-async": run_raw_pipeline_async,
    "raw-pipeline-sync": run_raw_pipeline_sync,
    "faststream": run_faststream,
}


def peak_rss_kb() -> int:
    """This process's peak resident memory (VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("impl", choices=sorted(IMPLEMENTATIONS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject-prefix", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    args = parser.parse_args()
    progress = Progress(args.n, args.fail_ratio)
    started = time.perf_counter()
    anyio.run(IMPLEMENTATIONS[args.impl], args, progress)
    figures = {
        "elapsed": progress.finished_at - progress.first_at,
        "startup": progress.first_at - started,
        "peak_rss_kb": peak_rss_kb(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
