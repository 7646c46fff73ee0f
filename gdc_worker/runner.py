"""One handler's deliveries, from its pull consumer to their settlement: the one settle path.

`HandlerRunner` runs a bounded pool of workers over one durable pull consumer. Every delivery a
worker takes is settled once, by its `SettlePath`: ack, nak with a delay, or dead-letter then
terminate (nak instead if the dead letter cannot be written); the in-memory test app settles
its deliveries on the same path. What a handler publishes with `ctx.publish` is sent at once
and waited for after the call: an attempt succeeds only once all of it is stored. The only
other settlement is the immediate nak of a delivery handed back on shutdown: one taken after
stopping, or one whose handler a forced stop cancelled. `Worker` and the bus's subscriptions
both run on it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio

from .app import Context, HandlerSpec, PendingPublish, Publisher
from .dlq import FailedMessage
from .errors import (
    EventDataError,
    EventDecodeError,
    GDCWorkerError,
    PublishRefused,
    describe,
    one_error,
)
from .events import Event
from .hooks import Hooks
from .logs import delivery_fields
from .retry import Attempts, Retry, is_handler_failure
from .settle import Ack, DeadLetter, Decision, Nak, decide, exhausted

if TYPE_CHECKING:
    from .bus import NATSEventBus
    from .bus.pull import Delivery, PullConsumer
    from .dlq import DeadLetterQueue

__all__ = [
    "ConsumerLoop",
    "DeadLetterSink",
    "HandlerRunner",
    "SettlePath",
    "Settleable",
    "consumer_max_ack_pending",
]

log = logging.getLogger("gdc_worker.worker")


#: Deliveries one process holds per unit of concurrency: at least this many...
HELD_PER_CALL = 2
#: ... and up to this many while its handler settles them within milliseconds.
MAX_HELD_PER_CALL = 8
#: Deliveries in flight per unit of concurrency for a handler that publishes (takes a ctx):
#: those whose calls returned and wait for what they published to be stored hold no call.
IN_FLIGHT_PER_CALL = 4


def consumer_max_ack_pending(spec: HandlerSpec, concurrency: int) -> int:
    """The max_ack_pending a handler's consumer is created with: the handler's, else room for
    four times what one process holds at least (`2 * concurrency`), and at least 1000. It
    counts across replicas and includes nak'd events waiting for their backoff."""
    return spec.max_ack_pending or max(1000, 4 * HELD_PER_CALL * concurrency)


class ConsumerLoop:
    """A pool of workers over one pull consumer: taking deliveries, keeping the held ones alive,
    and stopping gracefully (`stop()`) or at once (`force()`).

    A subclass binds the consumer in `prepare()` (then `_start()`) and sets `_process` to what
    settles each delivery; what that raises unexpectedly (a defect) is logged, and the delivery
    goes back to the stream.
    """

    #: Settles one delivery: an attribute rather than a method, so a subclass can set its
    #: settle path's own, with no coroutine in between.
    _process: Callable[[Delivery], Awaitable[None]]

    def __init__(
        self, bus: NATSEventBus, consumer: PullConsumer, concurrency: int, ack_wait: float
    ) -> None:
        self._bus = bus
        self._consumer = consumer
        self._concurrency = concurrency
        self._ack_wait = ack_wait
        self._running = 0
        self._stopping = False
        self._scope = anyio.CancelScope()

    @property
    def running(self) -> int:
        """Deliveries being processed right now."""
        return self._running

    async def prepare(self) -> None:
        """Bind the consumer, then start pulling."""
        await self._start()

    def not_ready(self) -> str | None:
        """Why the consumer cannot deliver now (the server does not answer it); None if it can.

        Safe to call from another thread."""
        why = self._consumer.unresponsive()
        return f"consumer {self._consumer.name}: {why}" if why is not None else None

    async def _start(self) -> None:
        try:
            await self._consumer.start()
        except BaseException:
            await self._forget()
            raise

    async def discard(self) -> None:
        """Unbind a prepared loop that will not `run()`: nak what it fetched, forget it."""
        await self._forget()

    async def _forget(self) -> None:
        await self._consumer.close()  # naks what was fetched and never started
        self._bus.forget_consumer(self._consumer)

    def stop_fetching(self) -> None:
        """Take no more deliveries: what a worker takes from now on goes back at once."""
        self._stopping = True
        self._consumer.stop_fetching()

    async def stop(self, timeout: float = math.inf) -> None:
        """Stop fetching and drop the pull requests, waiting up to `timeout` for the server
        (see `PullConsumer.stop`); what is being processed goes on."""
        self.stop_fetching()
        await self._consumer.stop(timeout)

    def force(self) -> None:
        """Cancel what is being processed; those deliveries go back for another replica."""
        self._scope.cancel()

    async def run(self) -> None:
        """Work until stopped; raises one error if the consumer can no longer deliver."""
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._consumer.watch)
                    tg.start_soon(self._keep_alive)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self._concurrency):
                            workers.start_soon(self._work)
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise one_error(group) from None
        finally:
            await self._forget()

    async def _work(self) -> None:
        while True:
            try:
                delivery = await self._consumer.next()
            except anyio.EndOfStream:
                return
            if self._stopping:
                with anyio.CancelScope(shield=True):
                    # Fetched but not started: another replica takes it.
                    await self._consumer.hand_back(delivery)
            else:
                try:
                    await self._process(delivery)
                except Exception:
                    # A defect of ours, not the handler's: keep the worker, give the event back.
                    log.exception(
                        "%s: internal error on message #%d; it goes back to the stream",
                        self._consumer.name,
                        delivery.stream_seq,
                    )
                    with anyio.CancelScope(shield=True):
                        await self._hand_back(delivery)
            self._consumer.release(delivery)

    async def _keep_alive(self) -> None:
        """Tell JetStream that deliveries held a while are still being worked on (+WPI).

        Covers running handlers and the deliveries waiting for a free worker behind them.
        """
        interval = self._ack_wait / 3
        while True:
            await anyio.sleep(interval)
            for delivery in self._consumer.held_since(time.monotonic() - interval):
                await delivery.in_progress()

    async def _hand_back(self, delivery: Delivery) -> None:
        """Give a delivery being processed back to the stream at once (a nak)."""
        await self._consumer.hand_back(delivery)


class HandlerRunner(ConsumerLoop):
    """One handler's consumer, its worker tasks and the in-progress keep-alive.

    `prepare()` binds the consumer; `run()` works until `stop()` (or `force()`, which cancels
    running handlers and hands their events back).
    """

    def __init__(
        self,
        bus: NATSEventBus,
        dlq: DeadLetterQueue,
        spec: HandlerSpec,
        concurrency: int,
        hooks: Hooks,
    ) -> None:
        # A handler that publishes runs `concurrency` calls at once, and more of its deliveries
        # wait for their outputs' acks, each in a worker of its own.
        workers = IN_FLIGHT_PER_CALL * concurrency if spec.takes_context else concurrency
        # Room for one more delivery per worker, so the next is there when one finishes; more
        # while they are settled fast.
        consumer = bus.pull_consumer(
            spec.durable,
            capacity=HELD_PER_CALL * concurrency,
            max_capacity=max(MAX_HELD_PER_CALL * concurrency, HELD_PER_CALL * workers),
        )
        super().__init__(bus, consumer, workers, spec.ack_wait)
        self._max_calls = concurrency
        self.spec = spec
        # The handler's breaker: a hook that also gates each call (`_wait_at_gate`).
        self._breaker = spec.breaker
        self._at_gate: set[anyio.CancelScope] = set()
        if spec.breaker is not None:
            spec.breaker.bind(spec, hooks, bus)
            hooks = hooks + Hooks([spec.breaker])
        self._path: SettlePath[Delivery] = SettlePath(
            bus,
            dlq,
            spec,
            hooks,
            self._consumer.hand_back,
            gate=self._wait_at_gate if spec.breaker is not None else None,
            calls=asyncio.Semaphore(concurrency) if workers > concurrency else None,
        )
        self._process = self._path.process

    @property
    def running(self) -> int:
        """Deliveries whose handling has begun and is not over: calls running, and those
        waiting between attempts or for what their calls published to be stored."""
        return self._path.running

    async def prepare(self) -> None:
        """Create the durable consumer (or bind the existing one as it is), then start pulling.

        When the consumer's server-side max_deliver is below the handler's, the handler's last
        try is the server's last delivery: the event is dead-lettered, not left undelivered.
        """
        spec = self.spec
        try:
            bound = await self._bus.ensure_consumer(
                spec.durable,
                self._bus.config.subject_for(spec.pattern),
                ack_wait=spec.ack_wait,
                # Unlimited on the server: the runner itself dead-letters a delivery past
                # max_deliver (one whose earlier attempt died unsettled) without running it,
                # and if that dead letter cannot be written it naks, so the event comes back.
                max_deliver=-1,
                max_ack_pending=consumer_max_ack_pending(spec, self._max_calls),
            )
        except BaseException:
            await self._forget()
            raise
        if bound.max_deliver > 0:
            # An existing consumer may deliver fewer times than the handler's max_deliver.
            self._path.max_deliver = min(spec.max_deliver, bound.max_deliver)
        self._ack_wait = min(spec.ack_wait, bound.ack_wait)
        await self._start()

    def stop_fetching(self) -> None:
        """Take no more deliveries; those waiting at the breaker or for a call go back at once."""
        super().stop_fetching()
        self._path.stop_waiting()
        for waiting in self._at_gate:
            waiting.cancel()

    async def _wait_at_gate(self, delivery: Delivery) -> bool:
        """Hold `delivery` until the breaker lets it through; False if stopped meanwhile.

        While deliveries wait here the consumer asks for no more; the keep-alive covers the
        held ones however long they wait, so none is redelivered or uses up an attempt.
        """
        breaker = self._breaker
        if breaker is None or breaker.closed:
            return True
        with anyio.CancelScope() as waiting:
            self._at_gate.add(waiting)
            self._consumer.pause_fetching()
            try:
                await breaker.admitted(delivery)
            finally:
                self._at_gate.discard(waiting)
                if not self._at_gate:
                    self._consumer.resume_fetching()
        return not waiting.cancelled_caught

    async def _hand_back(self, delivery: Delivery) -> None:
        await self._path.hand_back(delivery)


class Settleable(FailedMessage, Protocol):
    """A delivery as the settle path sees it: the message, and the ways to settle it.

    A `Delivery` is one; so is the in-memory test app's.
    """

    async def ack(self) -> None: ...
    async def nak(self, delay: float = 0.0) -> None: ...
    async def term(self, reason: str = "") -> None: ...


class DeadLetterSink(Protocol):
    """Where the settle path records what it gives up on: a `DeadLetterQueue`, or in memory."""

    @property
    def stream(self) -> str: ...

    async def record(
        self,
        *,
        reason: str,
        consumer: str,
        handler: str,
        delivery: FailedMessage,
        error: BaseException | None,
    ) -> int: ...


D = TypeVar("D", bound=Settleable)


class SettlePath(Generic[D]):
    """One handler's deliveries from decoding to settlement: decode, call (retries, timeout,
    hooks), `decide()`, then settle once. `HandlerRunner` and the in-memory `TestApp` share it.

    `hand_back` returns a delivery whose call a cancellation of ours (a forced stop) ended;
    `sleep` waits between in-process attempts (the test app's runs on its virtual clock);
    `gate`, if given, holds a delivery before its call until it may run (a circuit breaker),
    and says False when the worker stops meanwhile. `calls`, if given, bounds the handler calls
    running at once, for more deliveries in flight than that: an attempt takes one for its
    handler's call, not for the wait until what the call published is stored.
    """

    def __init__(
        self,
        publisher: Publisher,
        dlq: DeadLetterSink,
        spec: HandlerSpec,
        hooks: Hooks,
        hand_back: Callable[[D], Awaitable[None]],
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        gate: Callable[[D], Awaitable[bool]] | None = None,
        calls: asyncio.Semaphore | None = None,
    ) -> None:
        self.spec = spec
        self._calls = calls
        self._waiting: set[anyio.CancelScope] = set()
        self._bus = publisher
        self._dlq = dlq
        self._hooks = hooks
        self._give_back = hand_back
        self._sleep = sleep
        self._gate = gate
        self.running = 0
        # The hook points of a delivery, read once (None: no hook overrides it).
        self._received = hooks.delivery_received
        self._started = hooks.call_started
        self._finished = hooks.call_finished
        self._settled = hooks.delivery_settled
        #: Deliveries before the dead letter: the handler's, or fewer if its consumer says so.
        self.max_deliver = spec.max_deliver

    async def process(self, delivery: D) -> None:
        """Decode, call the handler and settle `delivery` once."""
        spec = self.spec
        if self._received is not None:
            try:
                self._received(spec, delivery)
            except Exception:
                self._hooks.failed("delivery_received")
        try:
            event = Event.from_json(delivery.data)
        except EventDecodeError as exc:
            await self._settle(delivery, None, DeadLetter(str(exc)), exc)
            return
        dead = exhausted(delivery.deliveries, self.max_deliver)
        if dead is not None:
            await self._settle(delivery, event, dead, None)
            return
        outputs = ctx = None
        if spec.takes_context:
            outputs = _Outputs(self._bus, spec.name, event.id, self._calls)
            ctx = Context(outputs, event, delivery, spec.name)
        try:
            args = spec.arguments(event, ctx)
        except EventDataError as exc:  # data that does not fit the handler's type: permanent
            error: BaseException | None = exc
        else:
            try:
                # The call before the gate: the delivery a breaker lets through has one to run in.
                if (outputs is not None and not await self._take_call(outputs)) or (
                    self._gate is not None and not await self._gate(delivery)
                ):
                    with anyio.CancelScope(shield=True):  # stopped while waiting: another replica
                        await self.hand_back(delivery)
                    return
                error = await self._call(delivery, event, args, outputs)
            finally:
                if outputs is not None:
                    outputs.free_call()
        decision = decide(error, delivery.deliveries, self.max_deliver, spec.backoff)
        await self._settle(delivery, event, decision, error)

    async def _call(
        self, delivery: D, event: Event, args: tuple[Any, ...], outputs: _Outputs | None
    ) -> BaseException | None:
        """Run the handler on `args` with its retries and timeout, between the call hooks;
        the error it ended with, if any.

        Anything the handler raises is its failure, `SystemExit` and its own `CancelledError`
        included, and so is an event it published that was not stored (a `PublishError`);
        only a cancellation of ours (a forced stop) ends the call early. Every attempt runs
        here, in this coroutine: one that succeeds costs no coroutine but the handler's.
        """
        spec, started, finished = self.spec, self._started, self._finished
        attempts: Attempts | None = None
        self.running += 1
        try:
            while True:
                if outputs is not None:
                    # Before the hooks and the timeout: waiting for a call is no work of it.
                    await outputs.take_call()
                if started is not None:
                    try:
                        started(spec, delivery, event)
                    except Exception:
                        self._hooks.failed("call_started")
                began = time.perf_counter() if finished is not None else 0.0
                try:
                    # A handler that publishes nothing is awaited directly: one coroutine less.
                    call = spec.call(*args) if outputs is None else self._invoke(args, outputs)
                    if spec.timeout is None:
                        if (returned := await call) is not None:
                            await _awaited(returned)
                    else:
                        with anyio.fail_after(spec.timeout):
                            if (returned := await call) is not None:
                                await _awaited(returned)
                    error: BaseException | None = None
                except BaseException as exc:
                    error = exc
                if outputs is not None:
                    outputs.free_call()
                if finished is not None:
                    try:
                        finished(spec, delivery, event, error, time.perf_counter() - began)
                    except Exception:
                        self._hooks.failed("call_finished")
                if error is None:
                    return None
                if not is_handler_failure(error):
                    raise error
                if attempts is None:
                    attempts = Attempts(spec.retry, sleep=self._sleep)
                if not await attempts.again(error):
                    return error
                if outputs is not None:
                    outputs.forget()  # the failed attempt's: the next one publishes its own
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                # Cancelled by a forced stop: let another replica have it.
                await self.hand_back(delivery)
            raise
        finally:
            self.running -= 1
            if outputs is not None:
                outputs.close()

    async def _take_call(self, outputs: _Outputs) -> bool:
        """Wait for one of the calls that may run at once; False if `stop_waiting()` was
        called meanwhile."""
        if not outputs.must_wait_for_call():
            await outputs.take_call()
            return True
        with anyio.CancelScope() as waiting:
            self._waiting.add(waiting)
            try:
                await outputs.take_call()
            finally:
                self._waiting.discard(waiting)
        return not waiting.cancelled_caught

    def stop_waiting(self) -> None:
        """The worker stops: deliveries waiting for a call go back, not run."""
        for waiting in self._waiting:
            waiting.cancel()

    async def _invoke(self, args: tuple[Any, ...], outputs: _Outputs) -> None:
        """The handler's call, then the wait until what it published is stored."""
        if (returned := await self.spec.call(*args)) is not None:
            await _awaited(returned)
        outputs.free_call()
        await outputs.stored()

    async def hand_back(self, delivery: D) -> None:
        """Give `delivery` back to the stream at once; the hooks see it settled as `Nak(0)`."""
        await self._give_back(delivery)
        self._report_settled(delivery, Nak(0.0))

    async def _settle(
        self,
        delivery: Settleable,
        event: Event | None,
        decision: Decision,
        error: BaseException | None,
    ) -> None:
        # Ack and nak need no shield: nats-py queues the command before it can suspend, so a
        # cancellation cannot drop it half-way. Dead-lettering waits for replies: shielded.
        # (The naks on shutdown are shielded because they follow a cancellation.)
        if isinstance(decision, Ack):
            await delivery.ack()
        elif isinstance(decision, Nak):
            await delivery.nak(decision.delay)
            # A Retry is the handler's own decision, not a failure worth a warning.
            log.log(
                logging.DEBUG if isinstance(error, Retry) else logging.WARNING,
                "%s: %s failed on delivery %d (%s); redelivery in %gs",
                self.spec.name,
                _what(delivery, event),
                delivery.deliveries,
                describe(error) if error is not None else "no error",
                decision.delay,
                extra=delivery_fields(self.spec, delivery, event, Nak.outcome),
            )
        else:
            with anyio.CancelScope(shield=True):
                decision = await self._dead_letter(delivery, event, decision, error)
        self._report_settled(delivery, decision)

    def _report_settled(self, delivery: Settleable, decision: Decision) -> None:
        if self._settled is not None:
            try:
                self._settled(self.spec, delivery, decision)
            except Exception:
                self._hooks.failed("delivery_settled")

    async def _dead_letter(
        self,
        delivery: Settleable,
        event: Event | None,
        decision: DeadLetter,
        error: BaseException | None,
    ) -> Decision:
        spec = self.spec
        what = _what(delivery, event)
        try:
            entry_id = await self._dlq.record(
                reason=decision.reason,
                consumer=spec.durable,
                handler=spec.name,
                delivery=delivery,
                error=error,
            )
        except GDCWorkerError as exc:
            delay = spec.backoff[-1]
            log.error(
                "%s: cannot dead-letter %s (%s); it stays in the stream and comes back in %gs. "
                "Check that the dead-letter stream %s can be written (it is recreated when "
                "missing; its limits or the account's may be exhausted)",
                spec.name,
                what,
                exc,
                delay,
                self._dlq.stream,
                extra=delivery_fields(spec, delivery, event, Nak.outcome),
            )
            await delivery.nak(delay)
            return Nak(delay)
        await delivery.term(decision.reason)
        log.error(
            "%s: %s dead-lettered as #%d: %s",
            spec.name,
            what,
            entry_id,
            decision.reason,
            extra=delivery_fields(spec, delivery, event, DeadLetter.outcome),
        )
        return decision


class _Outputs:
    """The `Publisher` a handler's `ctx` publishes through: the bus's (or the test app's),
    noting each event sent, so that the attempt waits until all are stored. Closed once the
    handler's call is over: what is published then, nothing would wait for."""

    __slots__ = ("_calls", "_closed", "_event_id", "_handler", "_in_call", "_pending", "_publisher")

    def __init__(
        self,
        publisher: Publisher,
        handler: str,
        event_id: str,
        calls: asyncio.Semaphore | None = None,
    ) -> None:
        self._publisher = publisher
        self._handler = handler
        self._event_id = event_id
        self._pending: list[PendingPublish] = []
        self._closed = False
        self._calls = calls
        self._in_call = False

    def must_wait_for_call(self) -> bool:
        """Whether `take_call()` would wait: every call that may run at once is taken."""
        return self._calls is not None and not self._in_call and self._calls.locked()

    async def take_call(self) -> None:
        """Wait for one of the handler calls that may run at once (`SettlePath`'s `calls`),
        unless this attempt has one."""
        if self._calls is not None and not self._in_call:
            await self._calls.acquire()
            self._in_call = True

    def free_call(self) -> None:
        """The handler's call is over: free its place, once."""
        if self._in_call:
            self._in_call = False
            assert self._calls is not None
            self._calls.release()

    async def send_event(self, event: Event) -> PendingPublish:
        if self._closed:
            raise PublishRefused(
                f"ctx.publish of event {event.id} after handler {self._handler} returned for "
                f"event {self._event_id}: that event is settled, nothing would wait for this "
                "one or see it fail; publish before returning, or through a NATSEventBus"
            )
        pending = await self._publisher.send_event(event)
        self._pending.append(pending)
        return pending

    async def stored(self) -> None:
        """Wait until every event sent so far is stored (in JetStream or the outbox); raises
        the `PublishError` of the first one that is not."""
        pending, self._pending = self._pending, []
        for each in pending:
            await each

    def close(self) -> None:
        """The handler's call is over: refuse what its ctx publishes from now on."""
        self._closed = True

    def forget(self) -> None:
        """Stop waiting for the events sent so far: those of a failed attempt, which a retry
        sends again with the same ids if its handler gives them."""
        self._pending.clear()


async def _awaited(returned: object) -> None:
    """What a handler returned, taken as it was surely meant, never as a success to ack: an
    awaitable (the coroutine of a forgotten `await`) is the handler's work, awaited before its
    event is settled; an exception (`return Retry(5)`) is raised, its failure. Anything else
    means nothing."""
    if inspect.isawaitable(returned):
        await returned
    elif isinstance(returned, BaseException):
        raise returned


def _what(delivery: Settleable, event: Event | None) -> str:
    return f"event {event.id}" if event is not None else f"message #{delivery.stream_seq}"
