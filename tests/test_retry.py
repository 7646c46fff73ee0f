"""Retries and settle decisions, without a server: `decide`, `exhausted`, `Attempts`."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from tenacity import (
    AsyncRetrying,
    retry_always,
    retry_if_exception_type,
    stop_after_attempt,
    wait_fixed,
    wait_none,
)

from gdc_worker import Reject, Retry, RetryPolicy
from gdc_worker.retry import DEFAULT_BACKOFF, DEFAULT_RETRY, Attempts
from gdc_worker.settle import Ack, DeadLetter, Nak, decide, exhausted

#: A policy that retries fast: three attempts about a millisecond apart.
FAST = RetryPolicy.attempts(3, initial=0.001, maximum=0.001)
BACKOFF = (0.5, 2.0, 10.0)


class Flaky:
    """An attempt that raises `RuntimeError("failure <n>")` on its first `failures` calls."""

    def __init__(self, failures: int, error: Callable[[int], Exception] | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self._error = error or (lambda n: RuntimeError(f"failure {n}"))

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self._error(self.calls)
        return "done"


# -- decide --------------------------------------------------------------------------------------


@pytest.mark.parametrize("deliveries", [1, 3, 5, 9])
def test_success_is_acked_on_any_delivery(deliveries: int) -> None:
    """Given a handler that returned,
    when the delivery is settled, whichever delivery it was (even past max_deliver),
    then it is acked."""
    assert decide(None, deliveries, 5, BACKOFF) == Ack()


@pytest.mark.parametrize("deliveries", [1, 2, 5])
def test_reject_is_dead_lettered_at_once_naming_the_reason(deliveries: int) -> None:
    """Given a handler that raised Reject("bad payload"),
    when the delivery is settled on a first, middle or last delivery,
    then it is dead-lettered, with the reason in the dead letter's reason."""
    decision = decide(Reject("bad payload"), deliveries, 5, BACKOFF)

    assert isinstance(decision, DeadLetter)
    assert "bad payload" in decision.reason


@pytest.mark.parametrize(
    ("deliveries", "delay"),
    [(1, 0.5), (2, 2.0), (3, 10.0), (4, 10.0), (9, 10.0)],
)
def test_failure_before_the_last_delivery_is_nakd_with_that_deliverys_backoff(
    deliveries: int, delay: float
) -> None:
    """Given backoff (0.5, 2, 10) and max_deliver 10,
    when delivery n fails,
    then it is nak'd with the n-th delay, the last delay repeating beyond the list."""
    assert decide(RuntimeError("down"), deliveries, 10, BACKOFF) == Nak(delay)


def test_default_backoff_grows_and_its_last_value_repeats() -> None:
    """Given the default backoff,
    when deliveries 1 to 6 fail under a large max_deliver,
    then the nak delays follow the documented 1, 5, 30, 60 s and then stay at 60 s."""
    delays = [decide(RuntimeError(), n, 100, DEFAULT_BACKOFF) for n in range(1, 7)]

    assert delays == [Nak(1.0), Nak(5.0), Nak(30.0), Nak(60.0), Nak(60.0), Nak(60.0)]


@pytest.mark.parametrize(("deliveries", "max_deliver"), [(1, 1), (3, 3), (5, 5), (6, 5)])
def test_failure_on_the_last_delivery_is_dead_lettered(deliveries: int, max_deliver: int) -> None:
    """Given a handler that raised a plain exception,
    when that was delivery max_deliver (or later),
    then it is dead-lettered with a reason naming the delivery and max_deliver."""
    decision = decide(RuntimeError("down"), deliveries, max_deliver, BACKOFF)

    assert decision == DeadLetter(f"failed on delivery {deliveries} of {max_deliver}")


@pytest.mark.parametrize("deliveries", [1, 4])
def test_retry_is_nakd_with_its_own_delay_instead_of_the_backoff(deliveries: int) -> None:
    """Given a handler that raised Retry(delay=7.5),
    when that was not the last delivery,
    then it is nak'd with 7.5 s whatever the backoff says."""
    assert decide(Retry(delay=7.5), deliveries, 5, BACKOFF) == Nak(7.5)


def test_retry_on_the_last_delivery_is_dead_lettered() -> None:
    """Given a handler that raised Retry,
    when that was delivery max_deliver,
    then it is dead-lettered: Retry does not extend max_deliver."""
    decision = decide(Retry(delay=1.0), 5, 5, BACKOFF)

    assert isinstance(decision, DeadLetter)
    assert "5 of 5" in decision.reason


def test_retry_with_a_negative_delay_means_at_once() -> None:
    """Given Retry(delay=-3),
    when the delivery is settled,
    then it is nak'd with no delay (JetStream refuses a negative one)."""
    assert decide(Retry(delay=-3.0), 1, 5, BACKOFF) == Nak(0.0)


@pytest.mark.parametrize("delay", [math.inf, math.nan, 1e300, "5", None, True])
def test_a_retry_delay_no_nak_can_carry_fails_where_it_is_raised(delay: Any) -> None:
    """Given a handler about to raise Retry with a delay that is not a finite number of
    seconds JetStream can take (infinite, NaN, past its int64 nanoseconds, not a number),
    when the Retry is made,
    then ValueError names the delay: the handler's own failure, retried and dead-lettered
    with that reason, not an internal error at the nak."""
    with pytest.raises(ValueError, match=r"Retry\(delay=\.\.\.\) takes a number of seconds"):
        Retry(delay=delay)


def test_retry_and_reject_messages_explain_themselves() -> None:
    """Given Retry and Reject raised with and without a reason,
    when they are shown (logs, dead letters),
    then the text says what was asked."""
    assert str(Retry(delay=2.0)) == "retry requested in 2s"
    assert str(Retry(delay=2.0, reason="upstream busy")) == "upstream busy"
    assert str(Reject("no such cid")) == "no such cid"


# -- exhausted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("deliveries", "max_deliver"), [(1, 1), (1, 5), (5, 5)])
def test_a_delivery_within_max_deliver_is_not_exhausted(deliveries: int, max_deliver: int) -> None:
    """Given delivery n <= max_deliver,
    when the worker checks it before running the handler,
    then it runs the handler (nothing to dead-letter)."""
    assert exhausted(deliveries, max_deliver) is None


@pytest.mark.parametrize(("deliveries", "max_deliver"), [(2, 1), (6, 5), (40, 5)])
def test_a_delivery_past_max_deliver_is_dead_lettered_unrun(
    deliveries: int, max_deliver: int
) -> None:
    """Given a delivery past max_deliver (earlier attempts died without settling),
    when the worker checks it,
    then it is dead-lettered with a reason naming the count and max_deliver."""
    decision = exhausted(deliveries, max_deliver)

    assert isinstance(decision, DeadLetter)
    assert f"delivered {deliveries} times" in decision.reason
    assert f"max_deliver={max_deliver}" in decision.reason


# -- Attempts ------------------------------------------------------------------------------------


async def run_with_retry(policy: RetryPolicy | None, attempt: Callable[[], Awaitable[Any]]) -> None:
    """What the worker does with a handler: an attempt, and another while `Attempts` says so."""
    attempts = Attempts(policy)
    while True:
        try:
            await attempt()
            return
        except Exception as exc:
            if not await attempts.again(exc):
                raise exc from None


@pytest.mark.anyio
@pytest.mark.parametrize("policy", [FAST, None], ids=["policy", "no-policy"])
async def test_an_attempt_that_succeeds_runs_once(policy: RetryPolicy | None) -> None:
    """Given an attempt that succeeds,
    when it runs with or without a policy,
    then it is called once."""
    attempt = Flaky(0)

    await run_with_retry(policy, attempt)

    assert attempt.calls == 1


@pytest.mark.anyio
async def test_an_attempt_that_fails_twice_then_succeeds_runs_three_times() -> None:
    """Given a three-attempt policy and an attempt that fails twice,
    when it runs,
    then it is called three times and returns normally."""
    attempt = Flaky(2)

    await run_with_retry(FAST, attempt)

    assert attempt.calls == 3


@pytest.mark.anyio
@pytest.mark.parametrize("n", [1, 2, 4])
async def test_an_attempt_that_always_fails_raises_the_last_error_after_n_attempts(n: int) -> None:
    """Given an n-attempt policy and an attempt that always fails,
    when it runs,
    then it is called n times and the error of the last call is raised (not a RetryError)."""
    attempt = Flaky(100)

    with pytest.raises(RuntimeError, match=rf"^failure {n}$"):
        await run_with_retry(RetryPolicy.attempts(n, initial=0.001, maximum=0.001), attempt)

    assert attempt.calls == n


@pytest.mark.anyio
async def test_without_a_policy_a_failure_is_raised_after_one_attempt() -> None:
    """Given no policy (`retry=None`),
    when a failing attempt runs,
    then it is called once and its error raised."""
    attempt = Flaky(1)

    with pytest.raises(RuntimeError, match=r"^failure 1$"):
        await run_with_retry(None, attempt)

    assert attempt.calls == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [lambda n: Retry(delay=1.0), lambda n: Reject("bad")],
    ids=["Retry", "Reject"],
)
async def test_retry_and_reject_are_never_retried_in_process(
    error: Callable[[int], Exception],
) -> None:
    """Given a policy that retries every exception five times,
    when the attempt raises Retry or Reject,
    then it is called once and the exception goes to the caller (for decide())."""
    everything = RetryPolicy(
        AsyncRetrying(stop=stop_after_attempt(5), wait=wait_none(), retry=retry_always)
    )
    attempt = Flaky(100, error)

    with pytest.raises((Retry, Reject)):
        await run_with_retry(everything, attempt)

    assert attempt.calls == 1


@pytest.mark.anyio
async def test_a_retry_after_an_ordinary_failure_stops_the_retries() -> None:
    """Given a five-attempt policy and an attempt that fails, then raises Retry,
    when it runs,
    then it stops at the Retry (two calls) and raises it."""
    attempt = Flaky(100, lambda n: RuntimeError("down") if n == 1 else Retry(delay=3.0))

    with pytest.raises(Retry):
        await run_with_retry(RetryPolicy.attempts(5, initial=0.001, maximum=0.001), attempt)

    assert attempt.calls == 2


@pytest.mark.anyio
async def test_a_user_tenacity_policy_is_followed_and_reraises_the_original_error() -> None:
    """Given a RetryPolicy around the user's AsyncRetrying(stop_after_attempt(2), wait_none())
    (without reraise=True),
    when an always-failing attempt runs,
    then it is called twice and the original error is raised, not tenacity's RetryError."""
    policy = RetryPolicy(AsyncRetrying(stop=stop_after_attempt(2), wait=wait_none()))
    attempt = Flaky(100)

    with pytest.raises(RuntimeError, match=r"^failure 2$"):
        await run_with_retry(policy, attempt)

    assert attempt.calls == 2


@pytest.mark.anyio
async def test_a_user_retry_predicate_decides_which_errors_are_retried() -> None:
    """Given a policy retrying only ValueError, up to four attempts,
    when one attempt fails with ValueError then KeyError,
    then the ValueError is retried and the KeyError is raised at once (two calls)."""
    policy = RetryPolicy(
        AsyncRetrying(
            stop=stop_after_attempt(4), wait=wait_none(), retry=retry_if_exception_type(ValueError)
        )
    )
    attempt = Flaky(100, lambda n: ValueError("retry me") if n == 1 else KeyError("give up"))

    with pytest.raises(KeyError):
        await run_with_retry(policy, attempt)

    assert attempt.calls == 2


@pytest.mark.anyio
async def test_a_policy_waits_between_attempts() -> None:
    """Given a three-attempt policy with a fixed 50 ms wait,
    when an always-failing attempt runs,
    then the attempts take at least the two waits (a lower bound, not a speed test)."""
    policy = RetryPolicy(AsyncRetrying(stop=stop_after_attempt(3), wait=wait_fixed(0.05)))
    attempt = Flaky(100)
    started = time.monotonic()

    with pytest.raises(RuntimeError):
        await run_with_retry(policy, attempt)

    assert time.monotonic() - started >= 0.095
    assert attempt.calls == 3


@pytest.mark.anyio
async def test_one_policy_serves_concurrent_deliveries_each_with_all_its_attempts() -> None:
    """Given one three-attempt policy shared by five deliveries running at the same time,
    when each runs an always-failing attempt (interleaved by a 10 ms wait),
    then each gets its own three attempts: no state is shared between them."""
    policy = RetryPolicy(AsyncRetrying(stop=stop_after_attempt(3), wait=wait_fixed(0.01)))
    attempts = [Flaky(100) for _ in range(5)]
    errors: list[BaseException] = []

    async def deliver(attempt: Flaky) -> None:
        try:
            await run_with_retry(policy, attempt)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for attempt in attempts:
            tg.start_soon(deliver, attempt)

    assert [a.calls for a in attempts] == [3] * 5
    assert [str(e) for e in errors] == ["failure 3"] * 5


@pytest.mark.anyio
async def test_the_default_policy_makes_three_attempts() -> None:
    """Given the default policy of `@app.on`,
    when an always-failing attempt runs,
    then it is called three times before the error is raised."""
    attempt = Flaky(100)

    with pytest.raises(RuntimeError, match=r"^failure 3$"):
        await run_with_retry(DEFAULT_RETRY, attempt)

    assert attempt.calls == 3
