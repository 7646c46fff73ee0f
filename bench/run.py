"""gdc-worker against raw nats-py and FastStream, every figure measured in the same run.

    python -m bench.run [--n 20000] [--runs 3] [--out bench/results.json]

Starts its own nats-server (file storage, loopback) and gives every measurement a fresh
stream. Reports medians over the runs and the ratios the targets are stated in; fails (exit 1)
if any event was lost or left unacked. A variant of gdc (hooks, a typed handler, metrics, the
ctx.publish pipeline) is measured next to a gdc no-op run of its own, in alternating order,
and its ratio is the median of those pairs (`--pairs` of them per run: a run of 20,000
events lasts a quarter of a second, and the targets are a few percent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from bench.consumers import DUPLICATE_WINDOW_S, FILTERS, OUTPUT_TYPE, bench_config
from gdc_worker import (
    App,
    Event,
    NATSEventBus,
    NATSServer,
    PinRequestedEvent,
    Worker,
    new_pin_requested_event,
)
from gdc_worker.events import event_headers

ROOT = Path(__file__).resolve().parents[1]
_ids = itertools.count(1)


class Lost(Exception):
    """Events were lost or left unacked: the run is invalid."""


def make_events(n: int) -> list[Event]:
    """`n` pin requests with about 200 bytes of data each."""
    return [
        new_pin_requested_event(
            "bench",
            PinRequestedEvent(
                cid=f"QmBench{i:012d}aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                size=1_048_576 + i,
                policies=["rf-3", "zone-msk-nn", "tier-hot"],
                constraints={"priority": "high", "region": "eu-east"},
                priority=1,
                requested_by="bench-user-0001",
            ),
            trace_id=f"trace-{i:08d}",
        )
        for i in range(n)
    ]


class Bench:
    """A nats-server, a raw client for set-up and checks, and a fresh stream per measurement."""

    def __init__(self, url: str, nc: NATS, js: JetStreamContext) -> None:
        self.url = url
        self.nc = nc
        self.js = js

    async def fresh_stream(self) -> tuple[str, str]:
        """A new stream; returns (name, subject prefix)."""
        n = next(_ids)
        name, prefix = f"BENCH{n}", f"bench{n}.events."
        await self.js.add_stream(
            StreamConfig(
                name=name,
                subjects=[prefix + ">"],
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_S,
            )
        )
        return name, prefix

    async def count(self, stream: str, subject: str) -> int:
        """How many messages `stream` holds on `subject`."""
        info = await self.js.stream_info(stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())

    async def drop(self, stream: str) -> None:
        await self.js.delete_stream(stream)

    async def fill(self, stream: str, prefix: str, events: list[Event]) -> None:
        """Store `events` (async publishes, then wait for every ack)."""
        acks: list[asyncio.Future[Any]] = []
        for event in events:
            acks.append(
                await self.js.publish_async(
                    prefix + event.type, event.to_json(), headers=event_headers(event)
                )
            )
        await asyncio.gather(*acks)
        info = await self.js.stream_info(stream)
        if info.state.messages != len(events):
            raise Lost(f"{stream} holds {info.state.messages} of {len(events)} events")

    async def durable(self, stream: str, prefix: str, name: str, event_type: str = ">") -> None:
        await self.js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=name,
                filter_subject=prefix + event_type,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=1000,
            ),
        )

    async def settled(self, stream: str, durable: str, timeout: float = 15.0) -> None:
        """Wait until the consumer has nothing pending and nothing awaiting an ack."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.js.consumer_info(stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            if time.monotonic() > deadline:
                raise Lost(
                    f"{stream}/{durable}: {info.num_pending} pending, "
                    f"{info.num_ack_pending} unacked"
                )
            await anyio.sleep(0.05)


# -- publish -------------------------------------------------------------------------------------


async def bench_publish(bench: Bench, events: list[Event], sync_n: int) -> dict[str, float]:
    """Events per second through each publish path, each on a fresh stream."""
    rates: dict[str, float] = {}

    async def timed(name: str, count: int, body: Callable[[str, str], Awaitable[None]]) -> None:
        stream, prefix = await bench.fresh_stream()
        started = time.perf_counter()
        await body(stream, prefix)
        rates[name] = count / (time.perf_counter() - started)
        info = await bench.js.stream_info(stream)
        if info.state.messages != count:
            raise Lost(f"publish {name}: stored {info.state.messages} of {count}")
        await bench.drop(stream)

    payloads = [(e.type, e.to_json(), event_headers(e)) for e in events]

    async def raw_sync(stream: str, prefix: str) -> None:
        for type_, data, headers in payloads[:sync_n]:
            await bench.js.publish(prefix + type_, data, headers=headers)

    async def raw_async(stream: str, prefix: str) -> None:
        acks = [
            await bench.js.publish_async(prefix + type_, data, headers=headers)
            for type_, data, headers in payloads
        ]
        await asyncio.gather(*acks)

    async def gdc_sync(stream: str, prefix: str) -> None:
        async with await NATSEventBus.connect(bench_config(bench.url, stream, prefix)) as bus:
            for event in events[:sync_n]:
                await bus.publish_event(event)

    async def gdc_async(stream: str, prefix: str) -> None:
        async with await NATSEventBus.connect(bench_config(bench.url, stream, prefix)) as bus:
            for event in events:
                await bus.publish_event_async(event)
            await bus.flush()

    await timed("raw js.publish", sync_n, raw_sync)
    await timed("gdc publish_event", sync_n, gdc_sync)
    await timed("raw js.publish_async", len(events), raw_async)
    await timed("gdc publish_event_async", len(events), gdc_async)
    return rates


# -- consume -------------------------------------------------------------------------------------


async def consume_once(
    bench: Bench, impl: str, events: list[Event], fail_ratio: float = 0.0, root: Path = ROOT
) -> dict[str, float]:
    """One consumer implementation in its own process over `events` pre-filled in a fresh stream.

    `root` is the source tree the consumer imports gdc_worker and bench from: another checkout
    of the project measures an earlier version in the same run. A pipeline (an impl in
    `PIPELINES`) must have stored one output per event, exactly once.
    """
    stream, prefix = await bench.fresh_stream()
    durable = f"{impl}-consumer"
    await bench.fill(stream, prefix, events)
    await bench.durable(stream, prefix, durable, FILTERS.get(impl, ">"))
    args = [sys.executable, "-m", "bench.consumers", impl, "--url", bench.url]
    args += ["--stream", stream, "--subject-prefix", prefix, "--durable", durable]
    args += ["--n", str(len(events)), "--fail-ratio", str(fail_ratio)]
    result = await anyio.run_process(args, cwd=root, check=False)
    if result.returncode != 0:
        raise Lost(f"{impl} consumer failed:\n{result.stderr.decode()[-2000:]}")
    figures: dict[str, float] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    await bench.settled(stream, durable)
    if impl in PIPELINES:
        outputs = await bench.count(stream, prefix + OUTPUT_TYPE)
        if outputs != len(events):
            raise Lost(f"{impl}: {outputs} outputs stored for {len(events)} events")
    await bench.drop(stream)
    return {"rate": len(events) / figures["elapsed"], "peak_rss_kb": figures["peak_rss_kb"]}


#: The consumers that publish one output per event, and what they are called in the results.
PIPELINES = {
    "gdc-pipeline": "gdc ctx.publish",
    "raw-pipeline-async": "raw publish_async batch",
    "raw-pipeline-sync": "raw await js.publish each",
}


# -- latency -------------------------------------------------------------------------------------


async def latency(
    bench: Bench, impl: str, events: list[Event], warmup: int = 50
) -> dict[str, float]:
    """publish -> handler in ms, one event in flight, the same raw publisher for every impl."""
    stream, prefix = await bench.fresh_stream()
    durable = f"{impl}-latency"
    await bench.durable(stream, prefix, durable)
    arrived = asyncio.Event()

    def on_event() -> None:
        arrived.set()

    samples: list[float] = []
    async with _latency_consumer(bench, impl, stream, prefix, durable, on_event):
        for i, event in enumerate(events):
            arrived.clear()
            started = time.perf_counter()
            await bench.nc.publish(
                prefix + event.type, event.to_json(), headers=event_headers(event)
            )
            await arrived.wait()
            if i >= warmup:
                samples.append((time.perf_counter() - started) * 1000)
    await bench.settled(stream, durable)
    await bench.drop(stream)
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": statistics.median(samples), "p99_ms": cuts[98]}


@asynccontextmanager
async def _latency_consumer(
    bench: Bench, impl: str, stream: str, prefix: str, durable: str, on_event: Callable[[], None]
) -> AsyncIterator[None]:
    if impl == "gdc":
        config = bench_config(bench.url, stream, prefix)
        app = App("latency", config)

        @app.on(">", durable=durable)
        async def handle(event: Event) -> None:
            on_event()

        worker = Worker(app)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            yield
            worker.stop()
    elif impl == "raw":
        nc = await nats.connect(bench.url)
        sub = await nc.jetstream().pull_subscribe_bind(durable, stream)

        async def loop() -> None:
            while True:
                try:
                    msgs = await sub.fetch(batch=1, timeout=5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    Event.from_json(msg.data)
                    await msg.ack()
                    on_event()

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            yield
            tg.cancel_scope.cancel()
        await nc.drain()
    else:
        from faststream.nats import JStream, NatsBroker, PullSub

        broker = NatsBroker(bench.url, logger=None)

        @broker.subscriber(
            prefix + ">",
            stream=JStream(name=stream, declare=False),
            durable=durable,
            pull_sub=PullSub(batch_size=100),
        )
        async def fs_handle(body: dict[str, Any]) -> None:
            msgspec.convert(body, Event)
            on_event()

        await broker.start()
        yield
        await broker.stop()


# -- scale ---------------------------------------------------------------------------------------


async def scale_once(bench: Bench, processes: int, work_ms: float, events: list[Event]) -> float:
    """Events per second through `gdc-worker run --processes N`, first delivery to last ack."""
    stream, prefix = await bench.fresh_stream()
    await bench.fill(stream, prefix, events)
    env = dict(os.environ)
    env.update(
        GDC_NATS_URL=bench.url,
        GDC_NATS_STREAM_NAME=stream,
        GDC_NATS_STREAM_SUBJECTS=prefix + ">",
        GDC_NATS_DLQ_STREAM_NAME=stream + "_DLQ",
        GDC_NATS_DLQ_SUBJECT_PREFIX=f"dlq{stream.lower()}",
        # The bench stream's limits (`bench_config`), so that no replica warns about them.
        GDC_NATS_MAX_AGE="0",
        GDC_NATS_MAX_BYTES="0",
        GDC_NATS_MAX_MSGS="0",
        GDC_NATS_DUPLICATE_WINDOW=str(DUPLICATE_WINDOW_S),
        GDC_BENCH_WORK_MS=str(work_ms),
    )
    command = [sys.executable, "-m", "gdc_worker", "run", "bench.apps:app"]
    command += ["--processes", str(processes), "--log-level", "WARNING"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)  # noqa: ASYNC220 - returns at once
    try:
        started = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                info = await bench.js.consumer_info(stream, "bench-scale")
            except nats.js.errors.NotFoundError:
                await anyio.sleep(0.01)
                continue
            if started is None and info.delivered.consumer_seq > 0:
                started = time.perf_counter()
            if info.num_pending == 0 and info.num_ack_pending == 0 and started is not None:
                return len(events) / (time.perf_counter() - started)
            await anyio.sleep(0.01)
        raise Lost(f"--processes {processes}: not every event was acked within 300 s")
    finally:
        process.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(process.wait)
        await bench.drop(stream)
        with contextlib.suppress(nats.js.errors.NotFoundError):  # the worker may not have made it
            await bench.js.delete_stream(stream + "_DLQ")


# -- machine baseline ----------------------------------------------------------------------------

_SPIN = """
import time
count, end = 0, time.perf_counter() + {seconds}
while time.perf_counter() < end:
    for _ in range(1000):
        count += 1
print(count)
"""


async def machine_parallelism(seconds: float = 2.0) -> float:
    """How much CPU-bound work two processes get done here, relative to one.

    2.0 on two idle, independent cores; less where the cores are shared. The ceiling for
    `--processes 2` with CPU-bound handlers.
    """

    async def spin(processes: int) -> int:
        command = [sys.executable, "-c", _SPIN.format(seconds=seconds)]
        counts: list[int] = []

        async def one() -> None:
            result = await anyio.run_process(command)
            counts.append(int(result.stdout))

        async with anyio.create_task_group() as tg:
            for _ in range(processes):
                tg.start_soon(one)
        return sum(counts)

    return await spin(2) / await spin(1)


# -- driver --------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    events = make_events(args.n)
    impls = ["gdc", "raw"] + ([] if args.no_faststream else ["faststream"])
    results: dict[str, Any] = {"n": args.n, "runs": args.runs}
    with NATSServer() as server:
        nc = await nats.connect(server.url)
        bench = Bench(server.url, nc, nc.jetstream())
        publish: dict[str, list[float]] = {}
        extra = ["gdc-hooked", "gdc-typed", "gdc-metrics"]
        consume: dict[str, list[float]] = {impl: [] for impl in [*impls, *extra]}
        if args.baseline is not None:
            consume["gdc baseline"] = []
        # Each variant of gdc (and its pipeline) over a gdc no-op run made right next to it,
        # in alternating order: on a shared machine, rates drift between one measurement and
        # the next one a minute later more than the few percent these targets are about.
        paired: dict[str, list[float]] = {impl: [] for impl in [*extra, "gdc-pipeline"]}
        retry: dict[str, list[float]] = {"gdc": [], "raw": []}
        pipeline: dict[str, list[float]] = {name: [] for name in PIPELINES.values()}
        lat: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        scale: dict[str, list[float]] = {}
        parallelism: list[float] = []
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
            for name, rate in (await bench_publish(bench, events, args.sync_n)).items():
                publish.setdefault(name, []).append(rate)
            for impl in impls:
                consume[impl].append((await consume_once(bench, impl, events))["rate"])
            for impl in extra:
                for pair in range(args.pairs):
                    rate, over = await paired_once(bench, impl, events, run + pair)
                    consume[impl].append(rate)
                    paired[impl].append(over)
            if args.baseline is not None:
                base = await consume_once(bench, "gdc", events, root=args.baseline)
                consume["gdc baseline"].append(base["rate"])
            for impl, name in PIPELINES.items():
                if impl in paired:
                    for pair in range(args.pairs):
                        rate, over = await paired_once(bench, impl, events, run + pair)
                        paired[impl].append(over)
                        pipeline[name].append(rate)
                else:
                    pipeline[name].append((await consume_once(bench, impl, events))["rate"])
            for impl in ("gdc", "raw"):
                failing = await consume_once(bench, impl, events, fail_ratio=0.1)
                retry[impl].append(failing["rate"])
            for impl in impls:
                lat[impl].append(await latency(bench, impl, events[: args.latency_n]))
            parallelism.append(await machine_parallelism())
            for work_ms, n in ((0.0, args.n), (1.0, args.cpu_n)):
                for processes in (1, 2):
                    key = f"{'cpu1ms' if work_ms else 'noop'} x{processes}"
                    rate = await scale_once(bench, processes, work_ms, events[:n])
                    scale.setdefault(key, []).append(rate)
        memory = {
            f"{impl} {label}": (await consume_once(bench, impl, evs))["peak_rss_kb"]
            for impl in ("gdc", "raw")
            for label, evs in (("N", events), ("4N", make_events(4 * args.n)))
        }
        await nc.drain()

    results["publish_msgs_per_s"] = {k: median(v) for k, v in publish.items()}
    results["consume_msgs_per_s"] = {k: median(v) for k, v in consume.items()}
    results["retry_10pct_msgs_per_s"] = {k: median(v) for k, v in retry.items()}
    results["pipeline_msgs_per_s"] = {k: median(v) for k, v in pipeline.items()}
    results["latency_ms"] = {
        impl: {q: median([s[q] for s in samples]) for q in ("p50_ms", "p99_ms")}
        for impl, samples in lat.items()
    }
    results["scale_msgs_per_s"] = {k: median(v) for k, v in scale.items()}
    results["machine_two_process_cpu_ratio"] = median(parallelism)
    results["peak_rss_kb"] = memory
    c, p, s, lt = (
        results["consume_msgs_per_s"],
        results["publish_msgs_per_s"],
        results["scale_msgs_per_s"],
        results["latency_ms"],
    )
    ratios = {
        "consume gdc/raw (target >= 2)": c["gdc"] / c["raw"],
        "publish async gdc/raw (target >= 1)": p["gdc publish_event_async"]
        / p["raw js.publish_async"],
        "publish sync gdc/raw (target >= 1)": p["gdc publish_event"] / p["raw js.publish"],
        "p99 latency gdc/raw (target <= 1.5)": lt["gdc"]["p99_ms"] / lt["raw"]["p99_ms"],
        "cpu1ms x2/x1 (target >= 1.7)": s["cpu1ms x2"] / s["cpu1ms x1"],
        "machine: 2 CPU-bound processes / 1": results["machine_two_process_cpu_ratio"],
        "cpu1ms x2/x1 / machine ratio": s["cpu1ms x2"]
        / s["cpu1ms x1"]
        / results["machine_two_process_cpu_ratio"],
        "noop x2/x1": s["noop x2"] / s["noop x1"],
        "gdc 10% failing/no failures": results["retry_10pct_msgs_per_s"]["gdc"] / c["gdc"],
        "raw 10% failing/no failures": results["retry_10pct_msgs_per_s"]["raw"] / c["raw"],
        "peak rss gdc 4N/N": memory["gdc 4N"] / memory["gdc N"],
        "peak rss gdc/raw at 4N": memory["gdc 4N"] / memory["raw 4N"],
    }
    pairs = {impl: median(values) for impl, values in paired.items()}
    results["paired_with_gdc_noop"] = pairs
    ratios["consume gdc no-op hooks/no hooks"] = pairs["gdc-hooked"]
    ratios.update(pipeline_ratios(results["pipeline_msgs_per_s"], pairs["gdc-pipeline"]))
    ratios["consume gdc typed/untyped handler (target >= 0.90)"] = pairs["gdc-typed"]
    ratios["consume gdc metrics on/off (target >= 0.95)"] = pairs["gdc-metrics"]
    if "gdc baseline" in c:
        ratios["consume gdc/baseline checkout (target >= 0.97)"] = c["gdc"] / c["gdc baseline"]
    if "faststream" in c:
        ratios["consume gdc/faststream (target >= 5)"] = c["gdc"] / c["faststream"]
        ratios["p99 latency faststream/raw"] = lt["faststream"]["p99_ms"] / lt["raw"]["p99_ms"]
    results["ratios"] = ratios
    results["versions"] = {
        "nats-server": server_version(),
        "nats-py": version("nats-py"),
        "gdc-worker": version("gdc-worker"),
        "faststream": "-" if args.no_faststream else version("faststream"),
        "python": platform.python_version(),
    }
    return results


async def paired_once(
    bench: Bench, impl: str, events: list[Event], run: int
) -> tuple[float, float]:
    """`impl`'s consume rate, and its ratio to gdc's no-op rate measured right before it (or
    right after it, in odd runs)."""
    order = ("gdc", impl) if run % 2 == 0 else (impl, "gdc")
    rates = {name: (await consume_once(bench, name, events))["rate"] for name in order}
    return rates[impl], rates[impl] / rates["gdc"]


def pipeline_ratios(rates: dict[str, float], over_noop: float) -> dict[str, float]:
    """The publish pipeline against gdc-worker's own no-op consume rate (`over_noop`, from
    `paired_once`) and the raw loops."""
    gdc = rates[PIPELINES["gdc-pipeline"]]
    return {
        "pipeline gdc/gdc no-op (target >= 0.5)": over_noop,
        "pipeline gdc/raw publish_async (target >= 2)": gdc
        / rates[PIPELINES["raw-pipeline-async"]],
        "pipeline gdc/raw js.publish each": gdc / rates[PIPELINES["raw-pipeline-sync"]],
    }


def server_version() -> str:
    from gdc_worker.server import find_nats_server

    out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def report(results: dict[str, Any]) -> None:
    print(f"\ngdc-worker benchmark: N={results['n']}, medians of {results['runs']} run(s)")
    print(", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    for section in (
        "publish_msgs_per_s",
        "consume_msgs_per_s",
        "retry_10pct_msgs_per_s",
        "pipeline_msgs_per_s",
        "scale_msgs_per_s",
    ):
        print(f"\n{section}")
        for name, value in results[section].items():
            print(f"  {name:<28} {value:>10,.0f}")
    print("\nlatency_ms (publish -> handler, one in flight)")
    for name, q in results["latency_ms"].items():
        print(f"  {name:<28} p50 {q['p50_ms']:.3f}  p99 {q['p99_ms']:.3f}")
    print("\npeak_rss_kb")
    for name, value in results["peak_rss_kb"].items():
        print(f"  {name:<28} {value:>10,}")
    print("\nratios")
    for name, value in results["ratios"].items():
        print(f"  {name:<42} {value:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="events per consume/publish run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--sync-n", type=int, default=2_000, help="events for one-at-a-time publish"
    )
    parser.add_argument(
        "--cpu-n", type=int, default=4_000, help="events for the 1 ms CPU scale run"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="pairs per run of each gdc variant with a gdc no-op run (a few percent apart)",
    )
    parser.add_argument("--latency-n", type=int, default=550, help="latency samples (50 warm-up)")
    parser.add_argument("--no-faststream", action="store_true", help="skip FastStream")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of an earlier version (git worktree add DIR REV) to measure its "
        "consume rate in the same run",
    )

    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args()
    try:
        results = anyio.run(main_async, args)
    except Lost as exc:
        print(f"benchmark invalid: {exc}", file=sys.stderr)
        return 1
    report(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
