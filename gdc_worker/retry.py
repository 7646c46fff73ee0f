"""What happens after a handler fails: in-process retries (tenacity) and the settle decision.

`decide()` is a pure function from (outcome, delivery count, options) to one settlement: ack,
nak with a delay, or dead-letter. `retry_failed()` runs a delivery's attempts after a first
one failed.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_RETRY",
    "Ack",
    "DeadLetter",
    "Decision",
    "Nak",
    "Reject",
    "Retry",
    "RetryPolicy",
    "decide",
]

#: Nak delays in seconds after failed deliveries 1, 2, 3, 4 (and beyond).
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0, 60.0)


class Retry(Exception):
    """Raise in a handler to have the event redelivered after `delay` seconds, no retries here."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = max(0.0, delay)


class Reject(Exception):
    """Raise in a handler for a permanent failure: the event goes to the dead-letter stream now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, Retry | Reject)


class RetryPolicy:
    """In-process attempts for one delivery, as a tenacity `AsyncRetrying`.

    `Retry` and `Reject` are never retried here, whatever `retrying` says.
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


async def retry_failed(
    policy: RetryPolicy | None,
    attempt: Callable[[], Awaitable[Any]],
    failure: Exception,
) -> Exception | None:
    """After a first attempt failed with `failure`, retry as `policy` says.

    Returns None once an attempt succeeds, else the error the last attempt ended with. The
    first attempt runs outside tenacity, so a handler that succeeds pays nothing for it.
    """
    if policy is None or not _retryable(failure):
        return failure
    retrying = policy.retrying.copy()
    retrying.begin()
    state = RetryCallState(retry_object=retrying, fn=None, args=(), kwargs={})
    state.set_exception((type(failure), failure, failure.__traceback__))
    while True:
        try:
            action = await retrying.iter(retry_state=state)
        except Exception as exc:  # the policy gave up and re-raised the last error
            return exc
        if isinstance(action, DoAttempt):
            try:
                await attempt()
            except Exception:
                state.set_exception(sys.exc_info())  # type: ignore[arg-type]
            else:
                return None
        elif isinstance(action, DoSleep):
            state.prepare_for_next_attempt()
            await anyio.sleep(float(action))
        else:  # a policy that returns a value instead of raising
            return None


@dataclass(frozen=True)
class Ack:
    """Handled: acknowledge."""


@dataclass(frozen=True)
class Nak:
    """Failed for now: redeliver after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Failed for good: record it in the dead-letter stream, then terminate the message."""

    reason: str


Decision = Ack | Nak | DeadLetter
ACK = Ack()


def decide(
    error: BaseException | None, deliveries: int, max_deliver: int, backoff: Sequence[float]
) -> Decision:
    """How to settle a delivery after the handler returned (`error` None) or failed."""
    if error is None:
        return ACK
    if isinstance(error, Reject):
        return DeadLetter(f"rejected: {error.reason}")
    if deliveries >= max_deliver:
        return DeadLetter(f"failed on delivery {deliveries} of {max_deliver}")
    if isinstance(error, Retry):
        return Nak(error.delay)
    return Nak(backoff[min(deliveries, len(backoff)) - 1])


def exhausted(deliveries: int, max_deliver: int) -> DeadLetter | None:
    """A delivery past `max_deliver`: an earlier attempt ended without settling (a crash)."""
    if deliveries > max_deliver:
        return DeadLetter(
            f"delivered {deliveries} times, more than max_deliver={max_deliver}: earlier "
            "attempts ended without a result (worker killed or ack_wait exceeded)"
        )
    return None
