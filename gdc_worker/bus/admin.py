"""Streams and consumers: ensure them, and read or delete stored messages by sequence."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ..config import STREAM_SETUPS, NATSConfig
from ..errors import ConfigError, ConnectionFailed, EventBusError, SubscriptionError, describe
from .state import api_error, permission_denied

__all__ = ["Admin", "BoundConsumer", "LimitChange", "StoredMessage", "StreamSpec"]

log = logging.getLogger("gdc_worker.bus")

T = TypeVar("T")

_STREAM_NAME_IN_USE = 10058
#: "JetStream system temporarily unavailable": a cluster without a meta leader; the other 503s
#: (JetStream not enabled for the account, say) do not pass.
_CLUSTER_UNAVAILABLE = 10008
_NOT_FOUND = 404
#: How long a request to the JetStream API waits for its answer.
_API_TIMEOUT_S = 5.0
#: Setting a stream or consumer up is asked again, for up to this many request timeouts in
#: all, while JetStream gives no answer or says it is temporarily unavailable: a cluster
#: electing a leader does both, and can lose the answer to a create it carried out
#: (nats-server#8350). Each step of a setup can be asked again with the same effect.
_SETUP_TIMEOUTS = 3
#: The pause before asking again after a "temporarily unavailable" answer.
_UNAVAILABLE_PAUSE_S = 1.0
#: The first nats-server release with the consumer pause API.
_PAUSE_SINCE = (2, 11)
#: A pause until this instant resumes the consumer.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The last time a pause can last until (RFC 3339 ends with the year 9999).
_LAST = datetime(9999, 12, 31, tzinfo=UTC)
#: The description of every consumer gdc-worker creates: it may update those, and no other.
CONSUMER_DESCRIPTION = "gdc-worker"


@dataclass(frozen=True)
class StoredMessage:
    """A message as a stream keeps it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class LimitChange:
    """One limit of a stream that the server has at another value than the configuration."""

    field: str
    server: str
    config: str


@dataclass(frozen=True)
class BoundConsumer:
    """A durable consumer as the server runs it: what the runner must live with."""

    #: How many times the server delivers a message at most; -1: no limit.
    max_deliver: int
    #: Seconds the server waits for an ack before it redelivers.
    ack_wait: float


def _stored(raw: RawStreamMsg) -> StoredMessage:
    return StoredMessage(
        seq=raw.seq or 0, subject=raw.subject or "", data=raw.data or b"", headers=raw.headers or {}
    )


@dataclass(frozen=True)
class StreamSpec:
    """A stream as gdc-worker wants it: limits retention, file storage, these limits."""

    name: str
    subjects: tuple[str, ...]
    max_age: float
    max_bytes: int = -1
    max_msgs: int = -1
    duplicate_window: float = 120.0
    replicas: int = 1

    @classmethod
    def of(cls, config: NATSConfig) -> StreamSpec:
        """The event stream as `config` describes it."""
        return cls(
            config.stream_name,
            config.stream_subjects,
            max_age=config.max_age,
            max_bytes=config.max_bytes,
            max_msgs=config.max_msgs,
            duplicate_window=config.duplicate_window,
            replicas=config.replicas,
        )

    def config(self) -> StreamConfig:
        """The JetStream configuration (0 for a limit means none, as in `NATSConfig`)."""
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=self.max_age,
            max_bytes=self.max_bytes or -1,
            max_msgs=self.max_msgs or -1,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
        )


class Admin:
    """JetStream's management API as gdc-worker uses it; errors are `EventBusError`s."""

    def __init__(self, nc: NATS, js: JetStreamContext, url: str, *, timeout: float) -> None:
        """`timeout`: how long `js` waits for each answer (the bus's connect timeout)."""
        self._nc = nc
        self._js = js
        self._url = url
        self._timeout = timeout

    async def leader(self, stream: str, durable: str | None = None) -> str | None:
        """The server name leading `stream` (or its consumer `durable`); None without one.

        Raises `EventBusError` when the server cannot say (no such stream, no answer).
        """
        try:
            if durable is None:
                cluster = (await self._js.stream_info(stream)).cluster
            else:
                cluster = (await self._js.consumer_info(stream, durable)).cluster
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot read the leader of {stream}: {describe(exc)}") from None
        return cluster.leader if cluster is not None else None

    async def step_down(
        self, stream: str, durable: str | None = None, preferred: str | None = None
    ) -> None:
        """Ask the leader of `stream` (or of its consumer) to step down, naming a `preferred`
        successor if given (servers before 2.11 refuse a preferred one: `EventBusError`)."""
        kind = "STREAM" if durable is None else "CONSUMER"
        subject = f"$JS.API.{kind}.LEADER.STEPDOWN.{stream}" + (f".{durable}" if durable else "")
        request = {"placement": {"preferred": preferred}} if preferred else {}
        try:
            reply = await self._nc.request(
                subject, msgspec.json.encode(request), timeout=_API_TIMEOUT_S
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"{subject} failed: {describe(exc)}") from None
        error = msgspec.json.decode(reply.data).get("error")
        if error:
            raise EventBusError(f"{subject} failed: {error.get('description', error)}")

    async def ensure_stream(self, spec: StreamSpec, setup: str = "update") -> None:
        """Set the stream up as `setup` says (see `NATSConfig.stream_setup`).

        - `update`: create it, or update its limits to these (the Go bus's way);
        - `create`: create it if missing; one that exists keeps its limits, and one warning
          names each limit it has at another value;
        - `none`: never create or change it: a missing stream raises `ConfigError`.

        A stream that exists keeps any subjects it has beyond ours; one that lacks a subject we
        need, or has another retention or storage, is never reshaped: that raises
        `ConfigError`, since it belongs to something else.

        While JetStream gives no answer, or says it is temporarily unavailable (a cluster
        electing a leader), the setup is asked again for up to three request timeouts.
        """
        if setup not in STREAM_SETUPS:
            raise ConfigError(
                f"stream_setup: must be one of {', '.join(STREAM_SETUPS)}, got {setup!r}"
            )
        try:
            await self._asking_again(
                f"stream {spec.name}", lambda: self._set_stream_up(spec, setup)
            )
        except (nats.errors.Error, TimeoutError) as exc:
            what = f"cannot set up stream {spec.name} at {self._url}"
            raise api_error(what, exc, otherwise=ConnectionFailed) from None

    async def _set_stream_up(self, spec: StreamSpec, setup: str) -> None:
        name, wanted = spec.name, spec.config()
        current = await self._stream_config(name)
        if current is None:
            if setup == "none":
                raise ConfigError(
                    f"stream {name} does not exist at {self._url}, and stream_setup is "
                    "'none' (GDC_NATS_STREAM_SETUP): create it first (e.g. `gdc-worker "
                    "stream apply`), or let gdc-worker create it with stream_setup 'create'"
                )
            current = await self._add_stream(wanted)
            if current is None:
                return
        _check_same_shape(current, wanted)
        changes = _limit_changes(current, wanted)
        if not changes:
            return
        if setup == "update":
            wanted.subjects = current.subjects
            await self._js.update_stream(wanted)
            log.info("stream %s: limits updated: %s", name, _changes_text(changes, "now"))
        elif setup == "create":
            log.warning(
                "stream %s exists with other limits; keeping the server's (stream_setup "
                "'create'): %s. To apply ours, run `gdc-worker stream apply` or set "
                "GDC_NATS_STREAM_SETUP=update",
                name,
                _changes_text(changes, "ours"),
            )

    async def stream_changes(self, spec: StreamSpec) -> list[LimitChange] | None:
        """The limits `ensure_stream(..., setup="update")` would change; None: no such stream.

        Raises `ConfigError` for a stream of another shape, as `ensure_stream` does.
        """
        name, wanted = spec.name, spec.config()
        try:
            current = await self._stream_config(name)
        except (nats.errors.Error, TimeoutError) as exc:
            what = f"cannot read stream {name} at {self._url}"
            raise api_error(what, exc, otherwise=ConnectionFailed) from None
        if current is None:
            return None
        _check_same_shape(current, wanted)
        return _limit_changes(current, wanted)

    async def _stream_config(self, name: str) -> StreamConfig | None:
        try:
            return (await self._js.stream_info(name)).config
        except nats.js.errors.NotFoundError:
            return None

    async def _add_stream(self, config: StreamConfig) -> StreamConfig | None:
        """Create the stream; if someone else just did, the config they created it with."""
        try:
            await self._js.add_stream(config)
            return None
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
        current = await self._stream_config(config.name or "")
        if current is None:  # created and deleted again in between: the next start sees it
            raise ConfigError(f"stream {config.name} is being created and deleted by others")
        return current

    async def ensure_consumer(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = -1,
        max_ack_pending: int = 1000,
    ) -> BoundConsumer:
        """Create the durable pull consumer, or bind the one that exists.

        A consumer gdc-worker created (its description says so) follows the handler's
        options: ack_wait and max_ack_pending are updated when they changed. One that
        another service created (a Go one, say) is never updated: the options it has at other
        values are logged in one warning, and it is bound as it is. One that cannot serve a
        handler of `filter_subject` (another filter, a push consumer, no explicit acks)
        raises `SubscriptionError` naming it and why. It is asked again as a stream's setup
        is, while JetStream gives no answer.
        """
        wanted = _wanted(durable, filter_subject, ack_wait, max_deliver, max_ack_pending)
        try:
            current = await self._asking_again(
                f"consumer {durable}",
                lambda: self._set_consumer_up(stream, durable, filter_subject, wanted),
            )
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            raise SubscriptionError(
                f"cannot create consumer {durable} on {filter_subject}: {describe(exc)}"
            ) from None
        return _bound(current, wanted)

    async def _set_consumer_up(
        self, stream: str, durable: str, filter_subject: str, wanted: ConsumerConfig
    ) -> ConsumerConfig:
        try:
            current: ConsumerConfig = (await self._js.consumer_info(stream, durable)).config
        except nats.js.errors.NotFoundError:
            return (await self._js.add_consumer(stream, wanted)).config
        problem = _cannot_serve(current, filter_subject)
        if problem:
            raise SubscriptionError(
                f"consumer {durable} of stream {stream} exists but cannot serve a handler "
                f"of {filter_subject}: {problem}. gdc-worker does not change a consumer it "
                "did not create: delete it (its position is lost), or give the handler "
                "another durable"
            )
        differences = _option_differences(current, wanted)
        if differences and current.description == CONSUMER_DESCRIPTION:
            return await self._update_ours(stream, current, wanted, differences)
        if differences:
            log.warning(
                "consumer %s of stream %s exists with other options; bound as it is: %s",
                durable,
                stream,
                "; ".join(differences),
            )
        return current

    async def _asking_again(self, what: str, setup: Callable[[], Awaitable[T]]) -> T:
        """`setup()`, from the start again while JetStream gives no answer or says it is
        temporarily unavailable, for up to `_SETUP_TIMEOUTS` request timeouts in all; then
        a `TimeoutError` says what every ask got. A request the server refused for want of
        permission (it times out too) raises `EventBusError` saying so at once."""
        started = time.monotonic()
        deadline = started + _SETUP_TIMEOUTS * self._timeout
        asks = 0
        while True:
            asks += 1
            try:
                return await setup()
            except (TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                    if exc.err_code != _CLUSTER_UNAVAILABLE:  # no JetStream for us, say
                        raise
                    said, pause = f"'{exc.description}'", _UNAVAILABLE_PAUSE_S
                else:
                    denied = permission_denied(exc)
                    if denied:  # the server refused it: asking again cannot help
                        raise EventBusError(f"cannot set up {what}: {denied}") from None
                    said, pause = "no answer", 0.0
                if time.monotonic() + pause >= deadline:
                    raise TimeoutError(
                        f"{said} from JetStream, asked {asks} times over "
                        f"{time.monotonic() - started:.1f}s"
                    ) from None
                if asks == 1:
                    log.warning(
                        "setting up %s: %s from JetStream at %s (a cluster may be electing a "
                        "leader); asking again for up to %.0fs",
                        what,
                        said,
                        self._url,
                        deadline - time.monotonic(),
                    )
                await anyio.sleep(pause)

    async def consumer_differences(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float,
        max_deliver: int,
        max_ack_pending: int,
    ) -> list[str] | None:
        """How an existing consumer differs from what `ensure_consumer` would create, as text
        (why it cannot serve first, if it cannot); None when there is no such consumer.

        For a consumer gdc-worker created, ack_wait and max_ack_pending are brought to the
        handler's when a worker binds it; the rest stays as the server has it.
        """
        try:
            current = (await self._js.consumer_info(stream, durable)).config
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot read consumer {durable}: {describe(exc)}") from None
        wanted = _wanted(durable, filter_subject, ack_wait, max_deliver, max_ack_pending)
        problem = _cannot_serve(current, filter_subject)
        return ([problem] if problem else []) + _option_differences(current, wanted)

    async def _update_ours(
        self,
        stream: str,
        current: ConsumerConfig,
        wanted: ConsumerConfig,
        differences: list[str],
    ) -> ConsumerConfig:
        """Bring a consumer gdc-worker created to the handler's ack_wait and max_ack_pending
        (what the server lets change); what it refuses is logged, and the consumer bound."""
        update = replace(current, ack_wait=wanted.ack_wait, max_ack_pending=wanted.max_ack_pending)
        try:
            updated = (await self._js.add_consumer(stream, update)).config
        except nats.js.errors.BadRequestError as exc:
            log.warning(
                "consumer %s of stream %s has other options, and the server would not update "
                "them (%s); bound as it is: %s",
                current.durable_name,
                stream,
                describe(exc),
                "; ".join(differences),
            )
            return current
        log.info(
            "consumer %s of stream %s updated to the handler's options: %s",
            current.durable_name,
            stream,
            "; ".join(differences),
        )
        return updated

    async def pause_consumer(self, stream: str, durable: str, seconds: float) -> bool:
        """Have the server deliver nothing from consumer `durable` to anyone for `seconds`
        (0: resume it now); acks and in-progress acks still count meanwhile.

        Returns False, without asking, when the server is older than 2.11 (it has no pause
        API and would not answer). Raises `EventBusError` when the request fails.
        """
        version = self._nc.connected_server_version
        if (version.major, version.minor) < _PAUSE_SINCE:
            return False
        now = datetime.now(UTC)
        # A longer pause than a date can say (a breaker's cooldown of 1e12 s) is the longest.
        until = (
            now + timedelta(seconds=min(seconds, (_LAST - now).total_seconds()))
            if seconds > 0
            else _EPOCH
        )
        try:
            await self._js.pause_consumer(stream, durable, until.isoformat().replace("+00:00", "Z"))
        except (nats.errors.Error, TimeoutError) as exc:
            action = f"pause consumer {durable}" if seconds > 0 else f"resume consumer {durable}"
            raise EventBusError(f"cannot {action} of {stream}: {describe(exc)}") from None
        return True

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at `seq` in `stream`, or None if there is none (or no such stream)."""
        if seq < 1:
            return None  # the server answers a bad request, not "not found"
        try:
            return _stored(await self._js.get_msg(stream, seq=seq))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            why = permission_denied(exc)
            raise EventBusError(f"cannot read {stream} #{seq}: {why or describe(exc)}") from None

    async def delete_message(self, stream: str, seq: int, *, erase: bool = True) -> bool:
        """Remove the message at `seq` from `stream`; False if it was not there.

        `erase` overwrites its bytes on disk too, which costs the server about 4 ms a message
        in a file store; without it a delete takes a fraction of a millisecond.
        """
        if seq < 1:
            return False
        request = msgspec.json.encode({"seq": seq, "no_erase": not erase})
        try:
            reply = await self._nc.request(
                f"$JS.API.STREAM.MSG.DELETE.{stream}", request, timeout=_API_TIMEOUT_S
            )
            answer = _delete_decoder.decode(reply.data)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            why = permission_denied(exc)
            raise EventBusError(f"cannot delete {stream} #{seq}: {why or describe(exc)}") from None
        if answer.error is None:
            return answer.success
        if answer.error.code == _NOT_FOUND:
            return False  # no such message, or no such stream
        raise EventBusError(f"cannot delete {stream} #{seq}: {answer.error.description}")


class _ApiError(msgspec.Struct):
    code: int = 0
    description: str = "error"


class _DeleteReply(msgspec.Struct):
    success: bool = False
    error: _ApiError | None = None


_delete_decoder = msgspec.json.Decoder(_DeleteReply)


def _check_same_shape(current: StreamConfig, wanted: StreamConfig) -> None:
    """Refuse to turn an existing stream into another one: only its limits may change."""
    missing = sorted(set(wanted.subjects or []) - set(current.subjects or []))
    differences = [f"subjects {current.subjects} (without {', '.join(missing)})"] if missing else []
    differences += [
        f"{name} {theirs.value!r} (we need {ours.value!r})"
        for name, theirs, ours in (
            ("retention", current.retention, wanted.retention),
            ("storage", current.storage, wanted.storage),
        )
        if theirs is not None and ours is not None and theirs != ours
    ]
    if differences:
        raise ConfigError(
            f"stream {wanted.name} exists with other {', '.join(differences)}; gdc-worker does "
            "not reshape a stream it does not own: use another stream name, or change the "
            "stream yourself"
        )


def _limit(value: float | None) -> float:
    """A limit as the server means it: 0 and negative values are all "unlimited"."""
    return value if value is not None and value > 0 else 0


def _limit_changes(current: StreamConfig, wanted: StreamConfig) -> list[LimitChange]:
    """The limits `wanted` sets at another value than the server's `current`."""
    fields: tuple[tuple[str, Callable[[float], str], Any, Any], ...] = (
        ("max_age", _duration, current.max_age, wanted.max_age),
        ("max_bytes", _size, current.max_bytes, wanted.max_bytes),
        ("max_msgs", _count, current.max_msgs, wanted.max_msgs),
        ("duplicate_window", _duration, current.duplicate_window, wanted.duplicate_window),
        ("replicas", str, current.num_replicas or 1, wanted.num_replicas or 1),
    )
    changes = []
    for name, shown, theirs, ours in fields:
        # Durations travel in nanoseconds: compare them at that precision.
        if round(_limit(theirs) * 1e9) != round(_limit(ours) * 1e9):
            changes.append(LimitChange(name, shown(_limit(theirs)), shown(_limit(ours))))
    return changes


def _changes_text(changes: list[LimitChange], ours: str) -> str:
    return ", ".join(f"{c.field} {c.config} ({ours}) vs {c.server} (server)" for c in changes)


_UNITS = (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0))


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "unlimited"
    for unit, size in _UNITS:
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _size(value: float) -> str:
    if value <= 0:
        return "unlimited"
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size and (value / size).is_integer():
            return f"{value / size:g} {unit}"
    return f"{int(value):,} bytes"


def _count(value: float) -> str:
    return "unlimited" if value <= 0 else f"{int(value):,}"


def _filters(config: ConsumerConfig) -> list[str]:
    if config.filter_subjects:
        return list(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


def _wanted(
    durable: str, filter_subject: str, ack_wait: float, max_deliver: int, max_ack_pending: int
) -> ConsumerConfig:
    """The durable pull consumer gdc-worker creates for a handler of `filter_subject`."""
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        description=CONSUMER_DESCRIPTION,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )


def _cannot_serve(current: ConsumerConfig, filter_subject: str) -> str | None:
    """Why an existing consumer cannot serve a handler of `filter_subject`, if it cannot."""
    if current.deliver_subject:
        return (
            f"it is a push consumer (deliver subject {current.deliver_subject}); gdc-worker pulls"
        )
    if current.ack_policy != AckPolicy.EXPLICIT:
        policy = _policy(current.ack_policy, "none")
        return f"its ack policy is {policy!r}; gdc-worker acks every event explicitly"
    filters = _filters(current)
    if filters != [filter_subject]:
        what = ", ".join(filters) if filters else "no filter (every subject of the stream)"
        return f"it filters on {what}, not {filter_subject}"
    return None


def _policy(value: object, default: str) -> str:
    """A policy as the server names it (nats-py gives a member, or the server's string)."""
    if not value:
        return default
    return str(getattr(value, "value", value))


def _option_differences(current: ConsumerConfig, wanted: ConsumerConfig) -> list[str]:
    """The options of a consumer that gdc-worker would have set otherwise, as text."""
    differences = []
    if current.deliver_policy != wanted.deliver_policy:
        theirs = _policy(current.deliver_policy, "all")
        ours = _policy(wanted.deliver_policy, "all")
        differences.append(f"deliver_policy {theirs} (ours {ours})")
    theirs_max, ours_max = _limit(current.max_deliver), _limit(wanted.max_deliver)
    if theirs_max != ours_max:
        note = (
            f": the server delivers an event {theirs_max:g} times at most, so a handler's "
            f"last try is on delivery {theirs_max:g} at the latest"
            if theirs_max
            else ""
        )
        differences.append(f"max_deliver {_count(theirs_max)} (ours {_count(ours_max)}){note}")
    options: tuple[tuple[str, Callable[[float], str]], ...] = (
        ("ack_wait", _duration),
        ("max_ack_pending", _count),
    )
    for option, shown in options:
        theirs_value = _limit(getattr(current, option))
        ours_value = _limit(getattr(wanted, option))
        if round(theirs_value * 1e9) != round(ours_value * 1e9):
            differences.append(f"{option} {shown(theirs_value)} (ours {shown(ours_value)})")
    return differences


def _bound(current: ConsumerConfig, wanted: ConsumerConfig) -> BoundConsumer:
    max_deliver = current.max_deliver
    return BoundConsumer(
        max_deliver=max_deliver if max_deliver is not None and max_deliver > 0 else -1,
        ack_wait=current.ack_wait or wanted.ack_wait or 30.0,
    )
