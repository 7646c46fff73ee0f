"""Pure helpers for NATS subjects: event types and patterns, consumer names, overlaps."""

from __future__ import annotations

import re

from .errors import PublishError, SubscriptionError

__all__ = ["check_event_type", "check_pattern", "is_event_type", "safe_name", "subjects_overlap"]

_PATTERN_TOKEN = re.compile(r"[A-Za-z0-9_-]+|\*|>")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def safe_name(text: str) -> str:
    """`text` as a consumer name, as the Go bus makes it: '.' (and whitespace) as '-', '*' as
    'star', '>' as 'gt' (none of them are allowed in a name)."""
    return re.sub(r"[\s.]+", "-", text).replace("*", "star").replace(">", "gt")


def check_pattern(pattern: str) -> str:
    """Validate an event type or pattern (`pin.requested`, `pin.*`, `>`); returns it.

    Raises `SubscriptionError` naming the pattern.
    """
    tokens = pattern.split(".") if pattern else [""]
    valid = all(_PATTERN_TOKEN.fullmatch(t) for t in tokens) and ">" not in tokens[:-1]
    if not valid:
        raise SubscriptionError(
            f"{pattern!r} is not an event type or pattern: use dot-separated names, '*' for one "
            "token or a final '>' for the rest (e.g. 'pin.requested', 'pin.*')"
        )
    return pattern


def is_event_type(event_type: str) -> bool:
    """Whether `event_type` is a literal subject suffix (`pin.requested`): no wildcard."""
    return _EVENT_TYPE.fullmatch(event_type) is not None


def check_event_type(event_type: str) -> str:
    """Validate the type of an event to publish; raises `PublishError` naming it."""
    if not is_event_type(event_type):
        raise PublishError(
            f"event type {event_type!r} cannot be published: it must be dot-separated names of "
            "letters, digits, '-' or '_' (e.g. 'pin.requested'), without wildcards"
        )
    return event_type


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both NATS subject patterns `a` and `b`."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)
