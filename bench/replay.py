"""The dead-letter queue at the scale of an outage: `dlq list` and `dlq replay` on many records.

    python -m bench.replay [--n 10000] [--one-by-one-n 500] [--out FILE]

Starts its own nats-server, fills the dead-letter stream with `--n` records encoded as
`DeadLetterQueue.record` stores them (async publishes: the raw publish rate is the baseline),
then times `gdc-worker dlq list --limit 20`, the full `dlq list`, and `dlq replay --all` as an
operator runs them (subprocesses, output to a pipe). One-by-one replay (`DeadLetterQueue.replay`
per id, the way `dlq replay` worked before, measured at 71 records/s on 10,000) is measured in
the same run on the first `--one-by-one-n` records. Fails (exit 1) unless every record ends up
back on its subject exactly once and the dead-letter stream is empty.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats

from bench.run import Lost, make_events
from gdc_worker import (
    DeadLetterQueue,
    DeadLetterRecord,
    Event,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    Reject,
)
from gdc_worker.events import event_headers
from gdc_worker.testing import isolated_env

#: `dlq replay --all` as measured before it was pipelined, on 10,000 records.
OLD_REPLAY_PER_S = 71.0
_SUMMARY = re.compile(r"^replayed (\d+), failed (\d+), in ([\d.]+) s, (\d+)/s$", re.M)


@dataclass(frozen=True)
class Failed:
    """An event stored in the event stream, as the delivery a handler gave up on."""

    stream: str
    stream_seq: int
    subject: str
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    deliveries: int = 5


def rejection() -> Reject:
    """A `Reject` raised and caught, so that its record has a traceback as real ones do."""
    try:
        raise Reject("pin target unreachable: zone-msk-nn")
    except Reject as exc:
        return exc


async def fill(config: NATSConfig, events: list[Event]) -> float:
    """Store one dead letter per event (none of the originals); returns publishes per second."""
    async with await NATSEventBus.connect(config) as bus:
        queue = DeadLetterQueue(bus)
        await queue.ensure()
        error = rejection()
        messages = []
        for seq, event in enumerate(events, 1):
            failed = Failed(
                config.stream_name,
                seq,
                config.subject_for(event.type),
                event.to_json(),
                event_headers(event),
            )
            record = DeadLetterRecord.of(
                failed, reason="rejected", consumer="pinner", handler="pin", error=error
            )
            messages.append(queue.encoded(record))
    nc = await nats.connect(config.url)
    js = nc.jetstream()
    started = time.perf_counter()
    acks = [
        await js.publish_async(subject, payload, headers=headers)
        for subject, payload, headers in messages
    ]
    await asyncio.gather(*acks)
    rate = len(events) / (time.perf_counter() - started)
    await nc.close()
    return rate


def gdc_worker(config: NATSConfig, *args: str) -> tuple[float, str]:
    """Run `gdc-worker ARGS...` for the config's streams; returns (seconds, stdout)."""
    env = {**os.environ, **isolated_env(config)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "gdc_worker", *args], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise Lost(f"gdc-worker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return seconds, done.stdout


async def one_by_one(config: NATSConfig, n: int) -> float:
    """Replay the first `n` records one at a time; returns records per second."""
    async with await NATSEventBus.connect(config) as bus:
        queue = DeadLetterQueue(bus)
        ids = [entry.id async for entry in queue.entries(limit=n)]
        started = time.perf_counter()
        for entry_id in ids:
            await queue.replay(entry_id)
        return len(ids) / (time.perf_counter() - started)


async def check(config: NATSConfig, events: list[Event]) -> None:
    """Every event back on its subject exactly once, and no dead letter left."""
    async with await NATSEventBus.connect(config) as bus:
        left = await DeadLetterQueue(bus).count()
        stored = Counter(
            [(m.subject, m.data) async for m in bus.stream_messages(config.stream_name)]
        )
    expected = Counter((config.subject_for(e.type), e.to_json()) for e in events)
    if left or stored != expected:
        missing = sum((expected - stored).values())
        extra = sum((stored - expected).values())
        raise Lost(f"{left} dead letters left, {missing} events missing, {extra} extra")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    events = make_events(args.n)
    with NATSServer() as server:
        config = NATSConfig(
            url=server.url,
            stream_name="REPLAY_EVENTS",
            stream_subjects=("replay.events.>",),
            dlq_stream_name="REPLAY_DLQ",
            dlq_subject_prefix="replay.dlq",
        )
        async with await NATSEventBus.connect(config):
            pass  # the event stream
        publish_rate = await fill(config, events)
        list_20_s, _ = gdc_worker(config, "dlq", "list", "--limit", "20")
        list_s, table = gdc_worker(config, "dlq", "list")
        if len(table.splitlines()) != args.n + 1:
            raise Lost(f"dlq list printed {len(table.splitlines())} lines for {args.n} records")
        old_rate = await one_by_one(config, args.one_by_one_n)
        replay_s, said = gdc_worker(config, "dlq", "replay", "--all")
        summary = _SUMMARY.search(said)
        if summary is None or summary[2] != "0":
            raise Lost(f"dlq replay --all said: {said!r}")
        await check(config, events)
    replayed = int(summary[1])
    return {
        "n": args.n,
        "raw publish of the records (baseline), per s": publish_rate,
        "dlq list --limit 20, s": list_20_s,
        "dlq list (all), s": list_s,
        f"one-by-one replay of {args.one_by_one_n}, per s": old_rate,
        f"dlq replay --all of {replayed}: command, s": replay_s,
        "dlq replay --all: its summary, per s": float(summary[4]),
        "dlq replay --all: whole command, per s": replayed / replay_s,
        "replay / one-by-one": float(summary[4]) / old_rate,
        "replay / raw publish": float(summary[4]) / publish_rate,
        f"replay / the old {OLD_REPLAY_PER_S:g}/s (target >= 28, i.e. 2,000/s)": float(summary[4])
        / OLD_REPLAY_PER_S,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="dead letters to fill")
    parser.add_argument(
        "--one-by-one-n", type=int, default=500, help="records replayed one at a time first"
    )
    parser.add_argument("--out", type=Path, help="also write the figures there, as JSON")
    args = parser.parse_args()
    try:
        results = anyio.run(main_async, args)
    except Lost as exc:
        print(f"benchmark invalid: {exc}", file=sys.stderr)
        return 1
    for name, value in results.items():
        shown = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        print(f"  {name:<62} {shown:>10}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
