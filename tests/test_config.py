"""NATSConfig: the Go bus's defaults, subjects, validation and `GDC_NATS_*` overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from gdc_worker.config import NATSConfig, redact_url
from gdc_worker.errors import ConfigError
from gdc_worker.events import EventType
from gdc_worker.subjects import subjects_overlap


def _matches(subject: str, pattern: str) -> bool:
    """Whether the literal NATS `subject` is matched by `pattern` (`*` one token, `>` the rest)."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, want in enumerate(wanted):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or want not in ("*", tokens[i]):
            return False
    return len(tokens) == len(wanted)


# --- defaults and subjects -------------------------------------------------------------------


def test_defaults_equal_the_go_default_nats_config() -> None:
    """Given no arguments, the config is the Go bus's `DefaultNATSConfig()` (durations in s)."""
    config = NATSConfig()

    assert {
        "url": config.url,
        "stream_name": config.stream_name,
        "stream_subjects": config.stream_subjects,
        "max_age": config.max_age,
        "max_bytes": config.max_bytes,
        "max_msgs": config.max_msgs,
        "replicas": config.replicas,
        "connect_timeout": config.connect_timeout,
        "reconnect_wait": config.reconnect_wait,
        "max_reconnect_attempts": config.max_reconnect_attempts,
        "duplicate_window": config.duplicate_window,
    } == {
        "url": "nats://localhost:4222",
        "stream_name": "GDC_EVENTS",
        "stream_subjects": ("gdc.events.>",),
        "max_age": 86400.0,
        "max_bytes": 1024 * 1024 * 1024,
        "max_msgs": 1_000_000,
        "replicas": 1,
        "connect_timeout": 10.0,
        "reconnect_wait": 2.0,
        "max_reconnect_attempts": 10,
        "duplicate_window": 300.0,
    }


@pytest.mark.parametrize(
    ("subjects", "prefix", "subject"),
    [
        (None, "gdc.events.", "gdc.events.pin.requested"),
        (["test.events.>"], "test.events.", "test.events.pin.requested"),
        ("test.events.>", "test.events.", "test.events.pin.requested"),
        (("audit.>", "test.events.>"), "audit.", "audit.pin.requested"),
    ],
    ids=["default", "list", "one-string", "first-wildcard-wins"],
)
def test_subject_for_puts_the_event_type_after_the_stream_prefix(
    subjects: Any, prefix: str, subject: str
) -> None:
    """When an event is published, its subject is the stream's prefix plus the event type."""
    config = NATSConfig() if subjects is None else NATSConfig(stream_subjects=subjects)

    assert config.subject_prefix == prefix
    assert config.subject_for(EventType.PIN_REQUESTED) == subject
    assert config.subject_for("pin.requested") == subject
    assert isinstance(config.stream_subjects, tuple)


def _uncaptured(config: NATSConfig) -> list[str]:
    """The subjects of event types that none of the config's stream subjects match."""
    return [
        config.subject_for(t)
        for t in EventType
        if not any(_matches(config.subject_for(t), pattern) for pattern in config.stream_subjects)
    ]


@pytest.mark.parametrize(
    "subjects",
    [("gdc.events.>",), ("test.events.>",), ("other.>", "test.events.>")],
    ids=lambda s: s[0],
)
def test_every_event_type_is_published_on_a_subject_the_stream_captures(
    subjects: tuple[str, ...],
) -> None:
    """Given valid stream subjects, each event type's subject falls inside the stream."""
    assert _uncaptured(NATSConfig(stream_subjects=subjects)) == []


def test_stream_subjects_that_cannot_hold_event_types_are_refused() -> None:
    """Given `gdc.events.*` (one token), the config refuses it, or else captures every type."""
    try:
        config = NATSConfig(stream_subjects=("gdc.events.*",))
    except ValueError:
        return  # refused up front: the right outcome
    assert _uncaptured(config) == []


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"url": " "}, "url", id="blank-url"),
        pytest.param({"stream_subjects": ()}, "stream_subjects", id="no-subjects"),
        pytest.param({"stream_subjects": []}, "stream_subjects", id="empty-list"),
        pytest.param({"stream_subjects": ("gdc.events",)}, "stream_subjects", id="no-wildcard"),
        pytest.param(
            {"stream_subjects": ("gdc.events.>", "a b.>")}, "stream_subjects", id="space-in-subject"
        ),
        pytest.param({"stream_subjects": ("gdc..>",)}, "stream_subjects", id="empty-token"),
        pytest.param({"replicas": 0}, "replicas", id="replicas-0"),
        pytest.param({"max_age": -1.0}, "max_age", id="negative-max_age"),
        pytest.param({"max_bytes": -1}, "max_bytes", id="negative-max_bytes"),
        pytest.param({"max_msgs": -1}, "max_msgs", id="negative-max_msgs"),
        pytest.param({"connect_timeout": -1.0}, "connect_timeout", id="negative-timeout"),
        pytest.param({"connect_timeout": 0.0}, "connect_timeout", id="zero-timeout"),
        pytest.param({"reconnect_wait": -0.5}, "reconnect_wait", id="negative-reconnect_wait"),
        pytest.param({"duplicate_window": -1.0}, "duplicate_window", id="negative-dup-window"),
        pytest.param(
            {"max_age": 60.0, "duplicate_window": 120.0}, "duplicate_window", id="window>age"
        ),
        pytest.param({"stream_name": ""}, "stream_name", id="empty-stream"),
        pytest.param({"stream_name": "GDC.EVENTS"}, "stream_name", id="dot-in-stream"),
        pytest.param({"stream_name": "GDC*"}, "stream_name", id="star-in-stream"),
        pytest.param({"stream_name": "GDC>"}, "stream_name", id="gt-in-stream"),
        pytest.param({"stream_name": "GDC EVENTS"}, "stream_name", id="space-in-stream"),
        pytest.param({"dlq_stream_name": "GDC.DLQ"}, "dlq_stream_name", id="dot-in-dlq-stream"),
        pytest.param(
            {"dlq_stream_name": "GDC_EVENTS"}, "dlq_stream_name", id="dlq-stream-is-the-stream"
        ),
        pytest.param(
            {"stream_name": "EVENTS", "dlq_stream_name": "EVENTS"},
            "dlq_stream_name",
            id="both-streams-renamed-alike",
        ),
        pytest.param({"stream_subjects": None}, "stream_subjects", id="subjects-none"),
        pytest.param({"url": None}, "url", id="url-none"),
        pytest.param({"stream_name": 7}, "stream_name", id="stream-name-not-text"),
        pytest.param(
            {"dlq_subject_prefix": "gdc.events"}, "dlq_subject_prefix", id="dlq-equals-events"
        ),
        pytest.param({"dlq_subject_prefix": "gdc"}, "dlq_subject_prefix", id="dlq-above-events"),
        pytest.param(
            {"dlq_subject_prefix": "gdc.events.dead"}, "dlq_subject_prefix", id="dlq-inside-events"
        ),
        pytest.param({"dlq_subject_prefix": "gdc.dlq.>"}, "dlq_subject_prefix", id="dlq-wildcard"),
        pytest.param({"dlq_subject_prefix": ""}, "dlq_subject_prefix", id="dlq-empty"),
    ],
)
def test_invalid_setting_raises_value_error_starting_with_the_field(
    changes: dict[str, Any], field: str
) -> None:
    """Given one bad setting, the config refuses it and the message starts with its name."""
    with pytest.raises(ValueError, match=rf"^{field}: "):
        NATSConfig(**changes)


def test_replace_validates_the_copy() -> None:
    """When a copy is made with a bad setting, it is refused like a fresh config."""
    config = NATSConfig()

    with pytest.raises(ValueError, match=r"^replicas: "):
        config.replace(replicas=0)
    assert config.replace(replicas=3).replicas == 3


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"max_age": 300.0, "duplicate_window": 300.0}, id="window==age"),
        pytest.param({"max_age": 0.0}, id="unlimited-age"),
        pytest.param({"max_bytes": 0, "max_msgs": 0, "duplicate_window": 0.0}, id="zeros"),
        pytest.param({"max_reconnect_attempts": -1}, id="reconnect-forever"),
        pytest.param({"dlq_subject_prefix": "gdc.eventsdlq"}, id="dlq-sibling-token"),
        pytest.param(
            {"stream_subjects": ("gdc.events.>",), "stream_name": "GDC-EVENTS_2"}, id="names"
        ),
    ],
)
def test_edge_values_that_nats_accepts_are_accepted(changes: dict[str, Any]) -> None:
    """Given settings at the edge of valid (0 = unlimited, equal limits), the config is built."""
    config = NATSConfig(**changes)

    for name, value in changes.items():
        assert getattr(config, name) == value


# --- numbers ---------------------------------------------------------------------------------

SECONDS_FIELDS = [f.name for f in dataclasses.fields(NATSConfig) if f.type == "float"]
INT_FIELDS = [f.name for f in dataclasses.fields(NATSConfig) if f.type == "int"]


def test_the_number_checks_below_cover_every_numeric_field() -> None:
    """Given NATSConfig's fields, the tests below find its durations and its integer limits."""
    assert {"max_age", "connect_timeout", "reconnect_wait", "duplicate_window"} <= set(
        SECONDS_FIELDS
    )
    assert {"max_bytes", "max_msgs", "replicas", "max_reconnect_attempts"} <= set(INT_FIELDS)


@pytest.mark.parametrize("field", SECONDS_FIELDS)
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), 1e300, True, "10", None],
    ids=["nan", "inf", "-inf", "beyond-292-years", "bool", "text", "none"],
)
def test_duration_that_is_not_a_finite_number_of_seconds_is_refused(field: str, value: Any) -> None:
    """Given a duration that is not a finite number of seconds JetStream can hold (nan, inf,
    a huge one, a bool, text, None), the config refuses it with one line naming the field."""
    with pytest.raises(ConfigError, match=rf"^{field}: [^\n]+$"):
        NATSConfig(**{field: value})


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 1.5, 2.0, True, False, "3", None, 2**64],
    ids=["nan", "inf", "fraction", "integral-float", "true", "false", "text", "none", "2**64"],
)
def test_limit_that_is_not_an_integer_is_refused(field: str, value: Any) -> None:
    """Given an integer setting that is a float, a bool, text, None or beyond 64 bits,
    the config refuses it with one line naming the field."""
    with pytest.raises(ConfigError, match=rf"^{field}: [^\n]+$"):
        NATSConfig(**{field: value})


def test_durations_given_as_ints_are_kept_as_float_seconds() -> None:
    """Given durations written as ints, the config holds them as the same number of seconds,
    as floats."""
    durations: dict[str, Any] = dict.fromkeys(SECONDS_FIELDS, 60)

    config = NATSConfig(**durations)

    for field in SECONDS_FIELDS:
        value = getattr(config, field)
        assert (type(value), value) == (float, 60.0)


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("nats://localhost:4222", ["nats://localhost:4222"]),
        ("tls://nats.internal:4443", ["tls://nats.internal:4443"]),
        ("ws://localhost:8080", ["ws://localhost:8080"]),
        ("wss://proxy.example/nats", ["wss://proxy.example/nats"]),
        ("nats://localhost", ["nats://localhost"]),
        ("nats://localhost:4222/", ["nats://localhost:4222/"]),
        ("localhost:4222", ["nats://localhost:4222"]),
        ("NATS://localhost:4222", ["nats://localhost:4222"]),
        ("nats://[::1]:4222", ["nats://[::1]:4222"]),
        ("nats://alice:s3cr3t@localhost:4222", ["nats://alice:s3cr3t@localhost:4222"]),
        ("nats://token@localhost:4222", ["nats://token@localhost:4222"]),
        (
            "nats://a:4222, tls://b:4222 ,nats://c:4222,",
            ["nats://a:4222", "tls://b:4222", "nats://c:4222"],
        ),
    ],
)
def test_servers_lists_each_url_with_its_scheme(url: str, servers: list[str]) -> None:
    """Given a URL, or a comma-separated list of them as Go's nats.Connect takes, with the
    schemes nats, tls, ws or wss (none means nats), the config keeps `url` as given and
    `servers` lists each server, for nats-py's connect."""
    config = NATSConfig(url=url)

    assert config.url == url
    assert config.servers == servers


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("nats://", "no host"),
        ("nats://:4222", "no host"),
        ("nats://alice@:4222", "no host"),
        ("nats://[::1", "unbalanced '\\[' or '\\]'"),
        ("nats://::1:4222", "an IPv6 address goes in brackets"),
        ("nats://[::1]4222", "unexpected '4222' after the IPv6 address"),
        ("nats://localhost:65536", "port 65536 is not in 1-65535"),
        ("nats://localhost:0", "port 0 is not in 1-65535"),
        ("nats://localhost:", "empty port"),
        ("nats://localhost:http", "port 'http' is not a number"),
        ("nats://localhost:-1", "port '-1' is not a number"),
        ("http://localhost:4222", "unknown scheme 'http'"),
        ("nats://local host:4222", "whitespace"),
        ("nats://localhost:4222/events", "no path"),
        ("nats://localhost:4222?x=1", "no path, query"),
        ("nats://a:4222,nats://", "no host"),
        ("nats://a:4222, ws://b:8080", "mixes websocket"),
        (" , ", "must not be empty"),
    ],
)
def test_url_nats_py_cannot_use_is_refused_saying_why(url: str, reason: str) -> None:
    """Given a URL (or one server of a list) with no host, a bad port, an unknown scheme,
    a path, or websocket and plain servers mixed, the config refuses it in one line that
    names the field and the problem."""
    with pytest.raises(ConfigError, match=rf"^url: [^\n]*{reason}[^\n]*$"):
        NATSConfig(url=url)


@pytest.mark.parametrize(
    "url",
    [
        "nats://alice:s3cr3t@localhost:99999",
        "nats://alice:s3cr3t@",
        "ftp://alice:s3cr3t@localhost",
        "nats://alice:s3cr3t@localhost:4222/events",
        "nats://alice:s3cr3t@[::1",
        "nats://alice:s3/cr3t@localhost:4222",
        "nats://alice:s3cr3t@a:4222,ws://b:8080",
        "nats://good:4222,nats://alice:s3cr3t@bad:0",
        "nats://s3cr3t@localhost:0",
    ],
)
def test_refused_url_never_shows_its_password_or_token(url: str) -> None:
    """Given a refused URL with a password or a token in it, the message shows `***` in
    its place, and no part of the secret."""
    with pytest.raises(ConfigError) as refused:
        NATSConfig(url=url)

    message = str(refused.value)
    assert "***@" in message
    assert "s3" not in message
    assert "cr3t" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://localhost:4222", "nats://localhost:4222"),
        ("nats://alice:s3cr3t@localhost:4222", "nats://alice:***@localhost:4222"),
        ("nats://s3cr3t@localhost:4222", "nats://***@localhost:4222"),
        ("nats://alice:s3@cr3t@localhost", "nats://alice:***@localhost"),
        ("nats://alice:s3/cr3t@localhost", "nats://alice:***@localhost"),
        ("alice:s3cr3t@localhost:4222", "alice:***@localhost:4222"),
        ("nats://a:1, nats://alice:s3cr3t@b:2", "nats://a:1,nats://alice:***@b:2"),
    ],
)
def test_redact_url_hides_passwords_and_tokens(url: str, shown: str) -> None:
    """Given a URL (or a list) with or without credentials, `redact_url` shows it with any
    password or token replaced by `***`."""
    assert redact_url(url) == shown


# --- from_env --------------------------------------------------------------------------------


def test_from_env_reads_the_gdc_nats_variables() -> None:
    """Given GDC_NATS_* variables, `from_env` parses each into its field's type."""
    env = {
        "GDC_NATS_URL": "nats://nats.internal:4222",
        "GDC_NATS_STREAM_NAME": "TEST_EVENTS",
        "GDC_NATS_STREAM_SUBJECTS": "test.events.>, audit.events.> ,",
        "GDC_NATS_REPLICAS": "3",
        "GDC_NATS_DUPLICATE_WINDOW": "60.5",
        "OTHER_URL": "nats://ignored:1",
    }

    config = NATSConfig.from_env(env=env)

    assert config.url == "nats://nats.internal:4222"
    assert config.stream_name == "TEST_EVENTS"
    assert config.stream_subjects == ("test.events.>", "audit.events.>")
    assert config.replicas == 3
    assert config.duplicate_window == 60.5
    assert config.max_age == NATSConfig().max_age


def test_from_env_with_no_variables_is_the_default() -> None:
    """Given an environment without GDC_NATS_* variables, `from_env` equals `NATSConfig()`."""
    assert NATSConfig.from_env(env={"PATH": "/usr/bin"}) == NATSConfig()


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no mapping is passed, the process environment is read."""
    for key in [k for k in os.environ if k.startswith("GDC_NATS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GDC_NATS_STREAM_NAME", "FROM_OS")

    assert NATSConfig.from_env().stream_name == "FROM_OS"


def test_explicit_overrides_beat_the_environment() -> None:
    """Given both a variable and an explicit value, the explicit value wins; others still apply."""
    env = {"GDC_NATS_URL": "nats://from-env:4222", "GDC_NATS_REPLICAS": "3"}

    config = NATSConfig.from_env(env=env, url="nats://explicit:4222")

    assert config.url == "nats://explicit:4222"
    assert config.replicas == 3


def test_none_override_falls_back_to_the_environment() -> None:
    """Given an override of None (an option not given), the variable still applies."""
    config = NATSConfig.from_env(env={"GDC_NATS_URL": "nats://from-env:4222"}, url=None)

    assert config.url == "nats://from-env:4222"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GDC_NATS_REPLICAS": "abc"}, "GDC_NATS_REPLICAS"),
        ({"GDC_NATS_REPLICAS": "1.5"}, "GDC_NATS_REPLICAS"),
        ({"GDC_NATS_MAX_AGE": "1d"}, "GDC_NATS_MAX_AGE"),
        ({"GDC_NATS_DUPLICATE_WINDOW": ""}, "GDC_NATS_DUPLICATE_WINDOW"),
    ],
    ids=["replicas-abc", "replicas-float", "max-age-unit", "window-empty"],
)
def test_badly_typed_variable_raises_value_error_naming_it(env: dict[str, str], named: str) -> None:
    """Given a variable that does not parse as its field's type, the error names the variable."""
    with pytest.raises(ValueError, match=rf"^{named}: "):
        NATSConfig.from_env(env=env)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"GDC_NATS_REPLICAS": "0"}, "replicas"),
        ({"GDC_NATS_STREAM_SUBJECTS": " , "}, "stream_subjects"),
        ({"GDC_NATS_STREAM_NAME": "GDC.EVENTS"}, "stream_name"),
        ({"GDC_NATS_DLQ_STREAM_NAME": "GDC_EVENTS"}, "dlq_stream_name"),
        ({"GDC_NATS_URL": ""}, "url"),
        ({"GDC_NATS_URL": "nats://"}, "url"),
        ({"GDC_NATS_URL": "nats://[::1"}, "url"),
        ({"GDC_NATS_URL": "nats://localhost:70000"}, "url"),
    ],
    ids=[
        "replicas-0",
        "no-subjects",
        "dotted-stream",
        "dlq-stream-is-the-stream",
        "url-empty",
        "url-no-host",
        "url-open-bracket",
        "url-port-too-big",
    ],
)
def test_well_typed_but_invalid_variable_is_validated(env: dict[str, str], field: str) -> None:
    """Given a variable of the right type but an invalid value, the field's check refuses it."""
    with pytest.raises(ValueError, match=rf"^{field}: "):
        NATSConfig.from_env(env=env)


@pytest.mark.parametrize("field", SECONDS_FIELDS)
@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_duration_variable_that_is_not_finite_is_refused(field: str, raw: str) -> None:
    """Given `GDC_NATS_<DURATION>=nan` (or inf), which parses as a float, the config refuses
    it with one line naming the field."""
    env = {f"GDC_NATS_{field.upper()}": raw}

    with pytest.raises(ConfigError, match=rf"^{field}: must be a finite number of seconds"):
        NATSConfig.from_env(env=env)


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("raw", ["nan", "inf", "1e3", "2.0", "true"])
def test_integer_variable_that_is_not_an_integer_is_refused(field: str, raw: str) -> None:
    """Given `GDC_NATS_<LIMIT>=nan` (or another non-integer), the error names the variable."""
    key = f"GDC_NATS_{field.upper()}"

    with pytest.raises(ConfigError, match=rf"^{key}: {raw!r} is not a valid {field}$"):
        NATSConfig.from_env(env={key: raw})


# --- subjects_overlap ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("gdc.events.>", "gdc.events.>", True),
        ("gdc.dlq.>", "gdc.events.>", False),
        ("gdc.>", "gdc.events.pin.requested", True),
        ("gdc.>", "gdc", False),
        ("gdc.*", "gdc.events", True),
        ("gdc.*", "gdc.events.>", False),
        ("*.events.>", "gdc.*.pin.requested", True),
        ("a.*.c", "a.b.d", False),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        (">", "anything.at.all", True),
        ("gdc.events.>", "gdc.eventsdlq.>", False),
    ],
)
def test_subjects_overlap_when_some_subject_matches_both(a: str, b: str, overlap: bool) -> None:
    """Given two subject patterns, they overlap iff one concrete subject matches both."""
    assert subjects_overlap(a, b) is overlap
    assert subjects_overlap(b, a) is overlap


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("GDC_NATS_SUBJECTS", " (did you mean GDC_NATS_STREAM_SUBJECTS?)"),
        ("GDC_NATS_MAXAGE", " (did you mean GDC_NATS_MAX_AGE?)"),
        ("GDC_NATS_COLOUR", ""),
    ],
)
def test_a_variable_that_names_no_setting_is_refused_naming_it(variable: str, hint: str) -> None:
    """Given a GDC_NATS_* variable that is no setting (an old or misspelt name),
    when the config is read from the environment,
    then ConfigError names it, with the setting it resembles, instead of ignoring it."""
    with pytest.raises(ConfigError) as raised:
        NATSConfig.from_env({variable: "x"})

    assert str(raised.value) == (
        f"{variable}: no such setting{hint}; unset it or use a GDC_NATS_<FIELD> name"
    )


def test_gdc_nats_server_names_the_binary_not_a_setting() -> None:
    """Given GDC_NATS_SERVER (the nats-server binary to run),
    when the config is read from the environment,
    then it is not taken for a misspelt setting."""
    assert NATSConfig.from_env({"GDC_NATS_SERVER": "/usr/bin/nats-server"}) == NATSConfig()


def test_kubernetes_service_links_of_a_gdc_nats_service_are_not_taken_for_settings() -> None:
    """Given the variables Kubernetes sets in every pod for a Service named `gdc-nats`,
    when the config is read from the environment,
    then they are not taken for misspelt settings (every worker would refuse to start)."""
    links = {
        "GDC_NATS_SERVICE_HOST": "10.0.0.7",
        "GDC_NATS_SERVICE_PORT": "4222",
        "GDC_NATS_SERVICE_PORT_CLIENT": "4222",
        "GDC_NATS_PORT": "tcp://10.0.0.7:4222",
        "GDC_NATS_PORT_4222_TCP": "tcp://10.0.0.7:4222",
        "GDC_NATS_PORT_4222_TCP_ADDR": "10.0.0.7",
        "GDC_NATS_PORT_4222_TCP_PORT": "4222",
        "GDC_NATS_PORT_4222_TCP_PROTO": "tcp",
    }

    assert NATSConfig.from_env(links) == NATSConfig()
