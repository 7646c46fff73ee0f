"""Declaring a service: `App`, its `@app.on(...)` handlers, and what a handler sees (`Context`)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import re
import threading
import types
import typing
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

import anyio
import msgspec

from .breaker import Breaker
from .config import NATSConfig
from .errors import (
    HandlerDefinitionError,
    PublishError,
    SubscriptionError,
    WorkerError,
    describe,
)
from .events import Event, parse_event_data
from .hooks import Hook, Hooks
from .payloads import check_payload_type, claim_payload_type
from .retry import DEFAULT_BACKOFF, DEFAULT_RETRY, RetryPolicy
from .subjects import check_pattern, safe_name

__all__ = [
    "App",
    "Context",
    "DeliveryFacts",
    "HandlerOptions",
    "HandlerSpec",
    "PendingPublish",
    "Publisher",
    "as_async",
    "check_concurrency",
    "handler_spec",
]

HandlerFunc = Callable[..., Awaitable[None] | None]
F = TypeVar("F", bound=HandlerFunc)
_DURABLE = re.compile(r"^[A-Za-z0-9_-]+$")
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class PendingPublish(Awaitable["int | None"]):
    """An event sent without waiting for its acknowledgement (`ctx.publish`, `send_event`).

    `await` it for the stream sequence JetStream stored the event at (None: queued in the
    outbox); it raises the `PublishError` of an event that was not stored.
    """

    __slots__ = ("_done", "_outcome", "_waiters")

    def __init__(self) -> None:
        self._done = False
        self._outcome: int | PublishError | None = None
        # One future per task waiting, made only when one waits: cancelling one is its own.
        self._waiters: list[asyncio.Future[None]] | None = None

    def resolve(self, outcome: int | PublishError | None) -> None:
        """Tell how the publish ended, once: its sequence, None (queued), or its error."""
        if self._done:
            return
        self._done, self._outcome = True, outcome
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def __await__(self) -> Generator[Any, None, int | None]:
        return self._result().__await__()

    async def _result(self) -> int | None:
        if not self._done:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        if isinstance(self._outcome, PublishError):
            raise self._outcome
        return self._outcome


class Publisher(Protocol):
    """Where `Context.publish` sends events: a `NATSEventBus`, or the in-memory `TestApp`."""

    async def send_event(self, event: Event) -> PendingPublish: ...


class DeliveryFacts(Protocol):
    """What `Context` tells of a delivery: a `Delivery` has it, so does the test app's."""

    @property
    def deliveries(self) -> int: ...
    @property
    def stream_seq(self) -> int: ...


class Context:
    """What a handler may use besides the event: publishing, delivery facts and a logger."""

    __slots__ = ("_bus", "_delivery", "event", "handler")

    def __init__(self, bus: Publisher, event: Event, delivery: DeliveryFacts, handler: str) -> None:
        self._bus = bus
        self._delivery = delivery  # the worker settles it: handlers must not
        self.event = event
        self.handler = handler

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger (`gdc_worker.handler.<name>`) whose lines carry the event and trace ids."""
        return _EventLogger(
            logging.getLogger(f"gdc_worker.handler.{self.handler}"),
            {
                "event_id": self.event.id,
                "trace_id": self.event.trace_id,
                "handler": self.handler,
                "deliveries": self._delivery.deliveries,
            },
        )

    @property
    def deliveries(self) -> int:
        """How many times this consumer has had the event delivered (1 the first time)."""
        return self._delivery.deliveries

    @property
    def stream_seq(self) -> int:
        """The event's sequence number in the stream."""
        return self._delivery.stream_seq

    async def publish(self, event: Event) -> PendingPublish:
        """Send `event` without waiting for JetStream's ack; without a trace id it takes this
        event's.

        The delivery is acked only once every event its handler published is stored, in
        JetStream or in the outbox; one that is not fails the delivery as the handler's
        `PublishError` (retried, nak'd, dead-lettered as its policy says). `await` what this
        returns for the stream sequence: `seq = await (await ctx.publish(event))`.
        """
        if not event.trace_id:
            event.trace_id = self.event.trace_id
        return await self._bus.send_event(event)


class _EventLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the event id and trace id, and gives it the delivery's fields."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[event={extra['event_id']} trace={extra['trace_id'] or '-'}] {msg}", kwargs


class App:
    """A GDC service: a name, a NATS configuration and the handlers it runs.

    `gdc-worker run module:app` runs every handler on its own durable pull consumer.
    """

    def __init__(
        self,
        name: str,
        config: NATSConfig | None = None,
        *,
        concurrency: int = 32,
        hooks: Sequence[Hook] = (),
    ) -> None:
        if not _APP_NAME.match(name):
            raise HandlerDefinitionError(
                f"app name {name!r} must be letters, digits, '-', '_' or '.' (a dot becomes '-')"
            )
        check_concurrency(concurrency)
        self.name = name
        self._config = config
        self.concurrency = concurrency
        self.hooks = Hooks(hooks)
        self.handlers: dict[str, HandlerSpec] = {}

    @property
    def config(self) -> NATSConfig:
        """The config given to the constructor, else `NATSConfig.from_env()` (read when asked)."""
        return self._config if self._config is not None else NATSConfig.from_env()

    def on(
        self,
        pattern: str,
        *,
        durable: str | None = None,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        timeout: float | None = None,
        concurrency: int | None = None,
        max_ack_pending: int | None = None,
        breaker: Breaker | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function for events of a type or pattern (`pin.*`).

        - `durable`: the consumer name, `<app>-<function>` by default: replicas of this app
          share its events, another app gets its own copy of each.
        - `max_deliver`: deliveries before the event goes to the dead-letter stream.
        - `ack_wait`: seconds JetStream waits for a settlement; running handlers extend it.
        - `backoff`: nak delay in seconds after a failed delivery n (the last one repeats).
        - `retry`: in-process attempts per delivery (`RetryPolicy`), `None` for one attempt.
        - `timeout`: seconds one attempt may run; `concurrency`: handler calls in flight per
          process (default: the app's); `max_ack_pending`: the consumer's limit across replicas.
        - `breaker`: a `Breaker` of this handler's own, to stop calling it while it keeps failing.
        """
        _check_pattern(pattern)
        options = HandlerOptions(
            max_deliver,
            ack_wait,
            tuple(backoff),
            retry,
            timeout,
            concurrency,
            max_ack_pending,
            breaker=breaker,
        )

        def register(func: F) -> F:
            name = getattr(func, "__name__", type(func).__name__)
            spec = handler_spec(func, pattern, durable or safe_name(f"{self.name}-{name}"), options)
            taken = [s for s in self.handlers.values() if s.durable == spec.durable]
            if taken:
                raise HandlerDefinitionError(
                    f"durable {spec.durable!r} is already used by handler {taken[0].name!r}; "
                    "give one of them another `durable=`"
                )
            if spec.name in self.handlers:
                raise HandlerDefinitionError(f"a handler named {name!r} is already registered")
            if spec.breaker is not None:
                spec.breaker.claim(spec.durable)
            self.handlers[spec.name] = spec
            return func

        return register


@dataclass(frozen=True)
class HandlerOptions:
    """How a handler's deliveries are consumed and settled; see `App.on` for each option."""

    max_deliver: int = 5
    ack_wait: float = 30.0
    backoff: tuple[float, ...] = DEFAULT_BACKOFF
    retry: RetryPolicy | None = DEFAULT_RETRY
    timeout: float | None = None
    concurrency: int | None = None
    max_ack_pending: int | None = None
    breaker: Breaker | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backoff", tuple(self.backoff))
        _check_options(self)


@dataclass(frozen=True, kw_only=True)
class HandlerSpec(HandlerOptions):
    """One registered handler, its durable consumer and its options.

    `payload_type` is the struct its first parameter is annotated with, None for the envelope.
    """

    name: str
    pattern: str
    durable: str
    func: HandlerFunc
    takes_context: bool
    call: Callable[..., Awaitable[Any]] = field(repr=False, compare=False)
    payload_type: type[msgspec.Struct] | None = None

    def arguments(self, event: Event, ctx: Context | None) -> tuple[Any, ...]:
        """What the handler is called with: the event, or its data decoded as `payload_type`,
        then `ctx` if the handler takes one (it may be None otherwise: none is built).

        Raises `EventDataError` naming the field when the data does not fit `payload_type`.
        """
        first = event if self.payload_type is None else parse_event_data(event, self.payload_type)
        return (first, ctx) if self.takes_context else (first,)


def handler_spec(
    func: HandlerFunc, pattern: str, durable: str, options: HandlerOptions
) -> HandlerSpec:
    """Check and describe one handler: `@app.on` and the bus's subscriptions both use it.

    Raises `HandlerDefinitionError` naming what cannot work.
    """
    _check_pattern(pattern)
    takes_context, first = _parameters(func)
    payload_type = _payload_type(func, first) if first is not None else None
    if payload_type is not None:
        check_payload_type(pattern, payload_type, _qualname(func))
    if not _DURABLE.match(durable):
        raise HandlerDefinitionError(
            f"durable {durable!r} may hold only letters, digits, '-' and '_'"
        )
    spec = HandlerSpec(
        **{f.name: getattr(options, f.name) for f in fields(HandlerOptions)},
        name=getattr(func, "__name__", type(func).__name__),
        pattern=str(pattern),
        durable=durable,
        func=func,
        takes_context=takes_context,
        call=as_async(func),
        payload_type=payload_type,
    )
    if payload_type is not None:
        claim_payload_type(spec)
    return spec


def _check_pattern(pattern: str) -> None:
    try:
        check_pattern(str(pattern))
    except SubscriptionError as exc:
        raise HandlerDefinitionError(str(exc)) from None


#: The calls of one plain-function handler that may go on running in their threads after the
#: worker gave up on them (a timeout, a forced stop): past it, a call fails at once rather than
#: start one thread more, so a handler that hangs cannot pile up threads without bound.
MAX_ABANDONED_THREADS = 40


def as_async(handler: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """`handler` as a coroutine function; a plain function runs in a worker thread."""
    if inspect.iscoroutinefunction(handler):
        return handler
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    if call is not None and inspect.iscoroutinefunction(call):
        return call  # type: ignore[no-any-return]
    abandoned = _Abandoned()

    async def in_thread(*args: Any) -> Any:
        if abandoned.count >= MAX_ABANDONED_THREADS:
            raise WorkerError(
                f"{abandoned.count} calls of handler {_qualname(handler)!r} still run in "
                "threads after their timeout; no new call starts until one of them returns"
            )
        # [finished, given up on], under the lock: the thread and the caller each tell.
        state = [False, False]

        def run() -> Any:
            try:
                return handler(*args)
            finally:
                with abandoned.lock:
                    state[0] = True
                    if state[1]:
                        abandoned.count -= 1

        try:
            # On cancellation (a timeout) stop waiting; the thread itself cannot be interrupted.
            result = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except BaseException:
            with abandoned.lock:
                if not state[0]:
                    state[1] = True
                    abandoned.count += 1
            raise
        if inspect.isawaitable(result):  # a plain wrapper around a coroutine function
            result = await result
        return result

    return in_thread


class _Abandoned:
    """How many calls of one plain-function handler run on in threads nobody waits for."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


def _parameters(func: HandlerFunc) -> tuple[bool, inspect.Parameter | None]:
    """Whether `func` is called as `(event)` or `(event, ctx)` (anything else is refused), and
    its first parameter (None for `*args`)."""
    if not callable(func):
        raise HandlerDefinitionError(f"{func!r} is not callable")
    call = getattr(func, "__call__", None)  # noqa: B004 - an object's generator __call__ too
    if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (func, call)):
        raise HandlerDefinitionError(
            f"handler {_qualname(func)!r} is a generator function (it has `yield`): calling "
            "it runs none of its body, so its events would be acked unhandled; a handler "
            "returns (or raises) once per event"
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        raise HandlerDefinitionError(f"cannot read the signature of {func!r}") from None
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_kw = [p for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    required = [p for p in positional if p.default is p.empty]
    if required_kw or len(required) > 2 or (not positional and not variadic):
        raise HandlerDefinitionError(
            f"handler {_qualname(func)!r} must take (event) or (event, ctx), not {signature}"
        )
    return len(positional) >= 2 or variadic, positional[0] if positional else None


def _payload_type(func: HandlerFunc, first: inspect.Parameter) -> type[msgspec.Struct] | None:
    """The struct `first` is annotated with; None for `Event` (or `Any`, or no annotation).

    A string annotation (`from __future__ import annotations`) is resolved in the handler's
    module, alone: the others (a `ctx: Context` imported for type checking only) are not read.
    """
    annotation = first.annotation
    if isinstance(annotation, str):
        try:
            holder = types.SimpleNamespace(__annotations__={first.name: annotation})
            annotation = typing.get_type_hints(holder, globalns=_module_globals(func))[first.name]
        except Exception as exc:
            raise HandlerDefinitionError(
                f"handler {_qualname(func)!r}: cannot resolve the annotation {annotation!r} of "
                f"{first.name!r} ({describe(exc)}); define or import what it names at module "
                "level, before the handler (not only for type checking)"
            ) from None
    if annotation in (first.empty, Event, Any, object):
        return None
    if isinstance(annotation, type) and issubclass(annotation, Event):
        raise HandlerDefinitionError(
            f"handler {_qualname(func)!r}: {first.name!r} is annotated {annotation.__name__}, a "
            "subclass of Event; a handler gets the envelope as an Event (annotate it Event), or "
            "the data as a payload struct"
        )
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    raise HandlerDefinitionError(
        f"handler {_qualname(func)!r}: {first.name!r} is annotated {annotation!r}; annotate it "
        "with Event for the envelope, or with a msgspec.Struct for the data (PinRequestedEvent)"
    )


def _module_globals(func: HandlerFunc) -> dict[str, Any]:
    """The globals of the module defining `func`, where its string annotations are resolved:
    through decorators (`functools.wraps`) and `functools.partial`, and for an object with an
    async `__call__`, its class's."""
    target: Any = inspect.unwrap(func)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    namespace = getattr(target, "__globals__", None)  # a function, or a bound method's
    if namespace is None:
        namespace = getattr(type(target).__call__, "__globals__", {})
    return namespace


def _qualname(func: HandlerFunc) -> str:
    return str(getattr(func, "__qualname__", func))


def _check_options(options: HandlerOptions) -> None:
    problems = []
    if options.max_deliver < 1:
        problems.append(f"max_deliver must be at least 1, got {options.max_deliver}")
    if not _positive(options.ack_wait):
        problems.append(f"ack_wait must be a positive number of seconds, got {options.ack_wait}")
    if not options.backoff or not all(_finite(d) and d >= 0 for d in options.backoff):
        problems.append(
            f"backoff must be one or more delays >= 0 seconds, got {list(options.backoff)}"
        )
    if options.timeout is not None and not _positive(options.timeout):
        problems.append(f"timeout must be a positive number of seconds, got {options.timeout}")
    if options.concurrency is not None:
        try:
            check_concurrency(options.concurrency)
        except HandlerDefinitionError as exc:
            problems.append(str(exc))
    if options.max_ack_pending is not None and options.max_ack_pending < 1:
        problems.append(f"max_ack_pending must be at least 1, got {options.max_ack_pending}")
    if options.retry is not None and not isinstance(options.retry, RetryPolicy):
        problems.append(f"retry must be a RetryPolicy or None, got {options.retry!r}")
    if options.breaker is not None and not isinstance(options.breaker, Breaker):
        problems.append(f"breaker must be a Breaker or None, got {options.breaker!r}")
    if problems:
        raise HandlerDefinitionError("; ".join(problems))


def check_concurrency(concurrency: int) -> None:
    """Handler calls in flight: a whole number, at least 1 (`HandlerDefinitionError`)."""
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise HandlerDefinitionError(f"concurrency must be at least 1, got {concurrency!r}")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _finite(value) and value > 0  # type: ignore[operator]
