"""`gdc-worker dlq`: list, show, replay and purge dead letters."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import click
import msgspec

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..dlq import DeadLetterEntry, DeadLetterQueue
from ..errors import GDCWorkerError
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    connection,
    creds_option,
    reported_errors,
    url_option,
)

__all__ = ["dlq"]

F = TypeVar("F", bound=Callable[..., Any])

#: A dead letter's id: its sequence in the dead-letter stream, so 1 or more.
ENTRY_ID = click.IntRange(min=1)


@click.group()
def dlq() -> None:
    """Inspect, replay and purge the dead-letter stream."""


@asynccontextmanager
async def _dead_letters(url: str | None, creds: str | None) -> AsyncIterator[DeadLetterQueue]:
    config = NATSConfig.from_env(None, **connection(url, creds))
    async with await NATSEventBus.connect(config, setup_stream=False) as bus:
        yield DeadLetterQueue(bus)


def _run_dlq(
    url: str | None, creds: str | None, action: Callable[[DeadLetterQueue], Awaitable[int]]
) -> None:
    async def main() -> int:
        async with _dead_letters(url, creds) as queue:
            return await action(queue)

    with reported_errors():
        code = anyio.run(main)
    sys.exit(code)


def _summary(entry: DeadLetterEntry) -> dict[str, Any]:
    if not entry.readable:
        return {
            "id": entry.id,
            "failed_at": None,
            "consumer": "",
            "handler": "",
            "event_type": "",
            "event_id": "",
            "deliveries": None,
            "error_type": "",
            "error": entry.problem,
            "reason": "",
            "unreadable": entry.problem,
        }
    record = entry.record
    return {
        "id": entry.id,
        "failed_at": record.failed_at.isoformat(timespec="seconds"),
        "consumer": record.consumer,
        "handler": record.handler,
        "event_type": record.event_type,
        "event_id": record.event_id,
        "deliveries": record.deliveries,
        "error_type": record.error_type,
        "error": record.error_message or record.reason,
        "reason": record.reason,
        "unreadable": "",
    }


def _cells(row: dict[str, Any], columns: list[str]) -> list[str]:
    """A row of the table: no cell empty, so that columns stay apart; at most 60 characters."""
    if row["unreadable"]:
        row = {**row, "event_type": "unreadable"}
    return [str(row[c])[:60] if row[c] not in (None, "") else "-" for c in columns]


def _filters(func: F) -> F:
    func = click.option("--consumer", help="Only entries of this consumer (durable).")(func)
    return click.option("--type", "event_type", help="Only entries of this event type.")(func)


def _selection(func: F) -> F:
    """Entry IDs, or --all with the filters: what `replay` and `purge` act on."""
    func = _filters(func)
    func = click.option(
        "--all", "select_all", is_flag=True, help="Every entry (matching the filters)."
    )(func)
    return click.argument("ids", metavar="[ID]...", type=ENTRY_ID, nargs=-1)(func)


@dlq.command("list")
@url_option
@creds_option
@_filters
@click.option("--limit", type=click.IntRange(min=1), help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def dlq_list(
    url: str | None,
    creds: str | None,
    event_type: str | None,
    consumer: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first."""

    async def action(queue: DeadLetterQueue) -> int:
        rows = [
            _summary(e)
            async for e in queue.entries(event_type=event_type, consumer=consumer, limit=limit)
        ]
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
            return EXIT_OK
        if not rows:
            click.echo("no dead letters")
            return EXIT_OK
        columns = ["id", "failed_at", "consumer", "event_type", "event_id", "deliveries", "error"]
        table = [columns] + [_cells(row, columns) for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        for line in table:
            click.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            )
        return EXIT_OK

    _run_dlq(url, creds, action)


@dlq.command("show")
@url_option
@creds_option
@click.argument("entry_id", metavar="ID", type=ENTRY_ID)
def dlq_show(url: str | None, creds: str | None, entry_id: int) -> None:
    """Show one dead letter: the event, the error and the traceback."""

    async def action(queue: DeadLetterQueue) -> int:
        entry = await queue.get(entry_id)
        click.echo(f"id:          {entry.id}")
        if not entry.readable:
            click.echo(f"unreadable:  {entry.problem}")
            click.echo(f"subject:     {entry.subject}")
            click.echo(f"size:        {entry.size} bytes")
            click.echo(f"first bytes: {entry.head!r}")
            return EXIT_OK
        record = entry.record
        click.echo(f"failed at:   {record.failed_at.isoformat()}")
        click.echo(f"reason:      {record.reason}")
        click.echo(f"consumer:    {record.consumer} (handler {record.handler})")
        click.echo(f"message:     {record.stream} #{record.stream_seq} on {record.subject}")
        if record.by_reference:
            click.echo("stored:      by reference (too large to copy): read from that stream")
        click.echo(f"deliveries:  {record.deliveries}")
        if record.error_type:
            click.echo(f"error:       {record.error_type}: {record.error_message}")
        if record.event is not None:
            click.echo("event:\n" + json.dumps(msgspec.to_builtins(record.event), indent=2))
        elif not entry.problem:  # with a problem, the message is not there: said last
            click.echo(f"raw message: {_shown(record.data)}")
        if record.traceback:
            click.echo("traceback:\n" + record.traceback.rstrip())
        if entry.problem:
            click.echo(f"Error: cannot show the message of #{entry.id}: {entry.problem}", err=True)
            return EXIT_FAILURE
        return EXIT_OK

    _run_dlq(url, creds, action)


def _shown(data: bytes, limit: int = 1000) -> str:
    """The bytes of a message as Python shows them, the first `limit` of them."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r} ... ({len(data)} bytes in all)"


def _select(ids: tuple[int, ...], select_all: bool, *filters: str | None) -> None:
    if bool(ids) == select_all:
        raise click.UsageError("give entry IDs or --all, not both and not neither")
    if ids and any(filters):
        raise click.UsageError("--type and --consumer go with --all, not with entry IDs")


async def _targets(
    queue: DeadLetterQueue, ids: tuple[int, ...], event_type: str | None, consumer: str | None
) -> list[int]:
    if ids:
        return list(ids)
    return [e.id async for e in queue.entries(event_type=event_type, consumer=consumer)]


@dlq.command("replay")
@url_option
@creds_option
@_selection
def dlq_replay(
    url: str | None,
    creds: str | None,
    ids: tuple[int, ...],
    select_all: bool,
    event_type: str | None,
    consumer: str | None,
) -> None:
    """Publish dead letters again to their subjects and remove them from the DLQ."""
    _select(ids, select_all, event_type, consumer)

    async def action(queue: DeadLetterQueue) -> int:
        code = EXIT_OK
        targets = await _targets(queue, ids, event_type, consumer)
        for entry_id in targets:
            try:
                entry = await queue.replay(entry_id)
            except GDCWorkerError as exc:
                click.echo(f"Error: {exc}", err=True)
                code = EXIT_FAILURE
                continue
            record = entry.record
            what = f"event {record.event_id}" if record.event_id else "message"
            click.echo(f"replayed #{entry_id}: {what} to {record.subject}")
        if not targets:
            click.echo("no dead letters")
        return code

    _run_dlq(url, creds, action)


@dlq.command("purge")
@url_option
@creds_option
@_selection
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(
    url: str | None,
    creds: str | None,
    ids: tuple[int, ...],
    select_all: bool,
    event_type: str | None,
    consumer: str | None,
    yes: bool,
) -> None:
    """Delete dead letters for good."""
    _select(ids, select_all, event_type, consumer)

    async def action(queue: DeadLetterQueue) -> int:
        targets = await _targets(queue, ids, event_type, consumer)
        if not targets:
            click.echo("no dead letters")
            return EXIT_OK
        if not yes:
            shown = ", ".join(f"#{i}" for i in targets[:10]) + (" ..." if len(targets) > 10 else "")
            prompt = f"Delete {len(targets)} dead letter(s) ({shown}) for good?"
            if not await anyio.to_thread.run_sync(lambda: click.confirm(prompt, default=False)):
                click.echo("nothing deleted")
                return EXIT_FAILURE
        code = EXIT_OK
        for entry_id in targets:
            try:
                await queue.purge(entry_id)
            except GDCWorkerError as exc:
                click.echo(f"Error: {exc}", err=True)
                code = EXIT_FAILURE
                continue
            click.echo(f"purged #{entry_id}")
        return code

    _run_dlq(url, creds, action)
