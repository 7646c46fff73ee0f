"""The bus's subscriptions (the Go bus's API), each a `HandlerRunner` like a worker's handler.

All of a bus's runners live in one task group, owned by one host task that the first
subscription starts and `close()` ends. A runner that fails (its consumer deleted, the
connection lost for good) stops alone, with an ERROR line; `close()` raises its error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ..dlq import DeadLetterQueue
from ..errors import GDCWorkerError, SubscriptionError, describe
from ..runner import HandlerRunner
from ..watchdog import LoopWatchdog

if TYPE_CHECKING:
    from ..app import HandlerSpec
    from ..hooks import Hooks
    from . import NATSEventBus

__all__ = ["Subscriptions"]

log = logging.getLogger("gdc_worker.bus")

#: How long `unsubscribe` and `close()` let a running handler finish before cancelling it.
STOP_GRACE = 10.0


class Subscriptions:
    """The runners of one bus, by pattern."""

    def __init__(self, bus: NATSEventBus) -> None:
        self._bus = bus
        self._dlq: DeadLetterQueue | None = None
        self._runners: dict[str, tuple[HandlerRunner, anyio.Event]] = {}
        self._host: asyncio.Task[None] | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._failure: GDCWorkerError | None = None
        self._watchdog = LoopWatchdog()

    async def add(self, spec: HandlerSpec, hooks: Hooks) -> None:
        """Bind the consumer of `spec` and start its runner; raises `SubscriptionError`."""
        if self._failure is not None:
            raise self._failure
        if spec.pattern in self._runners:
            raise SubscriptionError(f"already subscribed to {spec.pattern!r} on this bus")
        if self._dlq is None:
            dlq = DeadLetterQueue(self._bus)
            await dlq.ensure()
            self._dlq = dlq
        runner = HandlerRunner(self._bus, self._dlq, spec, 1, hooks)
        await runner.prepare()
        group = await self._group_started()
        self._watchdog.add(spec)
        done = anyio.Event()
        self._runners[spec.pattern] = (runner, done)
        group.start_soon(self._run, spec.pattern, runner, done)

    async def remove(self, pattern: str) -> None:
        """Stop the runner of `pattern` (its handler may finish within `STOP_GRACE`)."""
        entry = self._runners.pop(pattern, None)
        if entry is None:
            return
        runner, done = entry
        with anyio.CancelScope(shield=True):
            await runner.stop()
            with anyio.move_on_after(STOP_GRACE):
                await done.wait()
            if not done.is_set():
                log.warning("%s: cancelling its running handler; the event goes back", pattern)
                runner.force()
                await done.wait()

    async def close(self) -> GDCWorkerError | None:
        """Stop every runner and the host; the first failure of a runner, if any."""
        for pattern in list(self._runners):
            await self.remove(pattern)
        if self._host is not None:
            self._host.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({self._host})
        return self._failure

    async def _run(self, pattern: str, runner: HandlerRunner, done: anyio.Event) -> None:
        try:
            await runner.run()
        except Exception as exc:
            if self._failure is None:
                self._failure = (
                    exc
                    if isinstance(exc, GDCWorkerError)
                    else SubscriptionError(f"subscription to {pattern} failed: {describe(exc)}")
                )
            log.error(
                "subscription to %s stopped: %s. Subscribe again once the cause is fixed; its "
                "unsettled events come back to the consumer %s",
                pattern,
                describe(exc),
                runner.spec.durable,
                exc_info=not isinstance(exc, GDCWorkerError),
            )
            self._runners.pop(pattern, None)
        finally:
            done.set()

    async def _group_started(self) -> anyio.abc.TaskGroup:
        if self._group is None:
            started = anyio.Event()

            async def host() -> None:
                with self._watchdog:
                    async with anyio.create_task_group() as group:
                        self._group = group
                        started.set()
                        await anyio.sleep_forever()

            self._host = asyncio.create_task(host())
            await started.wait()
        assert self._group is not None
        return self._group
