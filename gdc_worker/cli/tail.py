"""`gdc-worker tail [PATTERN]`: print the events of the stream as they are stored."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click
import msgspec

from ..bus import NATSEventBus, TailedMessage
from ..config import NATSConfig
from ..errors import EventDecodeError
from ..events import Event
from .common import (
    EXIT_OK,
    connection,
    creds_option,
    one_line,
    pattern_of,
    reported_errors,
    run_until_stopped,
    since_option,
    url_option,
)

__all__ = ["tail"]

#: How many events `tail` shows first, without --last, --since or --new.
DEFAULT_LAST = 10
#: How many bytes of a message that is not an event the text lines show (it may be binary,
#: up to the server's max payload).
NOT_AN_EVENT_SHOWN = 200


@click.command(
    epilog="""Examples:

\b
  gdc-worker tail                      # the last 10 events, then each new one
  gdc-worker tail 'pin.*' --since 10m
  gdc-worker tail node.up --new --json | jq .data
"""
)
@click.argument(
    "pattern", default=">", callback=lambda ctx, param, value: pattern_of("PATTERN", value)
)
@url_option
@creds_option
@click.option(
    "--last", type=click.IntRange(min=1), help=f"Start with the last N events ({DEFAULT_LAST})."
)
@click.option(
    "--since",
    callback=since_option,
    help="Start with the events stored since then (10m, 2h, 1d ago, or an ISO time).",
)
@click.option("--new", "new_only", is_flag=True, help="Only events stored from now on.")
@click.option("--json", "as_json", is_flag=True, help="One event envelope (JSON) per line.")
def tail(
    pattern: str,
    url: str | None,
    creds: str | None,
    last: int | None,
    since: datetime | None,
    new_only: bool,
    as_json: bool,
) -> None:
    """Print the events of type PATTERN (`pin.*`; every type by default) as they are stored,
    until Ctrl-C.

    It reads through an ephemeral ordered consumer of its own: no durable consumer, and so no
    worker, sees a difference. A message that is not an event is printed as its bytes.
    """
    if sum((last is not None, since is not None, new_only)) > 1:
        raise click.UsageError("give one of --last, --since and --new")
    if last is None and since is None and not new_only:
        last = DEFAULT_LAST

    async def follow() -> None:
        config = NATSConfig.from_env(None, **connection(url, creds))
        subject = config.subject_for(pattern)
        async with (
            await NATSEventBus.connect(config, setup_stream=False) as bus,
            bus.tail(subject, last=last or 0, since=since) as messages,
        ):
            click.echo(f"following {subject} on stream {config.stream_name}", err=True)
            async for message in messages:
                click.echo(_json_line(message) if as_json else _text_line(message))

    with reported_errors():
        run_until_stopped(follow)  # `tail --json | head` too
    sys.exit(EXIT_OK)


def _event(message: TailedMessage) -> Event | None:
    try:
        return Event.from_json(message.data)
    except EventDecodeError:
        return None


def _text_line(message: TailedMessage) -> str:
    when = message.time.isoformat(timespec="milliseconds")
    event = _event(message)
    if event is None:
        shown = message.data[:NOT_AN_EVENT_SHOWN]
        more = len(message.data) - len(shown)
        rest = f"... ({more} more bytes; --json prints them)" if more else ""
        return f"#{message.seq} {when} {message.subject}: not an event: {shown!r}{rest}"
    data = json.dumps(event.data, sort_keys=True, separators=(",", ":"))
    trace = f" trace={event.trace_id}" if event.trace_id else ""
    return one_line(
        f"#{message.seq} {when} {event.type} id={event.id} source={event.source} "
        f"subject={event.subject}{trace} data={data}"
    )


def _json_line(message: TailedMessage) -> str:
    """The event as stored (its envelope); a message that is not one as an object saying so."""
    event = _event(message)
    if event is not None:
        return event.to_json().decode()
    return msgspec.json.encode(
        {
            "not_an_event": True,
            "seq": message.seq,
            "subject": message.subject,
            "data": message.data.decode("utf-8", "backslashreplace"),
        }
    ).decode()
