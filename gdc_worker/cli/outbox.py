"""`gdc-worker outbox`: what waits in a publish outbox, publishing it now, and the events
JetStream refused."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime

import anyio
import click

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..errors import PublishError
from ..events import MSG_ID_HEADER
from ..outbox import Outbox, OutboxStats, RefusedEvent
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ReportedError,
    aligned,
    connection,
    creds_option,
    reported_errors,
    url_option,
)

__all__ = ["outbox"]

_path_option = click.option(
    "--path", metavar="FILE", help="The outbox file (default: GDC_NATS_OUTBOX_PATH)."
)


@click.group()
def outbox() -> None:
    """Inspect and drain the publish outbox, where events wait while NATS is away, and
    requeue the events JetStream refused."""


@outbox.command("status")
@_path_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def outbox_status(path: str | None, as_json: bool) -> None:
    """How many events wait in the outbox, their bytes, and how long the oldest has waited."""

    async def main() -> OutboxStats:
        async with await _open(config) as box:
            return box.stats()

    with reported_errors():
        config = _config(path)
        stats = anyio.run(main)
    if as_json:
        click.echo(json.dumps({"path": config.outbox_path, **stats._asdict()}))
        return
    age = "-" if stats.oldest_age_s is None else f"{stats.oldest_age_s:.1f}s ago"
    rows = [
        ("outbox", config.outbox_path),
        ("events", str(stats.events)),
        ("bytes", f"{stats.bytes} ({_size(stats.bytes)})"),
        ("oldest", age),
        ("refused", f"{stats.refused} (JetStream refuses them: `gdc-worker outbox refused`)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")


@outbox.command("flush")
@_path_option
@url_option
@creds_option
def outbox_flush(path: str | None, url: str | None, creds: str | None) -> None:
    """Publish every event in the outbox now, oldest first, with its original Nats-Msg-Id.

    Each event is removed once JetStream acked it. One that JetStream refuses for good (no
    stream captures its subject, over the stream's max_msg_size) is set aside in the file's
    refused table, said on stderr, and the rest go on, as the service's relay does. Exits 0
    once every event was published, 1 when one was set aside or one cannot be published yet
    (what is left stays, in order). The stream is created if missing, as a publisher would.
    """

    async def main() -> int:
        async with await _open(config) as box:
            total = box.stats().events
            if total == 0:
                click.echo(f"outbox {box.path}: empty")
                return EXIT_OK
            # The outbox is drained here, not by the bus in the background.
            async with await NATSEventBus.connect(config.replace(outbox_path="")) as bus:
                sent, set_aside = await _drain(box, bus, total)
            left = box.stats().events
            aside = f", {set_aside} set aside" if set_aside else ""
            click.echo(f"outbox {box.path}: {sent} event(s) published, {left} left{aside}")
            return EXIT_FAILURE if set_aside else EXIT_OK

    with reported_errors():
        config = _config(path, **connection(url, creds))
        code = anyio.run(main)
    sys.exit(code)


async def _drain(box: Outbox, bus: NATSEventBus, total: int) -> tuple[int, int]:
    """`NATSEventBus.drain_outbox` with a progress bar (on a terminal), its rate and ETA, and
    a line on stderr for each event set aside; returns how many were published and set aside.
    Raises `PublishError` naming what is left."""
    started = time.monotonic()
    refusals: list[str] = []

    def rate(_: object) -> str:
        elapsed = time.monotonic() - started
        return f"{bar.pos / elapsed:.0f}/s" if elapsed > 0 else ""

    def refused(refusal: str) -> None:
        refusals.append(refusal)
        click.echo(f"{refusal}; set aside (`gdc-worker outbox refused` lists it)", err=True)

    with click.progressbar(
        length=total, label="publishing", show_pos=True, item_show_func=rate, file=sys.stderr
    ) as bar:
        try:
            sent = await bus.drain_outbox(box, bar.update, refused)
        except PublishError as exc:
            raise ReportedError(
                f"{exc}; {box.stats().events} event(s) left in the outbox {box.path}",
                EXIT_FAILURE,
            ) from None
    return sent, len(refusals)


@outbox.command("refused")
@_path_option
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def outbox_refused(path: str | None, as_json: bool) -> None:
    """List the events set aside because JetStream refuses them for good, and why.

    Once the cause is fixed (the stream's max_msg_size raised, its subjects widened),
    `gdc-worker outbox requeue` puts them back in the queue.
    """

    async def main() -> list[RefusedEvent]:
        async with await _open(config) as box:
            return await box.refused()

    with reported_errors():
        config = _config(path)
        rows = [_refused_row(event) for event in anyio.run(main)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"outbox {config.outbox_path}: no refused events")
        return
    columns = ["id", "event", "subject", "queued_at", "refused_at", "reason"]
    header = ["id", "event", "subject", "queued", "refused", "reason"]
    for line in aligned([header] + [[str(row[c]) for c in columns] for row in rows]):
        click.echo(line)


@outbox.command("requeue")
@_path_option
@click.option("--all", "select_all", is_flag=True, help="Every refused event.")
@click.argument("ids", metavar="[ID]...", type=click.IntRange(min=1), nargs=-1)
def outbox_requeue(path: str | None, select_all: bool, ids: tuple[int, ...]) -> None:
    """Move refused events (IDs as `outbox refused` lists them) back to the end of the queue.

    For once their cause is fixed: they keep their payload, headers and Nats-Msg-Id, and
    the service's relay (or `gdc-worker outbox flush`) publishes them. An ID that is not
    refused is an error, and then none is moved.
    """
    if bool(ids) == select_all:
        raise click.UsageError("give refused event IDs or --all, not both and not neither")

    async def main() -> int:
        async with await _open(config) as box:
            return await box.requeue(None if select_all else ids)

    with reported_errors():
        config = _config(path)
        moved = anyio.run(main)
    click.echo(f"outbox {config.outbox_path}: {moved} event(s) requeued")


def _refused_row(event: RefusedEvent) -> dict[str, object]:
    return {
        "id": event.id,
        "event": event.headers.get(MSG_ID_HEADER, ""),
        "subject": event.subject,
        "queued_at": _when(event.queued_at),
        "refused_at": _when(event.refused_at),
        "reason": event.reason,
    }


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _config(path: str | None, **overrides: str) -> NATSConfig:
    """The configuration, with `--path` for the outbox; an outbox that does not exist (or
    none given, or an empty file) is one line and bad usage, and no file is created or
    changed for it."""
    config = NATSConfig.from_env(None, outbox_path=path, **overrides)
    if not config.outbox_path:
        raise ReportedError("no outbox: give --path or set GDC_NATS_OUTBOX_PATH", EXIT_USAGE)
    if os.path.isdir(config.outbox_path):
        raise ReportedError(
            f"{config.outbox_path} is a directory: give the outbox file in it", EXIT_USAGE
        )
    if not os.path.isfile(config.outbox_path):
        raise ReportedError(f"no outbox at {config.outbox_path}", EXIT_USAGE)
    if os.path.getsize(config.outbox_path) == 0:  # SQLite would make it an empty outbox
        raise ReportedError(f"no outbox at {config.outbox_path}: the file is empty", EXIT_USAGE)
    return config


async def _open(config: NATSConfig) -> Outbox:
    return await Outbox.open(
        config.outbox_path, max_events=config.outbox_max_events, max_bytes=config.outbox_max_bytes
    )


def _size(n: int) -> str:
    """Bytes for a person: 512 B, 3.4 KiB, 1.2 MiB."""
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"
