"""`gdc-worker dlq`: list, show, replay and purge dead letters."""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import click
import msgspec

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..dlq import DeadLetterEntry, DeadLetterQueue, ReplayPlan, ReplaySummary
from ..errors import GDCWorkerError
from ..supervisor import STOP_SIGNALS
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ReportedError,
    aligned,
    connection,
    creds_option,
    one_line,
    pattern_of,
    reported_errors,
    since_option,
    url_option,
)

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

__all__ = ["dlq"]

F = TypeVar("F", bound=Callable[..., Any])

#: A dead letter's id: its sequence in the dead-letter stream, 1 to JetStream's uint64.
ENTRY_ID = click.IntRange(min=1, max=2**64 - 1)


def _event_type(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--type`: an event type or pattern; empty or no subject is bad usage, never "all"."""
    return None if value is None else pattern_of("--type", value)


def _named(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`--consumer` and `--error`: a name; an empty one (an unset shell variable) is bad
    usage, never "all" (with `purge --all`, that would delete every dead letter)."""
    if value is None or value.strip():
        return value
    option = param.opts[0] if param.opts else str(param.name)
    raise ReportedError(f"{option} is empty: give a name or leave the option out", EXIT_USAGE)


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
    """A row of the table, each cell at most 60 characters (an empty one shows as `-`)."""
    if row["unreadable"]:
        row = {**row, "event_type": "unreadable"}
    return [str(row[c])[:60] if row[c] is not None else "" for c in columns]


def _rate(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        rate = float(value.removesuffix("/s"))
    except ValueError:
        rate = 0.0
    if not rate > 0 or math.isinf(rate):
        raise ReportedError(
            f"--rate {value!r}: give records per second, a number above 0 (such as 500)",
            EXIT_USAGE,
        )
    return rate


@dataclass(frozen=True)
class _Filters:
    """The entries `--type`, `--consumer`, `--since` and `--error` select."""

    event_type: str | None
    consumer: str | None
    since: datetime | None
    error_type: str | None

    def given(self) -> bool:
        return any(value is not None for value in astuple(self))

    def entries(
        self, queue: DeadLetterQueue, limit: int | None = None
    ) -> AsyncIterator[DeadLetterEntry]:
        return queue.entries(
            event_type=self.event_type,
            consumer=self.consumer,
            since=self.since,
            error_type=self.error_type,
            limit=limit,
        )

    async def count(self, queue: DeadLetterQueue) -> int:
        return await queue.count(
            event_type=self.event_type,
            consumer=self.consumer,
            since=self.since,
            error_type=self.error_type,
        )


def _filters(func: F) -> F:
    """The four filter options, given to the command as one `filters: _Filters`."""

    @functools.wraps(func)
    def command(
        *args: Any,
        event_type: str | None,
        consumer: str | None,
        since: datetime | None,
        error_type: str | None,
        **kwargs: Any,
    ) -> Any:
        filters = _Filters(event_type, consumer, since, error_type)
        return func(*args, filters=filters, **kwargs)

    options = (
        click.option(
            "--type",
            "event_type",
            callback=_event_type,
            help="Only entries of this event type (or pattern: pin.*).",
        ),
        click.option(
            "--consumer", callback=_named, help="Only entries of this consumer (durable)."
        ),
        click.option(
            "--since",
            callback=since_option,
            metavar="AGE|TIME",
            help="Only records that failed since then: 10m, 2h, 1d ago, or an ISO time.",
        ),
        click.option(
            "--error",
            "error_type",
            callback=_named,
            metavar="TYPE",
            help="Only records whose error is of this type (e.g. Reject, TimeoutError).",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return cast(F, command)


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
    filters: _Filters,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first."""

    async def action(queue: DeadLetterQueue) -> int:
        rows = [_summary(e) async for e in filters.entries(queue, limit)]
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
            return EXIT_OK
        if not rows:
            click.echo("no dead letters")
            return EXIT_OK
        columns = ["id", "failed_at", "consumer", "event_type", "event_id", "deliveries", "error"]
        for line in aligned([columns] + [_cells(row, columns) for row in rows]):
            click.echo(line)
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
        _say(f"id:          {entry.id}")
        if not entry.readable:
            _say(f"unreadable:  {entry.problem}")
            _say(f"subject:     {entry.subject}")
            _say(f"size:        {entry.size} bytes")
            _say(f"first bytes: {entry.head!r}")
            return EXIT_OK
        record = entry.record
        _say(f"failed at:   {record.failed_at.isoformat()}")
        _say(f"reason:      {record.reason}")
        _say(f"consumer:    {record.consumer} (handler {record.handler})")
        _say(f"message:     {record.stream} #{record.stream_seq} on {record.subject}")
        if record.by_reference:
            _say("stored:      by reference (too large to copy): read from that stream")
        _say(f"deliveries:  {record.deliveries}")
        if record.error_type:
            _say(f"error:       {record.error_type}: {record.error_message}")
        if record.event is not None:
            click.echo("event:\n" + json.dumps(msgspec.to_builtins(record.event), indent=2))
        elif not entry.problem:  # with a problem, the message is not there: said last
            _say(f"raw message: {_shown(record.data)}")
        if record.traceback:
            click.echo("traceback:")
            for line in record.traceback.rstrip().splitlines():
                _say(line)
        if entry.problem:
            message = f"Error: cannot show the message of #{entry.id}: {entry.problem}"
            click.echo(one_line(message), err=True)
            return EXIT_FAILURE
        return EXIT_OK

    _run_dlq(url, creds, action)


def _say(line: str) -> None:
    """Print one line of a record: what its writer put there cannot break it or restyle the
    terminal (`one_line`)."""
    click.echo(one_line(line))


def _shown(data: bytes, limit: int = 1000) -> str:
    """The bytes of a message as Python shows them, the first `limit` of them."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r} ... ({len(data)} bytes in all)"


def _select(ids: tuple[int, ...], select_all: bool, filters: _Filters) -> None:
    if bool(ids) == select_all:
        raise click.UsageError("give entry IDs or --all, not both and not neither")
    if ids and filters.given():
        raise click.UsageError("--type, --consumer, --since and --error go with --all, not IDs")


def _targets(
    queue: DeadLetterQueue, ids: tuple[int, ...], filters: _Filters
) -> AsyncIterator[DeadLetterEntry]:
    return queue.selected(ids) if ids else filters.entries(queue)


@dlq.command("replay")
@url_option
@creds_option
@_selection
@click.option(
    "--dry-run", is_flag=True, help="Say what would be replayed, and where to; change nothing."
)
@click.option(
    "--rate", callback=_rate, metavar="N", help="At most N records per second (default: no limit)."
)
@click.option("-v", "--verbose", is_flag=True, help="A line per record replayed (always with IDs).")
def dlq_replay(
    url: str | None,
    creds: str | None,
    ids: tuple[int, ...],
    select_all: bool,
    filters: _Filters,
    dry_run: bool,
    rate: float | None,
    verbose: bool,
) -> None:
    """Publish dead letters again to their subjects and remove them from the DLQ.

    Each record is removed once its replay is acked; one whose replay fails stays, named in
    an error line. On a terminal, a progress bar shows the rate and the time left; then, as
    otherwise, one line sums it up: replayed N, failed M, in S s, R/s.
    """
    _select(ids, select_all, filters)

    async def action(queue: DeadLetterQueue) -> int:
        if dry_run:
            return _show_plan(await queue.plan(_targets(queue, ids, filters)))
        shown = _Progress(verbose or bool(ids))
        if _on_terminal():
            shown.bar(len(ids) if ids else await filters.count(queue))
        stop = anyio.Event()
        summary: ReplaySummary | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, stop, tg.cancel_scope)
            with shown:
                summary = await queue.replay_many(
                    _targets(queue, ids, filters), rate=rate, on_done=shown.done, stop=stop
                )
            tg.cancel_scope.cancel()
        if summary is None:  # a second signal: not even what was sent is settled
            raise ReportedError(
                "stopped by a second signal: a record replayed just now may still be in the "
                "DLQ; replaying it again within the duplicate window stores it once",
                EXIT_FAILURE,
            )
        for line in _grouped(summary.failed, "not replayed"):
            click.echo(f"Error: {line}", err=True)
        if summary.stopped:
            click.echo("Error: stopped by a signal: the rest is still in the DLQ", err=True)
        if not summary.replayed and not summary.failed:
            click.echo("no dead letters")
            return EXIT_OK
        click.echo(
            f"replayed {summary.replayed}, failed {len(summary.failed)}, "
            f"in {summary.seconds:.1f} s, {summary.rate:.0f}/s"
        )
        return EXIT_FAILURE if summary.failed or summary.stopped else EXIT_OK

    _run_dlq(url, creds, action)


async def _stop_on_signal(stop: anyio.Event, scope: anyio.CancelScope) -> None:
    """On a stop signal (SIGINT, SIGTERM, SIGHUP), set `stop`: the replay sends no more, and
    settles what it sent, so that it can say what it did; on a second one, cancel `scope` at
    once. Signals reach the main thread only: elsewhere (click's test runner in a thread)
    there are none to hear."""
    if threading.current_thread() is not threading.main_thread():
        return
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for _ in signals:
            if stop.is_set():
                scope.cancel()
                return
            stop.set()


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """What `replay` shows while it runs: a bar on stderr (when `bar` was called), and with
    `verbose` a line per record replayed."""

    #: The least time between two redraws of the bar.
    REDRAW_S = 0.1

    def __init__(self, verbose: bool) -> None:
        self._verbose = verbose
        self._bar: ProgressBar[int] | None = None
        self._settled = 0
        self._drawn = 0
        self._started = time.monotonic()
        self._last_draw = 0.0

    def bar(self, total: int) -> None:
        self._bar = click.progressbar(
            length=total,
            label="replaying",
            file=sys.stderr,
            show_pos=True,
            show_percent=True,
            show_eta=True,
            item_show_func=lambda rate: f"{rate:,.0f}/s" if rate is not None else None,
        )

    def __enter__(self) -> _Progress:
        self._started = time.monotonic()
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._draw()
            self._bar.__exit__(None, None, None)

    def done(self, entry: DeadLetterEntry, error: str | None) -> None:
        self._settled += 1
        if self._verbose and error is None:
            record = entry.record
            what = f"event {record.event_id}" if record.event_id else "message"
            click.echo(one_line(f"replayed #{entry.id}: {what} to {record.subject}"))
        if self._bar is not None and time.monotonic() - self._last_draw >= self.REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        assert self._bar is not None
        now = time.monotonic()
        rate = self._settled / (now - self._started) if now > self._started else 0.0
        self._bar.update(self._settled - self._drawn, current_item=round(rate))
        self._drawn, self._last_draw = self._settled, now


def _show_plan(plan: ReplayPlan) -> int:
    total = sum(plan.targets.values())
    click.echo(f"would replay {total} dead letter(s), changing nothing now")
    if plan.targets:
        table = [["count", "subject", "event_type"]] + [
            [str(count), subject, event_type]
            for (subject, event_type), count in sorted(plan.targets.items())
        ]
        for line in aligned(table):
            click.echo(line)
    for said in _grouped(plan.unreplayable, "would not be replayed"):
        click.echo(said)
    return EXIT_OK


def _grouped(failures: dict[int, str], what: str, shown: int = 10) -> list[str]:
    """One line per reason, naming the ids it holds for (the first `shown` of them)."""
    by_reason: dict[str, list[int]] = {}
    for entry_id, reason in sorted(failures.items()):
        by_reason.setdefault(reason, []).append(entry_id)
    lines = []
    for reason, ids in by_reason.items():
        if len(ids) == 1:
            lines.append(one_line(f"dead letter #{ids[0]} {what}: {reason}"))
            continue
        named = ", ".join(f"#{i}" for i in ids[:shown])
        more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
        lines.append(one_line(f"{len(ids)} dead letters {what} ({named}{more}): {reason}"))
    return lines


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
    filters: _Filters,
    yes: bool,
) -> None:
    """Delete dead letters for good."""
    _select(ids, select_all, filters)

    async def action(queue: DeadLetterQueue) -> int:
        targets = list(ids) or [e.id async for e in filters.entries(queue)]
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
