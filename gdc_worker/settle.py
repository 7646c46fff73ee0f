"""The settle decision: what to do with a delivery after its handler ran, as pure functions.

One of three settlements: ack, nak with a delay, or dead-letter (then terminate). The worker's
runner carries the decision out, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .errors import PublishRefused, message_of
from .retry import Reject, Retry, is_permanent

__all__ = ["ACK", "Ack", "DeadLetter", "Decision", "Nak", "decide", "exhausted"]


@dataclass(frozen=True)
class Ack:
    """Handled: acknowledge."""

    #: The name of this settlement in metrics, logs and spans.
    outcome: ClassVar[str] = "acked"


@dataclass(frozen=True)
class Nak:
    """Failed for now: redeliver after `delay` seconds."""

    delay: float
    outcome: ClassVar[str] = "nakd"


@dataclass(frozen=True)
class DeadLetter:
    """Failed for good: record it in the dead-letter stream, then terminate the message."""

    reason: str
    outcome: ClassVar[str] = "dead_lettered"


Decision = Ack | Nak | DeadLetter
ACK = Ack()


def decide(
    error: BaseException | None, deliveries: int, max_deliver: int, backoff: Sequence[float]
) -> Decision:
    """How to settle a delivery after the handler returned (`error` None) or failed."""
    if error is None:
        return ACK
    if is_permanent(error):
        if isinstance(error, Reject):
            return DeadLetter(f"rejected: {error.reason}")
        if isinstance(error, PublishRefused):
            return DeadLetter(f"what it published was refused: {message_of(error)}")
        return DeadLetter(f"invalid event data: {message_of(error)}")
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
