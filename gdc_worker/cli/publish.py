"""`gdc-worker publish TYPE`: publish one event, its payload checked first when its type has one."""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import click

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..events import (
    TRACE_HEADER,
    Event,
    EventType,
    new_alert_triggered_event,
    new_exec_progress_event,
    new_health_changed_event,
    new_pin_requested_event,
    new_plan_ready_event,
    new_policy_updated_event,
    parse_event_data,
)
from ..payloads import payload_types
from ..subjects import check_event_type
from .common import (
    EXIT_OK,
    EXIT_USAGE,
    ReportedError,
    connection,
    creds_option,
    pattern_of,
    reported_errors,
    url_option,
)

__all__ = ["publish"]

#: The constructors that name an event's subject from its payload, when --subject is not given.
_SUBJECT_FROM: dict[str, Callable[[str, Any], Event]] = {
    EventType.PIN_REQUESTED: new_pin_requested_event,
    EventType.PLAN_READY: new_plan_ready_event,
    EventType.EXEC_PROGRESS: new_exec_progress_event,
    EventType.HEALTH_CHANGED: new_health_changed_event,
    EventType.POLICY_UPDATED: new_policy_updated_event,
    EventType.ALERT_TRIGGERED: new_alert_triggered_event,
}


def _not_a_number(constant: str) -> float:
    """Python's json reads NaN and Infinity, which JSON has not: the event would store null."""
    raise ValueError(f"{constant} is not a JSON number")


def _data(value: str | None) -> dict[str, Any]:
    """`--data`: a JSON object, or `@FILE` holding one (UTF-8, a BOM allowed); bad usage
    (exit 2) otherwise."""
    if value is None:
        return {}
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise ReportedError(f"--data: {value[1:]} is not UTF-8 text", EXIT_USAGE) from None
        except OSError as exc:
            raise ReportedError(
                f"--data: cannot read {value[1:]}: {exc.strerror}", EXIT_USAGE
            ) from None
    try:
        data = json.loads(text, parse_constant=_not_a_number)
    except ValueError as exc:  # json.JSONDecodeError too
        raise ReportedError(f"--data: not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise ReportedError(f"--data: must be a JSON object, got {type(data).__name__}", EXIT_USAGE)
    return data


def _unknown(event_type: str) -> str:
    """Why an event type no GDC service handles is not published, with the closest one."""
    close = difflib.get_close_matches(event_type, [t.value for t in EventType], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"event type {event_type!r} is not a GDC event type{hint}, so no GDC handler would get "
        "it; to publish a type of your own, add --any-type"
    )


@click.command(
    epilog="""Examples:

\b
  gdc-worker publish pin.requested --data '{"cid": "bafy...", "size": 1024}'
  gdc-worker publish node.up --data @node.json --subject node-1 --trace-id t-42
"""
)
@click.argument("event_type", metavar="TYPE")
@url_option
@creds_option
@click.option("--data", help="The event's data: a JSON object, or @FILE holding one.")
@click.option("--source", default="gdc-worker-cli", show_default=True, help="The event's source.")
@click.option(
    "--subject",
    help="The event's subject; for a typed payload, by default what its service would use "
    "(the cid of pin.requested, ...).",
)
@click.option("--trace-id", default="", help="The event's trace id.")
@click.option(
    "--any-type",
    is_flag=True,
    help="Publish a TYPE that is not a GDC event type (one your own services define).",
)
def publish(
    event_type: str,
    url: str | None,
    creds: str | None,
    data: str | None,
    source: str,
    subject: str | None,
    trace_id: str,
    any_type: bool,
) -> None:
    """Publish one event of TYPE and print its stream sequence.

    The data is checked against the payload struct of its type first (every GDC type has
    one): a value of the wrong type exits 1, naming the field, and nothing is published. A
    TYPE that is not a GDC one (a typo, say) exits 2 unless --any-type. It publishes
    directly, never through an outbox: NATS out of reach exits 4.
    """
    pattern_of("TYPE", event_type, check_event_type)
    if not source.strip():  # an unset shell variable: the event would name no service
        raise ReportedError("--source is empty: name the publishing service", EXIT_USAGE)
    if not trace_id.isprintable() or trace_id != trace_id.strip():
        raise ReportedError(  # nats-py rewrites them in the header: it would differ
            f"--trace-id {trace_id!r}: control characters and surrounding spaces cannot go in "
            f"its {TRACE_HEADER} header as given",
            EXIT_USAGE,
        )
    with reported_errors():
        event = Event.new(event_type, source, subject or "", _data(data))
        event.with_trace_id(trace_id)
        payload_type = payload_types().get(event_type)  # the GDC types' and registered ones
        if payload_type is None and not any_type:
            raise ReportedError(_unknown(event_type), EXIT_USAGE)
        if payload_type is not None:
            payload = parse_event_data(event, payload_type)
            constructor = _SUBJECT_FROM.get(event_type)
            if subject is None and constructor is not None:
                event.subject = constructor(source, payload).subject

        async def main() -> int:
            config = NATSConfig.from_env(None, **connection(url, creds))
            async with await NATSEventBus.connect(config, setup_stream=False) as bus:
                seq = await bus.publish_event(event)  # no outbox without setup_stream
                click.echo(
                    f"published {event.type} event {event.id} as #{seq} in {config.stream_name}"
                )
            return EXIT_OK

        code = anyio.run(main)
    sys.exit(code)
