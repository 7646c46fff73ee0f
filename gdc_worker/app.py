"""Declaring a service: `App`, its `@app.on(...)` handlers, and what a handler sees (`Context`)."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .bus import as_async, check_pattern, safe_name
from .config import NATSConfig
from .errors import GDCWorkerError, SubscriptionError
from .events import Event
from .retry import DEFAULT_BACKOFF, DEFAULT_RETRY, RetryPolicy

if TYPE_CHECKING:
    from .bus import NATSEventBus
    from .pull import Delivery

__all__ = ["App", "Context", "HandlerDefinitionError", "HandlerSpec"]

HandlerFunc = Callable[..., Awaitable[None] | None]
F = TypeVar("F", bound=HandlerFunc)
_DURABLE = re.compile(r"^[A-Za-z0-9_-]+$")
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class HandlerDefinitionError(GDCWorkerError, TypeError):
    """Raised at import time by `@app.on(...)` for a handler that cannot work."""


class Context:
    """What a handler may use besides the event: publishing, delivery facts and a logger."""

    __slots__ = ("_bus", "_delivery", "event", "handler")

    def __init__(self, bus: NATSEventBus, event: Event, delivery: Delivery, handler: str) -> None:
        self._bus = bus
        self._delivery = delivery  # the worker settles it: handlers must not
        self.event = event
        self.handler = handler

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger (`gdc_worker.handler.<name>`) whose lines carry the event and trace ids."""
        return _EventLogger(logging.getLogger(f"gdc_worker.handler.{self.handler}"), self.event)

    @property
    def deliveries(self) -> int:
        """How many times this consumer has had the event delivered (1 the first time)."""
        return self._delivery.deliveries

    @property
    def stream_seq(self) -> int:
        """The event's sequence number in the stream."""
        return self._delivery.stream_seq

    async def publish(self, event: Event) -> int:
        """Publish `event`, waiting for the ack; without a trace id it takes this event's."""
        if not event.trace_id:
            event.trace_id = self.event.trace_id
        return await self._bus.publish_event(event)


class _EventLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the event id and trace id."""

    def __init__(self, logger: logging.Logger, event: Event) -> None:
        super().__init__(logger, {"event_id": event.id, "trace_id": event.trace_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[event={extra['event_id']} trace={extra['trace_id'] or '-'}] {msg}", kwargs


@dataclass(frozen=True)
class HandlerSpec:
    """One registered handler and the options of its durable consumer."""

    name: str
    pattern: str
    durable: str
    func: HandlerFunc
    takes_context: bool
    max_deliver: int
    ack_wait: float
    backoff: tuple[float, ...]
    retry: RetryPolicy | None
    timeout: float | None
    concurrency: int | None
    max_ack_pending: int | None
    call: Callable[..., Awaitable[Any]] = field(repr=False, compare=False)


class App:
    """A GDC service: a name, a NATS configuration and the handlers it runs.

    `gdc-worker run module:app` runs every handler on its own durable pull consumer.
    """

    def __init__(
        self, name: str, config: NATSConfig | None = None, *, concurrency: int = 32
    ) -> None:
        if not _APP_NAME.match(name):
            raise HandlerDefinitionError(
                f"app name {name!r} must be letters, digits, '-', '_' or '.' (a dot becomes '-')"
            )
        if concurrency < 1:
            raise HandlerDefinitionError(f"concurrency must be at least 1, got {concurrency}")
        self.name = name
        self._config = config
        self.concurrency = concurrency
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
        """
        try:
            check_pattern(str(pattern))
        except SubscriptionError as exc:
            raise HandlerDefinitionError(str(exc)) from None
        _check_options(max_deliver, ack_wait, backoff, timeout, concurrency, max_ack_pending)

        def register(func: F) -> F:
            takes_context = _takes_context(func)
            name = getattr(func, "__name__", type(func).__name__)
            consumer = durable or safe_name(f"{self.name}-{name}")
            if not _DURABLE.match(consumer):
                raise HandlerDefinitionError(
                    f"durable {consumer!r} may hold only letters, digits, '-' and '_'"
                )
            taken = [s for s in self.handlers.values() if s.durable == consumer]
            if taken:
                raise HandlerDefinitionError(
                    f"durable {consumer!r} is already used by handler {taken[0].name!r}; "
                    "give one of them another `durable=`"
                )
            if name in self.handlers:
                raise HandlerDefinitionError(f"a handler named {name!r} is already registered")
            self.handlers[name] = HandlerSpec(
                name=name,
                pattern=str(pattern),
                durable=consumer,
                func=func,
                takes_context=takes_context,
                max_deliver=max_deliver,
                ack_wait=ack_wait,
                backoff=tuple(backoff),
                retry=retry,
                timeout=timeout,
                concurrency=concurrency,
                max_ack_pending=max_ack_pending,
                call=as_async(func),
            )
            return func

        return register


def _takes_context(func: HandlerFunc) -> bool:
    """Whether `func` is called as `(event)` or `(event, ctx)`; anything else is refused."""
    if not callable(func):
        raise HandlerDefinitionError(f"{func!r} is not callable")
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
            f"handler {getattr(func, '__qualname__', func)!r} must take (event) or (event, ctx), "
            f"not {signature}"
        )
    return len(positional) >= 2 or variadic


def _check_options(
    max_deliver: int,
    ack_wait: float,
    backoff: Sequence[float],
    timeout: float | None,
    concurrency: int | None,
    max_ack_pending: int | None,
) -> None:
    problems = []
    if max_deliver < 1:
        problems.append(f"max_deliver must be at least 1, got {max_deliver}")
    if ack_wait <= 0:
        problems.append(f"ack_wait must be positive, got {ack_wait}")
    if not backoff or any(d < 0 for d in backoff):
        problems.append(f"backoff must be one or more delays >= 0, got {list(backoff)}")
    if timeout is not None and timeout <= 0:
        problems.append(f"timeout must be positive, got {timeout}")
    if concurrency is not None and concurrency < 1:
        problems.append(f"concurrency must be at least 1, got {concurrency}")
    if max_ack_pending is not None and max_ack_pending < 1:
        problems.append(f"max_ack_pending must be at least 1, got {max_ack_pending}")
    if problems:
        raise HandlerDefinitionError("; ".join(problems))
