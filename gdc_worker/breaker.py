"""A per-handler circuit breaker: `Breaker`, which stops calling a handler whose deliveries
keep failing (its dependency is down, say), and after a cooldown lets one through to try.

It is a hook: it learns each delivery's outcome, after its in-process retries, from
`call_finished` and `delivery_settled`. The runner asks it before each call (`closed`, else
`admitted()`, which waits). While it is open no event is dead-lettered or uses up a delivery
because of it: the runner fetches nothing more and keeps the deliveries it holds alive, and on
nats-server 2.11+ the consumer is paused server-side, so that every replica backs off.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import anyio

from .errors import EventBusError, HandlerDefinitionError, describe
from .hooks import Hook, Hooks
from .retry import Retry, is_permanent
from .settle import Nak

if TYPE_CHECKING:
    from .app import HandlerSpec
    from .bus import NATSEventBus
    from .bus.pull import Delivery
    from .events import Event
    from .settle import Decision

__all__ = ["Breaker"]

log = logging.getLogger(__name__)

#: A breaker's state, as `Hook.breaker_changed` reports it.
_State = Literal["closed", "open", "half_open"]
#: Buckets of the failure-ratio window: the window slides by a tenth of its length.
_BUCKETS = 10


class Breaker(Hook):
    """Opens after `failures` failed deliveries in a row, or when `ratio` of at least
    `min_calls` deliveries within the last `window` seconds failed (off unless `ratio` is set).

    A failed delivery is one that ends in a nak or a dead letter because the handler failed
    (after its in-process retries); `Retry` and `Reject` (and bad event data) say nothing
    about a dependency and do not count. `cooldown` seconds after opening it lets one delivery
    through (half-open): it closes if that one succeeds, and opens again if it fails. Calls
    let in before it opened finish, and their outcomes change nothing once it is open.

    One instance serves one handler (`@app.on(..., breaker=Breaker())`), per process: two
    workers of one app in one process share its state. `clock` (seconds, monotonic) is for
    tests.
    """

    def __init__(
        self,
        failures: int = 5,
        cooldown: float = 30.0,
        *,
        ratio: float | None = None,
        window: float = 60.0,
        min_calls: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check(failures, cooldown, ratio, window, min_calls)
        self.failures = failures
        self.cooldown = cooldown
        self.ratio = ratio
        self.window = window
        self.min_calls = min_calls
        self._clock = clock
        self._state: _State = "closed"
        self._in_a_row = 0
        self._streak_from = 0  # the start number of the first failure in a row
        self._starts: dict[int, int] = {}  # the start number of each delivery's last attempt
        self._numbers = itertools.count(1)
        self._recent = _Window(window)
        self._opened_at = 0.0
        self._probe: int | None = None  # the delivery let through while half-open
        self._errors: dict[int, BaseException | None] = {}  # last attempt's error, by delivery
        self._changed: anyio.Event | None = None  # set on the next change (made when waited on)
        self._owner: str | None = None  # the handler it serves (`claim`)
        self._spec: HandlerSpec | None = None
        self._hooks = Hooks()
        self._bus: NATSEventBus | None = None
        self._server_paused = False  # the consumer was paused for this opening
        self._pause_unsupported = False

    def __repr__(self) -> str:
        ratio = f", ratio={self.ratio:g}, window={self.window:g}" if self.ratio else ""
        return f"Breaker(failures={self.failures}, cooldown={self.cooldown:g}{ratio})"

    @property
    def state(self) -> str:
        """`closed` (calls go through), `open` (none do) or `half_open` (one trial goes)."""
        return self._state

    @property
    def closed(self) -> bool:
        """Whether calls go through without asking (the runner's fast path)."""
        return self._state == "closed"

    def claim(self, handler: str) -> None:
        """Serve `handler` (its durable); another handler gets `HandlerDefinitionError`."""
        if self._owner is not None and self._owner != handler:
            raise HandlerDefinitionError(
                f"breaker: this Breaker already serves the handler of {self._owner!r}; "
                "give each handler a Breaker of its own"
            )
        self._owner = handler

    def bind(self, spec: HandlerSpec, hooks: Hooks, bus: NATSEventBus | None = None) -> None:
        """Report to `hooks` for `spec`, and pause its consumer through `bus` while open.

        Called by each runner of the handler; what a former run left (a trial delivery
        handed back on a forced stop) is forgotten.
        """
        self._spec, self._hooks, self._bus = spec, hooks, bus
        self._probe = None
        self._errors.clear()
        self._starts.clear()

    def admit(self, delivery: Delivery) -> bool:
        """Whether the handler may be called for `delivery` now (half-open: this is the trial)."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() < self._opened_at + self.cooldown:
                return False
            self._change("half_open", "letting one delivery through to try")
        if self._probe is None:
            self._probe = id(delivery)
            return True
        return False

    async def admitted(self, delivery: Delivery) -> None:
        """Return once `admit(delivery)` lets it through; while it waits for an open breaker,
        the consumer is paused server-side (once per opening), and resumed for the trial."""
        while not self.admit(delivery):
            if self._changed is None:
                self._changed = anyio.Event()
            changed, wait = self._changed, math.inf
            if self._state == "open":
                wait = self._opened_at + self.cooldown - self._clock()
                if not self._server_paused:
                    self._server_paused = True
                    await self._pause(wait)
            with anyio.move_on_after(wait):
                await changed.wait()
        if self._server_paused:
            self._server_paused = False
            await self._pause(0)

    def call_started(self, handler: HandlerSpec, delivery: Delivery, event: Event) -> None:
        """Number the attempt: failures count "in a row" in the order their calls started."""
        self._starts[id(delivery)] = next(self._numbers)

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """Keep the attempt's error: the delivery's outcome is its last attempt's."""
        self._errors[id(delivery)] = error

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        """Count the delivery's outcome, if the handler was called for it."""
        key = id(delivery)
        if key not in self._errors:  # not called: handed back from the gate, say
            self._forget_probe(key)
            return
        error, started = self._errors.pop(key), self._starts.pop(key, 0)
        if decision == _HANDED_BACK and isinstance(error, anyio.get_cancelled_exc_class()):
            # Cancelled by a forced stop and handed back: it says nothing about a dependency.
            self._forget_probe(key)
            return
        self._record(key, error, started)

    def _forget_probe(self, key: int) -> None:
        """Delivery `key` ended without a verdict: if it was the trial, let another one try."""
        if key == self._probe:
            self._probe = None
            self._wake()

    def _record(self, key: int, error: BaseException | None, started: int) -> None:
        """Delivery `key` (its `id`) ended: with `error` None if it succeeded, else with the
        error its last attempt raised; `started` numbers that attempt's call.

        A success ends a run of failures only if its call started after the run's first: one
        that was already running when the dependency went down says nothing about it now."""
        failed = _failed(error)
        if self._state == "half_open":
            if key != self._probe:
                return
            self._probe = None
            if failed is None:  # the trial said nothing: let another one try
                self._wake()
            elif failed:
                self._open(f"the trial delivery failed with {_error(error)}")
            else:
                self._change("closed", "the trial delivery succeeded")
        elif self._state == "closed" and failed is not None:
            if failed:
                if self._in_a_row == 0:
                    self._streak_from = started
                self._in_a_row += 1
            elif started > self._streak_from:
                self._in_a_row = 0
            calls, failures = self._recent.add(failed, self._clock())
            if not failed:
                return
            if self._in_a_row >= self.failures:
                self._open(
                    f"{self._in_a_row} deliveries in a row failed, the last with {_error(error)}"
                )
            elif self._too_many(calls, failures):
                self._open(
                    f"{failures} of the last {calls} deliveries within {self.window:g}s "
                    f"failed, the last with {_error(error)}"
                )

    def _too_many(self, calls: int, failures: int) -> bool:
        return self.ratio is not None and calls >= self.min_calls and failures >= self.ratio * calls

    def _open(self, cause: str) -> None:
        self._opened_at = self._clock()
        self._change("open", f"{cause}; no calls for {self.cooldown:g}s", logging.WARNING)

    def _change(self, state: _State, why: str, level: int = logging.INFO) -> None:
        self._state = state
        self._in_a_row = 0
        self._recent.clear()
        handler = self._spec.name if self._spec is not None else self._owner
        log.log(level, "handler %s: circuit breaker %s: %s", handler, state.replace("_", "-"), why)
        if self._spec is not None:
            self._hooks.run("breaker_changed", self._spec, state)
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _pause(self, seconds: float) -> None:
        """Pause the consumer server-side for `seconds` (0: resume), where the server can."""
        if self._bus is None or self._spec is None or self._pause_unsupported:
            return
        try:
            supported = await self._bus.pause_consumer(self._spec.durable, seconds)
        except EventBusError as exc:
            log.warning(
                "handler %s: %s; this replica stops fetching all the same", self._spec.name, exc
            )
            return
        if not supported:
            self._pause_unsupported = True
            log.info(
                "handler %s: this nats-server has no consumer pause API (2.11+): while the "
                "breaker is open only this replica stops fetching",
                self._spec.name,
            )


class _Window:
    """How many deliveries failed within the last `seconds`, counted in buckets."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._span = seconds / _BUCKETS
        self._buckets: collections.deque[list[float]] = collections.deque()  # start, calls, fails

    def add(self, failed: bool, now: float) -> tuple[int, int]:
        """Count one outcome at `now`; the calls and failures of the window after it."""
        while self._buckets and self._buckets[0][0] <= now - self._seconds:
            self._buckets.popleft()
        if not self._buckets or now >= self._buckets[-1][0] + self._span:
            self._buckets.append([now, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        return int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets))

    def clear(self) -> None:
        self._buckets.clear()


#: How the runner settles a delivery it gives back at once (a forced stop).
_HANDED_BACK = Nak(0.0)


def _failed(error: BaseException | None) -> bool | None:
    """Whether a delivery failed; None when its end says nothing about a dependency."""
    if error is None:
        return False
    if isinstance(error, Retry) or is_permanent(error):
        return None
    return True


def _error(error: BaseException | None) -> str:
    return describe(error) if error is not None else "no error"


def _check(
    failures: int, cooldown: float, ratio: float | None, window: float, min_calls: int
) -> None:
    """Refuse options a breaker cannot work with, naming each (`HandlerDefinitionError`)."""
    problems = [
        f"{name} must be {rule}, got {value!r}"
        for name, value, ok, rule in (
            ("failures", failures, _at_least_one(failures), "a whole number >= 1"),
            ("cooldown", cooldown, _above(cooldown, 0), "a positive number of seconds"),
            ("ratio", ratio, ratio is None or (_above(ratio, 0) and ratio <= 1), "in (0, 1]"),
            ("window", window, _above(window, 0), "a positive number of seconds"),
            ("min_calls", min_calls, _at_least_one(min_calls), "a whole number >= 1"),
        )
        if not ok
    ]
    if problems:
        raise HandlerDefinitionError("breaker: " + "; ".join(problems))


def _at_least_one(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _above(value: object, low: float) -> bool:
    """A finite number (not a bool) above `low`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > low
