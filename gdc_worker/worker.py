"""Running an `App`: one durable pull consumer per handler, a bounded pool of workers each.

A delivery that a handler ran for is settled once, in `_HandlerRunner._settle`: ack, nak with
a delay, or dead-letter then terminate (nak instead if the dead letter cannot be written). The
only other settlement is the immediate nak of a delivery handed back on shutdown: one taken
after stopping, or one whose handler a forced stop cancelled.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc

from .app import App, Context, HandlerSpec
from .bus import NATSEventBus
from .config import NATSConfig
from .dlq import DeadLetterQueue
from .errors import EventDecodeError, GDCWorkerError
from .events import Event
from .pull import Delivery
from .retry import Ack, DeadLetter, Decision, Nak, Retry, decide, exhausted, retry_failed

__all__ = ["Worker", "WorkerError", "serve"]

log = logging.getLogger(__name__)


class WorkerError(GDCWorkerError):
    """The worker cannot run as asked (e.g. an unknown handler name)."""


class Worker:
    """Runs an app's handlers against JetStream until `stop()`.

    `concurrency` is the default number of handler calls in flight per handler in this process;
    `handlers` picks a subset by function name; `grace` is how long `stop()` lets running
    handlers finish before cancelling them (and nak'ing their events for another replica).
    """

    def __init__(
        self,
        app: App,
        *,
        config: NATSConfig | None = None,
        concurrency: int | None = None,
        handlers: Sequence[str] = (),
        grace: float = 30.0,
    ) -> None:
        unknown = sorted(set(handlers) - set(app.handlers))
        if unknown:
            raise WorkerError(
                f"app {app.name!r} has no handler named {', '.join(unknown)}; "
                f"it has: {', '.join(app.handlers) or 'none'}"
            )
        self.specs = (
            [app.handlers[n] for n in handlers] if handlers else list(app.handlers.values())
        )
        if not self.specs:
            raise WorkerError(f"app {app.name!r} has no handlers: decorate functions with @app.on")
        if concurrency is not None and concurrency < 1:
            raise WorkerError(f"concurrency must be at least 1, got {concurrency}")
        self.app = app
        self.config = config or app.config
        self.concurrency = concurrency or app.concurrency
        self.grace = grace
        self._stopping = anyio.Event()
        self._forced = anyio.Event()
        self._runners: list[_HandlerRunner] = []

    def stop(self) -> None:
        """Stop fetching and finish what runs (within `grace`); a second call cancels it now."""
        if self._stopping.is_set():
            self._forced.set()
        self._stopping.set()
        for runner in self._runners:  # at once: what a worker takes from now on goes back
            runner.stop_fetching()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, create the consumers and work until stopped; `started` once consuming."""
        async with await NATSEventBus.connect(
            self.config, name=f"gdc-worker:{self.app.name}"
        ) as bus:
            dlq = DeadLetterQueue(bus)
            await dlq.ensure()
            self._runners = runners = [
                _HandlerRunner(bus, dlq, spec, spec.concurrency or self.concurrency)
                for spec in self.specs
            ]
            for runner in runners:
                await runner.prepare()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._shut_down, runners)
                async with anyio.create_task_group() as work:
                    for runner in runners:
                        work.start_soon(runner.run)
                    log.info(
                        "worker ready: app %s, handlers %s, on %s",
                        self.app.name,
                        ", ".join(f"{r.spec.name} ({r.spec.durable})" for r in runners),
                        self.config.url,
                    )
                    task_status.started()
                tg.cancel_scope.cancel()
        log.info("worker stopped")

    async def _shut_down(self, runners: list[_HandlerRunner]) -> None:
        await self._stopping.wait()
        running = sum(r.running for r in runners)
        log.info(
            "stopping: no more fetching; %d handler call(s) running, grace %gs", running, self.grace
        )
        for runner in runners:
            await runner.stop()
        with anyio.move_on_after(self.grace):
            await self._forced.wait()
        log.warning("cancelling running handlers; their events go back for another replica")
        for runner in runners:
            runner.force()


class _HandlerRunner:
    """One handler's consumer, its worker tasks and the in-progress keep-alive."""

    def __init__(
        self, bus: NATSEventBus, dlq: DeadLetterQueue, spec: HandlerSpec, concurrency: int
    ) -> None:
        self.spec = spec
        self._bus = bus
        self._dlq = dlq
        self._concurrency = concurrency
        # Room for one more delivery per worker, so the next is there when one finishes.
        self._capacity = 2 * concurrency
        self._consumer = bus.pull_consumer(spec.durable, capacity=self._capacity)
        self._running = 0
        self._stopping = False
        self._scope = anyio.CancelScope()

    @property
    def running(self) -> int:
        """Handler calls in progress."""
        return self._running

    async def prepare(self) -> None:
        """Create or update the durable consumer, then start pulling."""
        spec = self.spec
        await self._bus.ensure_consumer(
            spec.durable,
            self._bus.config.subject_for(spec.pattern),
            ack_wait=spec.ack_wait,
            # Unlimited on the server: the worker itself dead-letters a delivery past
            # max_deliver (one whose earlier attempt died unsettled) without running it, and if
            # that dead letter cannot be written it naks, so the event comes back, not strands.
            max_deliver=-1,
            # Counts across replicas and includes nak'd events waiting for their backoff.
            max_ack_pending=spec.max_ack_pending or max(1000, 4 * self._capacity),
        )
        await self._consumer.start()

    def stop_fetching(self) -> None:
        self._stopping = True
        self._consumer.stop_fetching()

    async def stop(self) -> None:
        self.stop_fetching()
        await self._consumer.stop()

    def force(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._consumer.watch)
                    tg.start_soon(self._keep_alive)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self._concurrency):
                            workers.start_soon(self._work)
                    tg.cancel_scope.cancel()
        finally:
            await self._consumer.close()  # naks what was fetched and never started
            self._bus.forget_consumer(self._consumer)

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
                await self._process(delivery)
            await self._consumer.release(delivery)

    async def _keep_alive(self) -> None:
        """Tell JetStream that deliveries held a while are still being worked on (+WPI).

        Covers running handlers and the deliveries waiting for a free worker behind them.
        """
        interval = self.spec.ack_wait / 3
        while True:
            await anyio.sleep(interval)
            for delivery in self._consumer.held_since(time.monotonic() - interval):
                await delivery.in_progress()

    async def _process(self, delivery: Delivery) -> None:
        spec = self.spec
        try:
            event = Event.from_json(delivery.data)
        except EventDecodeError as exc:
            await self._settle(delivery, None, DeadLetter(f"not a valid event: {exc}"), exc)
            return
        dead = exhausted(delivery.deliveries, spec.max_deliver)
        if dead is not None:
            await self._settle(delivery, event, dead, None)
            return
        error = await self._call(delivery, event)
        decision = decide(error, delivery.deliveries, spec.max_deliver, spec.backoff)
        await self._settle(delivery, event, decision, error)

    async def _call(self, delivery: Delivery, event: Event) -> Exception | None:
        """Run the handler with its retries and timeout; the error it ended with, if any."""
        spec = self.spec
        args: tuple[Any, ...] = (event,)
        if spec.takes_context:
            args = (event, Context(self._bus, event, delivery, spec.name))
        self._running += 1
        try:
            try:
                if spec.timeout is None:
                    await spec.call(*args)
                else:
                    await _with_timeout(spec.timeout, spec.call, args)
                return None
            except Exception as exc:
                first_error = exc
            attempt: Callable[[], Awaitable[Any]] = functools.partial(spec.call, *args)
            if spec.timeout is not None:
                attempt = functools.partial(_with_timeout, spec.timeout, spec.call, args)
            return await retry_failed(spec.retry, attempt, first_error)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                # Cancelled by a forced stop: let another replica have it.
                await self._consumer.hand_back(delivery)
            raise
        finally:
            self._running -= 1

    async def _settle(
        self,
        delivery: Delivery,
        event: Event | None,
        decision: Decision,
        error: BaseException | None,
    ) -> None:
        # Ack and nak need no shield: nats-py queues the command before it can suspend, so a
        # cancellation cannot drop it half-way. Dead-lettering waits for replies: shielded.
        # (The naks on shutdown are shielded because they follow a cancellation.)
        if isinstance(decision, Ack):
            await delivery.ack()
            return
        spec = self.spec
        what = f"event {event.id}" if event is not None else f"message #{delivery.stream_seq}"
        if isinstance(decision, Nak):
            await delivery.nak(decision.delay)
            # A Retry is the handler's own decision, not a failure worth a warning.
            level = logging.DEBUG if isinstance(error, Retry) else logging.WARNING
            log.log(
                level,
                "%s: %s failed on delivery %d (%s: %s); redelivery in %gs",
                spec.name,
                what,
                delivery.deliveries,
                type(error).__name__,
                error,
                decision.delay,
            )
        else:
            with anyio.CancelScope(shield=True):
                await self._dead_letter(delivery, event, decision, error, what)

    async def _dead_letter(
        self,
        delivery: Delivery,
        event: Event | None,
        decision: DeadLetter,
        error: BaseException | None,
        what: str,
    ) -> None:
        spec = self.spec
        try:
            entry_id = await self._dlq.record(
                reason=decision.reason,
                consumer=spec.durable,
                handler=spec.name,
                stream=delivery.stream,
                stream_seq=delivery.stream_seq,
                subject=delivery.subject,
                deliveries=delivery.deliveries,
                data=delivery.data,
                headers=delivery.headers,
                event=event,
                error=error,
            )
        except GDCWorkerError as exc:
            delay = spec.backoff[-1]
            log.error(
                "%s: cannot dead-letter %s (%s); redelivery in %gs", spec.name, what, exc, delay
            )
            await delivery.nak(delay)
            return
        await delivery.term(decision.reason)
        log.error("%s: %s dead-lettered as #%d: %s", spec.name, what, entry_id, decision.reason)


async def _with_timeout(
    seconds: float, call: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
) -> Any:
    with anyio.fail_after(seconds):
        return await call(*args)


async def serve(worker: Worker) -> None:
    """Run `worker` until SIGINT or SIGTERM (a second one cancels running handlers)."""
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def on_signals() -> None:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    worker.stop()

            tg.start_soon(on_signals)
            await worker.run()
            tg.cancel_scope.cancel()
