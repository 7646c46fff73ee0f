"""In-process retries after a handler fails (tenacity), and the two exceptions a handler raises
on purpose to steer them: `Retry` (redeliver later) and `Reject` (dead-letter now).

`Attempts` says, after each failed attempt of a delivery, whether to try once more; what
happens to the delivery after the last is `settle.decide()`'s call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from tenacity import (
    AsyncRetrying,
    DoAttempt,
    DoSleep,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .errors import EventError, PublishRefused

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_RETRY",
    "Attempts",
    "Reject",
    "Retry",
    "RetryPolicy",
    "is_handler_failure",
    "is_permanent",
]

#: Nak delays in seconds after failed deliveries 1, 2, 3, 4 (and beyond).
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0, 60.0)


class Retry(Exception):
    """Raise in a handler to have the event redelivered after `delay` seconds, no retries here."""

    #: The longest delay JetStream takes (its nanoseconds are an int64): about 292 years.
    MAX_DELAY_S = (2**63 - 1) / 1e9

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        # A delay no nak can carry fails where it is raised, naming itself: the handler's
        # failure, retried and dead-lettered as any other, not an internal error at the nak.
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not delay <= self.MAX_DELAY_S
        ):
            raise ValueError(
                f"Retry(delay=...) takes a number of seconds up to {self.MAX_DELAY_S:.3g}, "
                f"got {delay!r}"
            )
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = max(0.0, delay)


class Reject(Exception):
    """Raise in a handler for a permanent failure: the event goes to the dead-letter stream now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_permanent(exc: BaseException) -> bool:
    """A failure no retry can fix: a `Reject`, event data that does not fit its type, or an
    event the handler published that JetStream will never take (`PublishRefused`: over
    max_payload, say), which the next attempt would publish again."""
    return isinstance(exc, Reject | EventError | PublishRefused)


def is_handler_failure(exc: BaseException) -> bool:
    """Whether `exc`, raised out of a handler call, is the handler's failure.

    Everything is, `SystemExit`, `KeyboardInterrupt` and a `CancelledError` the handler raised
    itself included, except a cancellation of the calling task (a forced stop): that one
    asyncio counts on the task, a handler's own `CancelledError` it does not.
    """
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() == 0
    return True


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, Retry) and not is_permanent(exc)


class RetryPolicy:
    """In-process attempts for one delivery, as a tenacity `AsyncRetrying`.

    `Retry` and permanent failures (`Reject`, `EventDataError`, `PublishRefused`) are never
    retried here, whatever `retrying` says.
    """

    def __init__(self, retrying: AsyncRetrying) -> None:
        # The worker needs the last error to settle the delivery: always re-raise it.
        self.retrying = retrying.copy(
            retry=retry_if_exception(_retryable) & retrying.retry,
            reraise=True,
            retry_error_callback=None,
        )

    @classmethod
    def attempts(cls, n: int, *, initial: float = 0.05, maximum: float = 1.0) -> RetryPolicy:
        """`n` attempts with exponential backoff and jitter between them."""
        return cls(
            AsyncRetrying(
                stop=stop_after_attempt(n),
                wait=wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial),
                reraise=True,
            )
        )

    def __repr__(self) -> str:
        return f"RetryPolicy(stop={self.retrying.stop!r}, wait={self.retrying.wait!r})"


#: Three quick attempts (waits of 0.05-0.10 s, then 0.10-0.15 s, jitter included) before a nak.
DEFAULT_RETRY = RetryPolicy.attempts(3)


class Attempts:
    """A delivery's in-process attempts, as `policy` says: after each failed attempt,
    `again(failure)` waits as the policy says, with `sleep` (the in-memory test app passes its
    virtual clock's), and tells whether to try once more.

    Nothing of tenacity runs before a first failure, so a handler that succeeds pays nothing
    for it.
    """

    def __init__(
        self,
        policy: RetryPolicy | None,
        *,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
    ) -> None:
        self._policy = policy
        self._sleep = sleep
        self._retrying: AsyncRetrying | None = None
        self._state: RetryCallState | None = None

    async def again(self, failure: BaseException) -> bool:
        """After an attempt failed with `failure`: True once it is time to try again; False
        when the policy gives up, and the delivery is settled with `failure`."""
        if self._retrying is None or self._state is None:
            if self._policy is None or not _retryable(failure):
                return False
            self._retrying = self._policy.retrying.copy()
            self._retrying.begin()
            self._state = RetryCallState(retry_object=self._retrying, fn=None, args=(), kwargs={})
        retrying, state = self._retrying, self._state
        state.set_exception((type(failure), failure, failure.__traceback__))
        while True:
            try:
                action = await retrying.iter(retry_state=state)
            except BaseException as exc:  # the policy gave up and re-raised the last error
                if exc is failure:
                    return False
                raise
            if isinstance(action, DoAttempt):
                return True
            if not isinstance(action, DoSleep):
                return False  # tenacity returned instead of raising: settle, never an ack
            state.prepare_for_next_attempt()
            await self._sleep(float(action))
