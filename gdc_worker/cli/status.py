"""`gdc-worker status`: the event stream, its consumers' lag and the dead letters, at a glance."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import click

from ..bus import ConsumerState, NATSEventBus, StreamState
from ..config import NATSConfig
from ..dlq import DeadLetterQueue
from ..errors import ConnectionFailed, GDCWorkerError
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    FiniteFloat,
    ReportedError,
    aligned,
    connection,
    creds_option,
    one_line,
    reported_errors,
    run_until_stopped,
    url_option,
)

__all__ = ["Snapshot", "age_text", "size_text", "status"]

#: Seconds between refreshes of `--watch` without a value.
WATCH_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    """What `status` shows: the stream, its durable consumers and the dead-letter depths."""

    stream: StreamState
    consumers: list[ConsumerState]
    #: `(consumer, event type) -> count`.
    dead_letters: dict[tuple[str, str], int]
    dlq_stream: str
    taken_at: datetime

    @classmethod
    async def take(cls, bus: NATSEventBus) -> Snapshot:
        """Read it all; `ReportedError` (exit 1) when the event stream does not exist."""
        stream = await bus.stream_state()
        if stream is None:
            raise ReportedError(
                f"stream {bus.config.stream_name} does not exist on {bus.server_url}", EXIT_FAILURE
            )
        queue = DeadLetterQueue(bus)
        return cls(
            stream,
            await bus.consumer_states(),
            await queue.depths(),
            queue.stream,
            datetime.now(UTC),
        )

    def as_json(self) -> dict[str, Any]:
        """The snapshot for scripts: times as RFC 3339, ages in seconds, `lag` per consumer."""
        stream = self.stream
        return {
            "stream": {
                "name": stream.name,
                "messages": stream.messages,
                "bytes": stream.bytes,
                "first_seq": stream.first_seq,
                "last_seq": stream.last_seq,
                "first_ts": _iso(stream.first_ts),
                "last_ts": _iso(stream.last_ts),
                "limits": {
                    "max_msgs": stream.limits.max_msgs,
                    "max_bytes": stream.limits.max_bytes,
                    "max_age": stream.limits.max_age,
                },
                "use_percent": stream.use(self.taken_at),
                "replicas": stream.replicas,
                "leader": stream.leader,
            },
            "consumers": [
                {
                    "name": c.name,
                    "filter": list(c.filters),
                    "lag": c.lag,
                    "pending": c.pending,
                    "ack_pending": c.ack_pending,
                    "redelivered": c.redelivered,
                    "waiting": c.waiting,
                    "oldest_unacked_age_s": c.oldest_unacked_age_s,
                    "last_active": _iso(c.last_active),
                    "paused": c.paused,
                }
                for c in self.consumers
            ],
            "dead_letters": [
                {"consumer": consumer, "event_type": event_type, "count": count}
                for (consumer, event_type), count in sorted(self.dead_letters.items())
            ],
        }

    def lines(self, lag_before: dict[str, int] | None = None) -> list[str]:
        """The snapshot as a person reads it; a lag above its value in `lag_before` stands out."""
        lines = [self._stream_line(), ""]
        if self.consumers:
            lines += self._consumer_table(lag_before or {})
        else:
            lines.append("no consumers")
        lines.append("")
        total = sum(self.dead_letters.values())
        if not total:
            lines.append(f"dead letters ({self.dlq_stream}): none")
            return lines
        lines.append(f"dead letters ({self.dlq_stream}): {total:,}")
        rows = [["CONSUMER", "EVENT TYPE", "COUNT"]] + [
            [consumer, event_type, f"{count:,}"]
            for (consumer, event_type), count in sorted(self.dead_letters.items())
        ]
        return lines + aligned(rows, right=frozenset({2}))

    def _stream_line(self) -> str:
        stream, now = self.stream, self.taken_at
        parts = [f"{stream.messages:,} messages", size_text(stream.bytes)]
        use = stream.use(now)
        limits = stream.limits
        shown = {
            "max_msgs": f"{limits.max_msgs:,} messages",
            "max_bytes": size_text(limits.max_bytes),
            "max_age": age_text(limits.max_age),
        }
        if use:
            parts.append(", ".join(f"{use[k]:.1f}% of {shown[k]}" for k in use))
        if stream.first_ts and stream.last_ts:
            first, last = (age_text(_age(t, now)) for t in (stream.first_ts, stream.last_ts))
            parts.append(f"first {first} ago, last {last} ago")
        replicas = f"{stream.replicas} replica{'s' * (stream.replicas > 1)}"
        parts.append(f"{replicas}, leader {stream.leader}" if stream.leader else replicas)
        return f"stream {stream.name}: " + "; ".join(parts)

    def _consumer_table(self, lag_before: dict[str, int]) -> list[str]:
        header = [
            "CONSUMER",
            "FILTER",
            "LAG",
            "PENDING",
            "ACK PENDING",
            "REDELIVERED",
            "WAITING",
            "OLDEST UNACKED",
            "LAST ACTIVE",
            "PAUSED",
        ]
        rows = [header] + [
            [
                c.name,
                ",".join(c.filters) or "(all)",
                f"{c.lag:,}",
                f"{c.pending:,}",
                f"{c.ack_pending:,}",
                f"{c.redelivered:,}",
                f"{c.waiting:,}",
                age_text(c.oldest_unacked_age_s) if c.lag else "",
                f"{age_text(_age(c.last_active, self.taken_at))} ago" if c.last_active else "never",
                "paused" if c.paused else "",
            ]
            for c in self.consumers
        ]
        lines = aligned(rows, right=frozenset(range(2, 8)))
        for i, c in enumerate(self.consumers, start=1):
            if c.name in lag_before and c.lag > lag_before[c.name]:
                lines[i] = _highlight_lag(lines[0], lines[i])
        return lines


async def _refreshed(
    show: Callable[[NATSEventBus, dict[str, int] | None], Awaitable[dict[str, int]]],
    bus: NATSEventBus,
    lags: dict[str, int],
    watch: float,
) -> dict[str, int]:
    """One refresh of `status --watch`; one that fails (the server slow to answer, the
    stream deleted a moment) says why on stderr and keeps the last lags, so that the watch
    outlives the outage it is watched for. A connection lost for good still ends it."""
    try:
        return await show(bus, lags)
    except ConnectionFailed:
        raise
    except (GDCWorkerError, click.ClickException) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"Error: {one_line(message)}; retrying in {watch:g}s", err=True)
        return lags


def _highlight_lag(header: str, line: str) -> str:
    """`line` with its LAG cell (right-aligned under the header's LAG) in bold red."""
    end = header.index("LAG") + len("LAG")
    start = line.rfind(" ", 0, end - 1) + 1
    return line[:start] + click.style(line[start:end], fg="red", bold=True) + line[end:]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _age(since: datetime, now: datetime) -> float:
    return max(0.0, (now - since).total_seconds())


_AGE_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def age_text(seconds: float) -> str:
    """A duration as a person reads it: `0.4s`, `42s`, `3m5s`, `2h10m`, `4d3h`."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for (unit, size), (smaller, smaller_size) in itertools.pairwise(_AGE_UNITS):
        if whole >= size:
            count, rest = divmod(whole, size)
            part = rest // smaller_size
            return f"{count}{unit}{part}{smaller}" if part else f"{count}{unit}"
    return f"{whole}s"


def size_text(size: int) -> str:
    """Bytes as a person reads them: `512 B`, `3.2 KiB`, `1.0 GiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@click.command(
    epilog="""Examples:

\b
  gdc-worker status
  gdc-worker status --json | jq '.consumers[] | {name, lag}'
  gdc-worker status --watch 5
"""
)
@url_option
@creds_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (per refresh).")
@click.option(
    "--watch",
    type=FiniteFloat(min=0.1),
    is_flag=False,
    flag_value=WATCH_S,
    default=None,
    metavar="[SECONDS]",
    help=f"Refresh every SECONDS ({WATCH_S:g} without a value) until Ctrl-C.",
)
def status(url: str | None, creds: str | None, as_json: bool, watch: float | None) -> None:
    """Show the event stream, each consumer's lag and the dead letters.

    Lag is pending + ack pending, as KEDA counts it, read from each consumer's leader. The
    oldest unacked age is that of the first event past the consumer's ack floor. Under
    --watch, a lag that grew since the last refresh is shown in bold red.
    """

    async def show(bus: NATSEventBus, lag_before: dict[str, int] | None) -> dict[str, int]:
        snapshot = await Snapshot.take(bus)
        if as_json:
            click.echo(json.dumps(snapshot.as_json()))
        else:
            if watch is not None and sys.stdout.isatty():
                click.clear()
            click.echo("\n".join(snapshot.lines(lag_before)))
            if watch is not None and not sys.stdout.isatty():
                click.echo("")
        return {c.name: c.lag for c in snapshot.consumers}

    async def main() -> None:
        config = NATSConfig.from_env(None, **connection(url, creds))
        async with await NATSEventBus.connect(config, setup_stream=False) as bus:
            lags = await show(bus, None)
            while watch is not None:
                await anyio.sleep(watch)
                lags = await _refreshed(show, bus, lags, watch)

    with reported_errors():
        if watch is None:
            anyio.run(main)
        else:
            run_until_stopped(main)
    sys.exit(EXIT_OK)
