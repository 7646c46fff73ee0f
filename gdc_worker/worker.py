"""Running an `App`: one `HandlerRunner` per handler on one connection, until stopped.

The worker owns the lifecycle (connect, bind every consumer, run, stop gracefully, then
forcefully) and reports failure as one `GDCWorkerError`; what happens to each delivery is the
runner's business.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence

import anyio
import anyio.abc

from .app import App, check_concurrency
from .backstop import ADVISORY_PREFIX, Backstop
from .bus import NATSEventBus
from .config import NATSConfig
from .dlq import DeadLetterQueue
from .errors import GDCWorkerError, WorkerError, one_error
from .hooks import Hook, Hooks
from .outbox import OutboxStats
from .runner import ConsumerLoop, HandlerRunner
from .supervisor import STOP_SIGNALS
from .watchdog import LoopWatchdog

__all__ = ["Worker", "serve"]

log = logging.getLogger(__name__)

#: How long a stop may run past `grace` when the server is slow to answer: to drop the pull
#: requests, hand back what was fetched and send the last acks. A second stop leaves this long.
CLOSE_S = 1.0


class Worker:
    """Runs an app's handlers against JetStream until `stop()`.

    `concurrency` is the default number of handler calls in flight per handler in this process;
    `handlers` picks a subset by function name; `grace` is how long `stop()` lets running
    handlers finish before cancelling them (and nak'ing their events for another replica),
    and bounds the whole stop: `run()` returns within `grace` + `CLOSE_S` of it, however
    slow the server is to answer;
    `hooks` run after the app's own. `backstop` (on by default) also records, as dead letters,
    the messages other consumers of the stream gave up on at their server-side MaxDeliver (see
    `gdc_worker.backstop`); every worker shares that work, one replica per message.
    """

    def __init__(
        self,
        app: App,
        *,
        config: NATSConfig | None = None,
        concurrency: int | None = None,
        handlers: Sequence[str] = (),
        grace: float = 30.0,
        hooks: Sequence[Hook] = (),
        backstop: bool = True,
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
        if concurrency is not None:
            check_concurrency(concurrency)
        if not grace >= 0 or grace == float("inf"):
            raise WorkerError(f"grace must be a finite number of seconds >= 0, got {grace}")
        self.app = app
        self.config = config or app.config
        self.concurrency = concurrency or app.concurrency
        self.grace = grace
        self.hooks = app.hooks + Hooks(hooks)
        self.backstop = backstop
        self._stopping = anyio.Event()
        self._forced = anyio.Event()
        self._stop_by = float("inf")  # the monotonic time by which a stop has run its course
        self._runners: list[ConsumerLoop] = []
        # The scope of the startup step under way (connect, then stream and consumer setup),
        # which a stop cancels; the consumer loops it prepared, discarded if they do not run.
        self._startup: anyio.CancelScope | None = None
        self._prepared: list[ConsumerLoop] = []
        self._bus: NATSEventBus | None = None
        self._bound = False

    def not_ready(self) -> str | None:
        """None while connected with every consumer bound, answered by the server, and not
        stopping; else why not.

        What `/readyz` answers; safe to call from another thread.
        """
        if self._stopping.is_set():
            return "stopping"
        if self._bus is None:
            return "connecting to NATS"
        if not self._bus.connected:
            what = "disconnected from" if self._bound else "waiting for"
            return f"{what} NATS at {self._bus.server_url}"
        if not self._bound:
            return "binding consumers"
        for runner in self._runners:
            why = runner.not_ready()
            if why is not None:
                return f"{why} (NATS at {self._bus.server_url})"
        return None

    def in_flight(self) -> dict[str, int]:
        """The handler calls running now, by handler name (safe to call from another thread);
        `Metrics.read_in_flight` reads it."""
        return {
            runner.spec.name: runner.running
            for runner in self._runners
            if isinstance(runner, HandlerRunner)
        }

    def outbox_stats(self) -> OutboxStats | None:
        """The depth of the bus's publish outbox; None without one (or before connecting)."""
        outbox = self._bus.outbox if self._bus is not None else None
        return outbox.stats() if outbox is not None else None

    def stop(self) -> None:
        """Stop fetching and finish what runs (within `grace`); a second call cancels it now."""
        now = time.monotonic()
        if self._stopping.is_set():
            self._forced.set()
            self._stop_by = min(self._stop_by, now + CLOSE_S)
        else:
            self._stop_by = now + self.grace + CLOSE_S
        self._stopping.set()
        if self._startup is not None:  # no effect once the startup is over
            self._startup.cancel()
        for runner in self._runners:  # at once: what a worker takes from now on goes back
            runner.stop_fetching()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, bind the consumers and work until stopped; `started` once consuming.

        Raises one `GDCWorkerError`: `ConnectionFailed` when NATS cannot be reached or the
        connection is lost for good, `SubscriptionError` when a consumer can no longer deliver.
        """
        try:
            await self._run(task_status)
        except BaseExceptionGroup as group:
            raise one_error(group) from None

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        bus: NATSEventBus | None = None
        self._prepared = []
        with self._starting():  # a stop before the consumers are bound ends the startup at once
            bus = await NATSEventBus.connect(
                self.config, name=f"gdc-worker:{self.app.name}", hooks=self.hooks
            )
        if bus is None:
            log.info("worker stopped before NATS answered")
            return
        try:
            self._bus = bus
            everything: list[ConsumerLoop] = []
            try:
                with self._starting():
                    everything = await self._bind(bus)
            finally:
                if not everything:  # stopped, or failed: nak what they fetched meanwhile
                    with anyio.CancelScope(shield=True):
                        for each in self._prepared:
                            await each.discard()
            if not everything:
                log.info("worker stopped before its consumers were bound")
                return
            self._runners = everything
            runners = [each for each in everything if isinstance(each, HandlerRunner)]
            with LoopWatchdog(self.specs):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._shut_down, everything)
                    async with anyio.create_task_group() as work:
                        for each in everything:
                            work.start_soon(each.run)
                        log.info(
                            "worker ready: app %s, handlers %s, on %s",
                            self.app.name,
                            ", ".join(f"{r.spec.name} ({r.spec.durable})" for r in runners),
                            bus.server_url,
                        )
                        self._bound = True
                        self.hooks.run("worker_ready", self.app.name, self.specs)
                        task_status.started()
                    tg.cancel_scope.cancel()
                    self._bound = False
        finally:
            await bus.close(self._time_left() if self._stopping.is_set() else None)
        log.info("worker stopped")

    def _starting(self) -> anyio.CancelScope:
        """The scope of one startup step: cancelled by `stop()`, at once if already stopped."""
        self._startup = anyio.CancelScope()
        if self._stopping.is_set():
            self._startup.cancel()
        return self._startup

    async def _bind(self, bus: NATSEventBus) -> list[ConsumerLoop]:
        """Once `bus` is connected: the dead-letter stream, then every handler's consumer (and
        the backstop's) bound and pulling; each is noted in `_prepared` as it is."""
        if not bus.connected:  # an outbox: the bus connects in the background
            log.warning("waiting for NATS at %s to bind the consumers", bus.server_url)
            await bus.wait_connected()
        dlq = DeadLetterQueue(bus)
        await dlq.ensure()
        for spec in self.specs:
            runner = HandlerRunner(bus, dlq, spec, spec.concurrency or self.concurrency, self.hooks)
            await runner.prepare()
            self._prepared.append(runner)
        if self.backstop:
            self._prepared += await _backstop(bus, dlq)
        return list(self._prepared)

    def _time_left(self) -> float:
        """How long the stop under way may still wait on the server."""
        return max(0.0, self._stop_by - time.monotonic())

    async def _shut_down(self, runners: list[ConsumerLoop]) -> None:
        await self._stopping.wait()
        running = sum(r.running for r in runners)
        log.info(
            "stopping: no more fetching; %d handler call(s) running, grace %gs", running, self.grace
        )
        self.hooks.run("worker_stopping", self.app.name)
        async with anyio.create_task_group() as tg:
            for runner in runners:  # each may wait on the server: all at once, beside the grace
                tg.start_soon(runner.stop, self._time_left())
            with anyio.move_on_after(self._time_left() - CLOSE_S):
                await self._forced.wait()
            log.warning("cancelling running handlers; their events go back for another replica")
            for runner in runners:
                runner.force()


async def _backstop(bus: NATSEventBus, dlq: DeadLetterQueue) -> list[ConsumerLoop]:
    """The dead-letter backstop, bound; none, with an ERROR line, when it cannot be set up
    (an account that may not capture advisories, say): the handlers work without it."""
    backstop = Backstop(bus, dlq)
    try:
        await backstop.prepare()
    except GDCWorkerError as exc:
        log.error(
            "dead-letter backstop not running: %s. Messages that other consumers give up on "
            "at their max_deliver get no dead-letter record; allow this account to create the "
            "stream %s on %s.*, or run with backstop=False",
            exc,
            backstop.stream,
            ADVISORY_PREFIX,
        )
        return []
    return [backstop]


async def serve(worker: Worker, *, supervisor_pid: int | None = None) -> None:
    """Run `worker` until SIGINT, SIGTERM or SIGHUP (a second one cancels running handlers),
    or, as a replica of `supervisor_pid`, until that parent process is gone (killed, it could
    not pass a stop on: the replica stops itself rather than consume on unsupervised)."""
    async with anyio.create_task_group() as tg:
        if supervisor_pid is not None:
            tg.start_soon(_stop_when_orphaned, worker, supervisor_pid)
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:

            async def on_signals() -> None:
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    worker.stop()

            tg.start_soon(on_signals)
            await worker.run()
            tg.cancel_scope.cancel()


#: How often a supervised replica checks that its supervisor still runs.
ORPHAN_CHECK_S = 0.5


async def _stop_when_orphaned(worker: Worker, supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:
        await anyio.sleep(ORPHAN_CHECK_S)
    log.warning("supervisor (pid %d) is gone: stopping", supervisor_pid)
    worker.stop()
