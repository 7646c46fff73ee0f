"""The seam for cross-cutting features (metrics, tracing, circuit breaking): `Hook`.

A hook subclasses `Hook` and overrides the points it needs; the worker's runner calls them,
on the event loop, at each step of a delivery, and the bus around each event publish and
when the connection drops or comes back. A method that is not overridden costs nothing:
the runner only calls hooks that override it, and with none registered it checks one empty
tuple per step. A hook that raises never breaks settlement: its error is logged once per hook
and method, and the delivery goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import HandlerDefinitionError

if TYPE_CHECKING:
    from .app import HandlerSpec
    from .bus.pull import Delivery
    from .events import Event
    from .settle import Decision

__all__ = ["Hook", "Hooks"]

log = logging.getLogger(__name__)


class Hook:
    """Base class of a hook: every method is a no-op until overridden.

    Methods are plain functions called on the event loop: keep them fast, and never settle a
    delivery from one (the runner does, once).
    """

    def worker_ready(self, app: str, handlers: Sequence[HandlerSpec]) -> None:
        """The consumers of `handlers` are bound and deliveries flow."""

    def worker_stopping(self, app: str) -> None:
        """The worker stops fetching; running handlers get their grace."""

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        """A worker took `delivery` for `handler`, before it is decoded."""

    def call_started(self, handler: HandlerSpec, delivery: Delivery, event: Event) -> None:
        """One attempt of the handler starts (in-process retries call it again)."""

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """One attempt ended: `error` is None on success, else what it raised."""

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        """`delivery` was settled as `decision` (ack, nak with a delay, dead letter). One handed
        back, by a forced stop or an internal error, is a `Nak(0)`: every received delivery
        ends here once."""

    def publishing(self, subject: str, event: Event, headers: dict[str, str]) -> None:
        """`event` is about to be published to `subject`; `headers` may still be added to
        (trace context, say). Dead-letter records and replays are not event publishes."""

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """A publish of `event` ended: `outcome` is `stored`, `duplicate` (JetStream had it
        already, within its duplicate window), `queued` (in the outbox, to be published once
        NATS takes it) or `failed` (with `error`)."""

    def connection_changed(self, connected: bool) -> None:
        """The connection to NATS was lost (False: the client tries to reconnect) or is back."""

    def breaker_changed(self, handler: HandlerSpec, state: str) -> None:
        """`handler`'s circuit breaker went `closed`, `open` or `half_open` (see `Breaker`)."""


_POINTS = (
    "worker_ready",
    "worker_stopping",
    "delivery_received",
    "call_started",
    "call_finished",
    "delivery_settled",
    "publishing",
    "published",
    "connection_changed",
    "breaker_changed",
)


class Hooks:
    """The registered hooks, called point by point with their errors contained.

    Each point is an attribute holding what to call, or None when no hook overrides it, so a
    hot call site tests `if hooks.call_started is not None:` before it builds any argument:
    the one overriding method itself, or a function calling several in turn. A call site
    that calls it directly catches `Exception` and passes it to `failed(point)`; `run()` does
    both for call sites that are not hot.
    """

    worker_ready: Callable[..., None] | None
    worker_stopping: Callable[..., None] | None
    delivery_received: Callable[..., None] | None
    call_started: Callable[..., None] | None
    call_finished: Callable[..., None] | None
    delivery_settled: Callable[..., None] | None
    publishing: Callable[..., None] | None
    published: Callable[..., None] | None
    connection_changed: Callable[..., None] | None
    breaker_changed: Callable[..., None] | None

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        for hook in hooks:
            if not isinstance(hook, Hook):
                raise HandlerDefinitionError(f"hooks: {hook!r} is not a gdc_worker.Hook")
        self.hooks = tuple(hooks)
        self._reported: set[tuple[int, str]] = set()
        for point in _POINTS:
            overriding = [
                hook
                for hook in self.hooks
                if getattr(type(hook), point) is not getattr(Hook, point)
            ]
            call = None
            if len(overriding) == 1:  # the usual case: the method itself, one call
                call = getattr(overriding[0], point)
            elif overriding:
                call = self._each(point, overriding)
            setattr(self, point, call)

    def __add__(self, other: Hooks) -> Hooks:
        return Hooks(self.hooks + other.hooks)

    def run(self, point: str, *args: Any) -> None:
        """Call every hook overriding `point`, if any, containing their errors."""
        call = getattr(self, point)
        if call is not None:
            try:
                call(*args)
            except Exception:
                self.failed(point)

    def failed(self, point: str, hook: Hook | None = None) -> None:
        """Log the error being handled, raised by `hook` (the only one overriding `point`
        when not given) at `point`, once per hook and point."""
        if hook is None:
            hook = getattr(self, point).__self__
        key = (id(hook), point)
        if key not in self._reported:
            self._reported.add(key)
            log.exception(
                "hook %s.%s failed (reported once; the delivery goes on)",
                type(hook).__name__,
                point,
            )

    def _each(self, point: str, hooks: list[Hook]) -> Callable[..., None]:
        """A function calling `point` of each of `hooks` in turn, their errors contained."""
        methods = [(hook, getattr(hook, point)) for hook in hooks]

        def call_each(*args: Any) -> None:
            for hook, method in methods:
                try:
                    method(*args)
                except Exception:
                    self.failed(point, hook)

        return call_each
