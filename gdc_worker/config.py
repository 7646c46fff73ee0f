"""Connection and stream settings, with the Go bus's defaults and `GDC_NATS_*` overrides."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .subjects import subjects_overlap

__all__ = ["NATSConfig", "redact_url"]

ENV_PREFIX = "GDC_NATS_"
_FORBIDDEN_IN_NAMES = frozenset(".*> \t\r\n")


@dataclass(frozen=True)
class NATSConfig:
    """Where the bus connects and how its streams are set up.

    `NATSConfig()` equals the Go bus's `DefaultNATSConfig()`, plus a duplicate window of
    5 minutes (what the Go bus sets; the server's own default is 2). Durations are seconds.
    An invalid value raises `ConfigError` (a `ValueError`) naming the field.
    Every field can also come from the environment: `GDC_NATS_<FIELD>` (see `from_env`).
    """

    url: str = "nats://localhost:4222"
    stream_name: str = "GDC_EVENTS"
    stream_subjects: tuple[str, ...] = ("gdc.events.>",)
    max_age: float = 24 * 3600.0
    max_bytes: int = 1024**3
    max_msgs: int = 1_000_000
    replicas: int = 1
    connect_timeout: float = 10.0
    reconnect_wait: float = 2.0
    # 0 never reconnects, a negative value reconnects forever.
    max_reconnect_attempts: int = 10
    duplicate_window: float = 5 * 60.0
    # Where failed events are kept for operators; its subjects must not overlap the stream's.
    dlq_stream_name: str = "GDC_DLQ"
    dlq_subject_prefix: str = "gdc.dlq"
    dlq_max_age: float = 14 * 24 * 3600.0

    def __post_init__(self) -> None:
        # Accept a list (or one string) for convenience; store an immutable tuple.
        subjects = self.stream_subjects
        subjects = (subjects,) if isinstance(subjects, str) else tuple(subjects)
        object.__setattr__(self, "stream_subjects", subjects)
        self._validate()

    def _validate(self) -> None:
        if not self.url.strip():
            raise ConfigError("url: must not be empty")
        for name in ("stream_name", "dlq_stream_name"):
            _check_stream_name(name, getattr(self, name))
        if not self.stream_subjects:
            raise ConfigError("stream_subjects: at least one subject is required")
        for subject in self.stream_subjects:
            if not subject or any(c.isspace() for c in subject) or ".." in subject:
                raise ConfigError(f"stream_subjects: {subject!r} is not a valid NATS subject")
        if self.replicas < 1:
            raise ConfigError(f"replicas: must be at least 1, got {self.replicas}")
        for name in (
            "max_age",
            "max_bytes",
            "max_msgs",
            "connect_timeout",
            "reconnect_wait",
            "duplicate_window",
            "dlq_max_age",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.connect_timeout == 0:
            raise ConfigError("connect_timeout: must be positive")
        if self.max_age and self.duplicate_window > self.max_age:
            raise ConfigError(
                f"duplicate_window: {self.duplicate_window}s exceeds max_age {self.max_age}s"
            )
        self.subject_prefix  # noqa: B018 - raises when no subject ends in a wildcard
        prefix = self.dlq_subject_prefix
        if not prefix or any(c.isspace() or c in "*>" for c in prefix) or ".." in prefix:
            raise ConfigError(f"dlq_subject_prefix: {prefix!r} is not a valid subject prefix")
        if any(subjects_overlap(prefix + ".>", s) for s in self.stream_subjects):
            raise ConfigError(
                f"dlq_subject_prefix: {prefix!r} overlaps the event subjects "
                f"{list(self.stream_subjects)}"
            )

    @property
    def subject_prefix(self) -> str:
        """What goes before the event type in a subject: `gdc.events.` for `gdc.events.>`."""
        for subject in self.stream_subjects:
            head, _, last = subject.rpartition(".")
            if head and last == ">" and "*" not in head and ">" not in head:
                return head + "."
        raise ConfigError(
            f"stream_subjects: none of {list(self.stream_subjects)} ends in '.>', so event types "
            "(two tokens, as pin.requested) cannot be mapped to subjects"
        )

    def subject_for(self, event_type: str) -> str:
        """The subject an event of `event_type` is published on."""
        return self.subject_prefix + event_type

    def replace(self, **changes: Any) -> NATSConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> NATSConfig:
        """Defaults, then `GDC_NATS_<FIELD>` variables (e.g. `GDC_NATS_URL`), then `overrides`.

        `GDC_NATS_STREAM_SUBJECTS` is a comma-separated list. A value of the wrong type raises
        `ValueError` naming the variable.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None or overrides.get(f.name) is not None:
                continue
            try:
                values[f.name] = _parse(f, raw)
            except ValueError:
                raise ConfigError(f"{key}: {raw!r} is not a valid {f.name}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = {"int": int, "float": float}.get(str(f.type))
    if kind is not None:
        return kind(raw)
    if f.name == "stream_subjects":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    return raw


def _check_stream_name(field_name: str, name: str) -> None:
    if not name or any(c in _FORBIDDEN_IN_NAMES for c in name):
        raise ConfigError(
            f"{field_name}: {name!r} is not a valid stream name "
            "(it must be non-empty, without '.', '*', '>' or spaces)"
        )


def redact_url(url: str) -> str:
    """`url` (or a comma-separated list of them) with any password shown as `***`."""
    return ",".join(
        re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:]*:)[^/@]*@", r"\1***@", part.strip(), flags=re.I)
        for part in url.split(",")
    )
