"""Connection and stream settings, with the Go bus's defaults and `GDC_NATS_*` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .subjects import subjects_overlap

__all__ = ["NATSConfig", "redact_url"]

ENV_PREFIX = "GDC_NATS_"
#: The values of `NATSConfig.stream_setup`.
STREAM_SETUPS = ("create", "update", "none")
_FORBIDDEN_IN_NAMES = frozenset(".*> \t\r\n")
#: JetStream keeps limits in int64 and durations in int64 nanoseconds (about 292 years).
_INT64_MAX = 2**63 - 1
_MAX_SECONDS = float(_INT64_MAX // 10**9)
_SCHEMES = ("nats", "tls", "ws", "wss")
_WEBSOCKET_SCHEMES = ("ws", "wss")


@dataclass(frozen=True)
class NATSConfig:
    """Where the bus connects and how its streams are set up.

    `NATSConfig()` equals the Go bus's `DefaultNATSConfig()`, plus a duplicate window of
    5 minutes (what the Go bus sets; the server's own default is 2). Durations are seconds.
    `url` may name several servers, comma-separated (see `servers`).
    An invalid value raises `ConfigError` (a `ValueError`) naming the field: a URL nats-py
    cannot use, a number that is not finite, of the wrong type or out of range, a name that
    JetStream refuses, or two streams of one name.
    Every field can also come from the environment: `GDC_NATS_<FIELD>` (see `from_env`).

    Credentials: `user` and `password` (or `user:password@` in the URL; these fields win),
    `token` (or `token@` in the URL), `nkey_seed_file` (a user nkey seed) or `creds_file` (a
    JWT `.creds` file). TLS is used for `tls://` URLs and whenever a `tls_*` file is given:
    `tls_ca_file` to trust (the system's trust store otherwise), `tls_cert_file` and
    `tls_key_file` for a client certificate (mutual TLS), `tls_handshake_first` for servers
    that expect the TLS handshake before their INFO. Secrets are kept out of `repr()`, and the
    files are read when the bus connects.

    Outbox: with `outbox_path` (a local SQLite file), publishes that cannot reach JetStream
    wait there, at most `outbox_max_events` events and `outbox_max_bytes` bytes, and the bus
    connects (and keeps reconnecting, whatever `max_reconnect_attempts` says) in the
    background; see `gdc_worker.outbox`.
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
    # What a worker may do to the event stream: "create" it when missing (the default),
    # "update" it to these limits as the Go bus does, or "none": never touch it.
    stream_setup: str = "create"
    # Authentication (empty: not used); see the class docstring.
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    nkey_seed_file: str = ""
    creds_file: str = ""
    # TLS.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_handshake_first: bool = False
    # The outbox (empty: none); see the class docstring.
    outbox_path: str = ""
    outbox_max_events: int = 100_000
    outbox_max_bytes: int = 256 * 1024**2

    def __post_init__(self) -> None:
        # Accept a list (or one string) for convenience; store an immutable tuple.
        subjects = self.stream_subjects
        try:
            subjects = (subjects,) if isinstance(subjects, str) else tuple(subjects)
        except TypeError:
            raise ConfigError(
                f"stream_subjects: must be a subject or a list of them, got {subjects!r}"
            ) from None
        object.__setattr__(self, "stream_subjects", subjects)
        self._validate()

    def _validate(self) -> None:
        if self.stream_setup not in STREAM_SETUPS:
            raise ConfigError(
                f"stream_setup: must be one of {', '.join(STREAM_SETUPS)}, "
                f"got {self.stream_setup!r}"
            )
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                shown = type(value).__name__ if name in _SECRET_FIELDS else repr(value)
                raise ConfigError(f"{name}: must be a string, got {shown}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.tls_key_file and not self.tls_cert_file:
            raise ConfigError("tls_key_file: given without tls_cert_file, the certificate")
        if self.nkey_seed_file and self.creds_file:
            raise ConfigError("nkey_seed_file: give either it or creds_file, not both")
        for name in _SECONDS_FIELDS:
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name))
        self.servers  # noqa: B018 - raises for a URL nats-py cannot use
        for name in ("stream_name", "dlq_stream_name"):
            _check_stream_name(name, getattr(self, name))
        if self.dlq_stream_name == self.stream_name:
            raise ConfigError(
                f"dlq_stream_name: {self.dlq_stream_name!r} is also the stream_name: dead "
                "letters need a stream of their own"
            )
        if not self.stream_subjects:
            raise ConfigError("stream_subjects: at least one subject is required")
        for subject in self.stream_subjects:
            if (
                not isinstance(subject, str)
                or not subject
                or any(c.isspace() for c in subject)
                or ".." in subject
            ):
                raise ConfigError(f"stream_subjects: {subject!r} is not a valid NATS subject")
        if self.replicas < 1:
            raise ConfigError(f"replicas: must be at least 1, got {self.replicas}")
        for name in ("outbox_max_events", "outbox_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("max_bytes", "max_msgs"):
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
    def servers(self) -> list[str]:
        """The server URLs in `url` (a comma-separated list, as Go's `nats.Connect` takes),
        each with its scheme (`nats://` when it has none): what nats-py's `connect` takes.

        Raises `ConfigError` for a URL nats-py cannot use; the message hides any password.
        """
        entries = [entry.strip() for entry in self.url.split(",")]
        servers = [_check_server(entry) for entry in entries if entry]
        if not servers:
            raise ConfigError("url: must not be empty")
        websocket = {urlsplit(server).scheme in _WEBSOCKET_SCHEMES for server in servers}
        if len(websocket) > 1:
            raise ConfigError(
                f"url: {redact_url(self.url)!r} mixes websocket (ws, wss) and nats or tls "
                "servers: a client uses one kind"
            )
        return servers

    def __repr__(self) -> str:
        # The dataclass repr, with the URL's password hidden too (password and token are
        # left out).
        shown = (
            f"{f.name}={redact_url(self.url) if f.name == 'url' else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr
        )
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def uses_tls(self) -> bool:
        """Whether the connection is TLS: a `tls://` or `wss://` URL, or a `tls_*` option."""
        schemes = {urlsplit(server).scheme for server in self.servers}
        options = (self.tls_ca_file, self.tls_cert_file, self.tls_handshake_first)
        return bool(schemes & {"tls", "wss"}) or any(options)

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

        `GDC_NATS_STREAM_SUBJECTS` is a comma-separated list; a true/false setting takes
        true, false, 1, 0, yes or no (any case). A value of the wrong type, or a
        `GDC_NATS_*` variable that names no setting (a misspelt or old name, which would
        otherwise be ignored without a word), raises `ConfigError` naming the variable.
        """
        env = os.environ if env is None else env
        _check_names(env)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None or overrides.get(f.name) is not None:
                continue
            try:
                values[f.name] = _parse(f, raw)
            except ValueError:
                shown = "the value" if f.name in _SECRET_FIELDS else repr(raw)
                raise ConfigError(f"{key}: {shown} is not a valid {f.name}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


#: `GDC_NATS_*` variables that are not settings: the nats-server binary to run.
_OTHER_VARIABLES = frozenset({"GDC_NATS_SERVER"})
#: What Kubernetes sets in every pod for a Service named `gdc-nats` (service links).
_SERVICE_LINK = re.compile(
    r"^GDC_NATS_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_ADDR|_PORT|_PROTO)?)?)$"
)


def _check_names(env: Mapping[str, str]) -> None:
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(NATSConfig)}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    for key in unknown:
        if key in _OTHER_VARIABLES or _SERVICE_LINK.match(key):
            continue
        suffixes = sorted(k.removeprefix(ENV_PREFIX) for k in known)
        close = difflib.get_close_matches(key.removeprefix(ENV_PREFIX), suffixes, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        raise ConfigError(f"{key}: no such setting{hint}; unset it or use a GDC_NATS_<FIELD> name")


# Which checks each field gets, by its annotation: every float is a duration in seconds.
_FIELDS = dataclasses.fields(NATSConfig)
_TEXT_FIELDS = tuple(f.name for f in _FIELDS if f.type == "str")
_SECONDS_FIELDS = tuple(f.name for f in _FIELDS if f.type == "float")
_INT_FIELDS = tuple(f.name for f in _FIELDS if f.type == "int")
_BOOL_FIELDS = tuple(f.name for f in _FIELDS if f.type == "bool")
#: Fields whose values are never shown in a message or `repr()`.
_SECRET_FIELDS = frozenset({"password", "token"})
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(raw: str) -> bool:
    try:
        return _BOOLS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": _parse_bool}


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _PARSERS.get(str(f.type))
    if kind is not None:
        return kind(raw)
    if f.name == "stream_subjects":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    return raw


def _seconds(name: str, value: Any) -> float:
    """`value` as a float of seconds; `ConfigError` unless it is a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}: must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ConfigError(f"{name}: must be a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{name}: must not be negative, got {value!r}")
    if seconds > _MAX_SECONDS:
        raise ConfigError(f"{name}: must be at most {_MAX_SECONDS:.0f}s, got {value!r}")
    return seconds


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise ConfigError(f"{name}: must fit in 64 bits, got {value}")


def _check_server(entry: str) -> str:
    """One server of `url`, with its scheme; `ConfigError` (password hidden) if it is unusable."""

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"url: {redact_url(entry)!r} is not a valid NATS URL: {reason}")

    if any(c.isspace() for c in entry):
        raise refuse("it contains whitespace")
    scheme, sep, rest = entry.partition("://")
    # No scheme means nats, for nats-py and Go's client; nats-py only knows lower-case ones.
    url = f"{scheme.lower()}://{rest}" if sep else f"nats://{entry}"
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if any(c in userinfo for c in "/?#"):  # the password would be read as the host and path
        raise refuse("'/', '?' and '#' in a user name or password must be percent-encoded")
    try:
        parts = urlsplit(url)
    except ValueError:  # only for brackets that do not pair up
        raise refuse("unbalanced '[' or ']' around the host") from None
    if parts.scheme.lower() not in _SCHEMES:
        raise refuse(f"unknown scheme {parts.scheme!r} (use nats, tls, ws or wss)")
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("["):
        port = hostport.partition("]")[2]
        if port and not port.startswith(":"):
            raise refuse(f"unexpected {port!r} after the IPv6 address")
        has_port, port = bool(port), port[1:]
    else:
        if hostport.count(":") > 1:
            raise refuse("an IPv6 address goes in brackets, as nats://[::1]:4222")
        _, colon, port = hostport.rpartition(":")
        has_port = bool(colon)
    if not parts.hostname:
        raise refuse("no host")
    if has_port:
        if not (port.isascii() and port.isdigit()):
            raise refuse(f"port {port!r} is not a number" if port else "empty port")
        if not 1 <= int(port) <= 65535:
            raise refuse(f"port {int(port)} is not in 1-65535")
    path_allowed = parts.scheme.lower() in _WEBSOCKET_SCHEMES  # a websocket proxy's path
    if not path_allowed and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise refuse("a nats:// or tls:// URL has no path, query or fragment")
    return url


def _check_stream_name(field_name: str, name: str) -> None:
    if not name or any(c in _FORBIDDEN_IN_NAMES for c in name):
        raise ConfigError(
            f"{field_name}: {name!r} is not a valid stream name "
            "(it must be non-empty, without '.', '*', '>' or spaces)"
        )


def redact_url(url: str) -> str:
    """`url` (or a comma-separated list of them) with any password or token shown as `***`.

    `user:password@` becomes `user:***@`; a lone `token@` (NATS token auth) becomes `***@`.
    """
    return ",".join(_redact_one(part.strip()) for part in url.split(","))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    # Everything before the last '@' is user info: hide too much rather than a password that
    # holds a '/', '?' or '#'.
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{shown}@{host}"
