"""Log lines as JSON, one object per line (`gdc-worker run --log-format json`).

Lines about a delivery carry its facts as fields (`delivery_fields`), so a log pipeline can
follow one event across services by `event_id` or `trace_id` (Go services' events included:
their envelope has a trace_id even without a traceparent header).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import describe

if TYPE_CHECKING:
    from .app import HandlerSpec
    from .dlq import FailedMessage
    from .events import Event

__all__ = ["DELIVERY_KEYS", "JSONFormatter", "delivery_fields"]

#: The keys of a line about a delivery.
DELIVERY_KEYS = ("event_id", "trace_id", "handler", "consumer", "deliveries", "outcome")


def delivery_fields(
    spec: HandlerSpec, delivery: FailedMessage, event: Event | None, outcome: str
) -> dict[str, Any]:
    """The `extra` of a log line about `delivery`; `event` is None for one that did not decode."""
    return {
        "event_id": event.id if event is not None else "",
        "trace_id": event.trace_id if event is not None else "",
        "handler": spec.name,
        "consumer": spec.durable,
        "deliveries": delivery.deliveries,
        "outcome": outcome,
    }


class JSONFormatter(logging.Formatter):
    """`{"time", "level", "logger", "pid", "message", ...}`, plus the delivery keys a line has,
    the traceback as `exc_info` and the stack as `stack_info` when there is one.

    A record whose arguments do not fit its message (a library's mistake) is still one line:
    the message and its arguments as they are, and why as `log_error`. Otherwise logging would
    print a multi-line `--- Logging error ---` block among the JSON lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        try:
            line["message"] = record.getMessage()
        except Exception as exc:
            line["message"] = f"{record.msg} {record.args!r}"
            line["log_error"] = describe(exc)
        for key in DELIVERY_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)
