"""A record of what arrived that tests wait on with a deadline (bus and worker tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

from gdc_worker import Event

#: Deadline for something that should arrive at once; generous for a loaded CI machine.
ARRIVAL_TIMEOUT = 10.0

T = TypeVar("T")


class Recording(Generic[T]):
    """Items noted in order, each about one event; `wait_*` fail the test after a timeout."""

    def __init__(self, event_of: Callable[[T], Event]) -> None:
        self.items: list[T] = []
        self._event_of = event_of
        self._changed = anyio.Event()

    def note(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    @property
    def ids(self) -> list[str]:
        return [self._event_of(item).id for item in self.items]

    async def wait_until(
        self, done: Callable[[list[T]], bool], timeout: float = ARRIVAL_TIMEOUT
    ) -> list[T]:
        """Wait until `done(items)` holds; fail the test after `timeout` seconds."""
        with anyio.fail_after(timeout):
            while not done(self.items):
                await self._changed.wait()
        return self.items

    async def wait_for(self, count: int, timeout: float = ARRIVAL_TIMEOUT) -> list[T]:
        """Wait until at least `count` items were noted."""
        return await self.wait_until(lambda items: len(items) >= count, timeout)

    async def wait_for_event(self, event: Event, timeout: float = ARRIVAL_TIMEOUT) -> list[T]:
        """Wait until an item about `event` (by id) was noted."""
        return await self.wait_until(
            lambda items: event.id in {self._event_of(item).id for item in items}, timeout
        )
