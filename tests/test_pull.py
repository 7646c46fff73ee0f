"""Pure parts of the pull consumer: reading a delivery's reply subject, the hand-off of
deliveries to workers, and the pull requests it asks for."""

from __future__ import annotations

import asyncio
import json

import anyio
import pytest

from gdc_worker.bus import pull
from gdc_worker.bus.pull import Delivery, PullConsumer, _Handoff
from tests.support import delivery

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("reply", "stream", "deliveries", "seq"),
    [
        pytest.param("$JS.ACK.GDC_EVENTS.svc-h.3.42.7.1700000000000000000.5", "GDC_EVENTS", 3, 42),
        pytest.param(
            "$JS.ACK.hub.ACCOUNTHASH.GDC_EVENTS.svc-h.1.9.9.1700000000000000000.0.token",
            "GDC_EVENTS",
            1,
            9,
            id="with-domain-and-account",
        ),
    ],
)
def test_a_delivery_reads_stream_count_and_sequence_from_its_reply(
    reply: str, stream: str, deliveries: int, seq: int
) -> None:
    """Given a JetStream ack subject, in the short form or with domain and account hash,
    when a Delivery is made from it,
    then it names the stream, the delivery count and the stream sequence."""
    got = delivery(reply)

    assert (got.stream, got.deliveries, got.stream_seq) == (stream, deliveries, seq)


@pytest.mark.parametrize(
    "reply",
    ["", "_INBOX.abc", "$JS.ACK.S.C.1.2", "$JS.ACK.S.C.x.2.3.4.5", "$JS.ACK.a.b.c.d.e.f.g.h.i.j"],
)
def test_a_reply_that_is_no_ack_subject_is_refused(reply: str) -> None:
    """Given a reply subject of another shape,
    when a Delivery is made from it,
    then ValueError is raised (the consumer ignores such a message instead of crashing)."""
    with pytest.raises(ValueError, match=r"not a JetStream ack subject|invalid literal"):
        delivery(reply)


def _deliveries(n: int) -> list[Delivery]:
    return [delivery(f"$JS.ACK.S.C.1.{i}.{i}.0.0") for i in range(1, n + 1)]


async def test_handoff_gives_deliveries_in_order_then_ends() -> None:
    """Given three deliveries put in the hand-off, then the end,
    when a worker takes from it,
    then it gets them in order, then EndOfStream."""
    handoff = _Handoff()
    items = _deliveries(3)
    for item in items:
        handoff.put(item)
    handoff.end()

    taken = [await handoff.get() for _ in items]

    assert taken == items
    with pytest.raises(anyio.EndOfStream):
        await handoff.get()


async def test_handoff_wakes_a_waiting_worker_and_end_wakes_all() -> None:
    """Given two workers waiting on an empty hand-off,
    when one delivery is put and then the hand-off ends,
    then exactly one worker gets the delivery and the other gets EndOfStream."""
    handoff = _Handoff()
    results: list[object] = []

    async def worker() -> None:
        try:
            results.append(await handoff.get())
        except anyio.EndOfStream:
            results.append("end")

    [item] = _deliveries(1)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            tg.start_soon(worker)
            await anyio.wait_all_tasks_blocked()
            handoff.put(item)
            await anyio.wait_all_tasks_blocked()
            handoff.end()

    assert sorted(results, key=str) == sorted([item, "end"], key=str)


async def test_handoff_passes_a_wake_up_on_when_the_woken_worker_is_cancelled() -> None:
    """Given a worker woken for a delivery but cancelled before it runs, and a second worker
    waiting,
    when the first is cancelled,
    then the second gets the delivery: nothing is stranded in the hand-off."""
    handoff = _Handoff()
    [item] = _deliveries(1)
    with anyio.fail_after(5):
        first = asyncio.ensure_future(handoff.get())
        second = asyncio.ensure_future(handoff.get())
        await anyio.wait_all_tasks_blocked()
        handoff.put(item)  # wakes the first waiter...
        first.cancel()  # ...which is cancelled before it runs
        assert await second is item
    assert first.cancelled()


async def test_take_all_empties_what_no_worker_took() -> None:
    """Given deliveries nobody took,
    when take_all() is called (on close),
    then it returns them all and leaves the hand-off empty."""
    handoff = _Handoff()
    items = _deliveries(2)
    for item in items:
        handoff.put(item)

    assert handoff.take_all() == items
    assert handoff.take_all() == []


class Recorder:
    """Stands in for the client in a Delivery: notes what it would publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish_now(self, subject: str, payload: bytes) -> None:
        self.sent.append((subject, payload))


@pytest.mark.parametrize(
    "reason",
    ["é" * 200, "xx" + "€" * 100, "plain reason", ""],
    ids=["2-byte", "3-byte", "ascii", "none"],
)
async def test_a_term_reason_is_cut_on_a_character_boundary(reason: str) -> None:
    """Given a termination reason longer than the 256 bytes the server keeps, in UTF-8,
    when the delivery is terminated,
    then the reason sent is at most 256 bytes and still valid UTF-8 (a prefix of the reason)."""
    client = Recorder()
    reply = "$JS.ACK.S.C.1.2.2.0.0"
    target = delivery(reply, client)

    await target.term(reason)

    [(subject, payload)] = client.sent
    sent = payload.removeprefix(b"+TERM").removeprefix(b" ")
    assert subject == reply
    assert len(sent) <= 256
    assert reason.startswith(sent.decode("utf-8"))
    assert (payload == b"+TERM") == (reason == "")


class PullClient:
    """Stands in for the client of a PullConsumer: notes the pull requests it would send."""

    is_connected = True

    def __init__(self) -> None:
        self.requests: list[dict[str, int]] = []

    def new_inbox(self) -> str:
        return "_INBOX.test"

    def publish_now(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.requests.append(json.loads(payload))

    async def subscribe_direct(self, subject: str, deliver: object) -> None:
        return None


def _refusal(consumer: PullConsumer, description: str, status: str = "409") -> None:
    consumer._on_msg(b"_INBOX.test", b"", b"", {"Status": status, "Description": description})


async def test_a_refused_pull_request_is_asked_again_later_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a pull consumer whose request the server refused for a reason asking again
    cannot cure at once (too many requests waiting on the consumer),
    when more refusals alike arrive,
    then nothing is asked at once, one warning names the refusal, and the request is asked
    again once `watch()` looks again: never a loop of refused requests."""
    client = PullClient()
    consumer = PullConsumer(client, "S", "c", capacity=8, heartbeat=0.1)  # type: ignore[arg-type]
    await consumer.start()
    assert [r["batch"] for r in client.requests] == [8]

    for _ in range(3):
        _refusal(consumer, "Exceeded MaxWaiting")

    assert len(client.requests) == 1
    assert caplog.text.count("refused a pull request (Exceeded MaxWaiting)") == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.watch)
        with anyio.fail_after(5):
            while len(client.requests) == 1:
                await anyio.sleep(0.01)
        consumer.stop_fetching()
    assert [r["batch"] for r in client.requests] == [8, 8]


@pytest.mark.parametrize(
    ("description", "batches", "expires_ns", "heartbeat_ns"),
    [
        ("Exceeded MaxRequestBatch of 3", [3, 3, 2], 30_000_000_000, 1_000_000_000),
        ("Exceeded MaxRequestExpires of 1m30s", [8], 30_000_000_000, 1_000_000_000),
        ("Exceeded MaxRequestExpires of 1.5s", [8], 1_500_000_000, 750_000_000),
        ("Exceeded MaxRequestExpires of 60ms", [8], 60_000_000, 0),
    ],
    ids=["batch", "expires-longer-than-ours", "expires", "expires-too-short-for-a-heartbeat"],
)
async def test_a_pull_request_over_the_consumer_s_limit_is_asked_again_within_it(
    description: str, batches: list[int], expires_ns: int, heartbeat_ns: int
) -> None:
    """Given a pull consumer of capacity 8 asking for requests open 30 s with a 1 s heartbeat,
    when the server refuses one over the consumer's max_batch or max_expires,
    then the requests asked for next keep to that limit, with a heartbeat the server takes
    (half a request's life at most, none for requests shorter than 0.1 s)."""
    client = PullClient()
    consumer = PullConsumer(client, "S", "c", capacity=8)  # type: ignore[arg-type]
    await consumer.start()

    _refusal(consumer, description)
    await consumer.reset()

    asked = client.requests[1:]
    assert [r["batch"] for r in asked] == batches
    assert {(r["expires"], r["idle_heartbeat"]) for r in asked} == {(expires_ns, heartbeat_ns)}


class Clock:
    """Stands in for the pull module's `time`: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_a_consumer_settled_fast_holds_more_and_a_slow_one_less_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a pull consumer that may hold 8 deliveries, or up to 32 while settled fast,
    when each batch it holds is settled within a millisecond,
    then it asks for more at once (up to 32 held), and once the next ones take a second each
    to settle, it asks for no more than 8 held again."""
    clock = Clock()
    monkeypatch.setattr(pull, "time", clock)
    client = PullClient()
    consumer = PullConsumer(client, "S", "c", capacity=8, max_capacity=32)  # type: ignore[arg-type]
    await consumer.start()
    seq = 0

    async def settle(n: int, each_s: float) -> None:
        """`n` of the deliveries asked for arrive, and are settled `each_s` apart."""
        nonlocal seq
        for _ in range(n):
            seq += 1
            reply = f"$JS.ACK.S.c.1.{seq}.{seq}.0.0".encode()
            consumer._on_msg(b"s.a", reply, b"{}", None)
        for _ in range(n):
            clock.now += each_s
            consumer.release(await consumer.next())

    for _ in range(3):
        await settle(8, 0.0001)
    assert sum(r["batch"] for r in client.requests) - seq == 32  # asked for: 32 held at most

    def outstanding() -> int:
        return sum(r["batch"] for r in client.requests) - seq

    for _ in range(12):  # the requests already open arrive too, and are settled as slowly
        await settle(min(8, outstanding()), 1.0)
    assert outstanding() <= 8


async def test_a_leadership_change_asks_again_at_once_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a pull consumer with its request open,
    when the consumer's leader changes (a 409 with no pending count, as in a cluster failover),
    then it asks again at once, for all it may hold, and warns of nothing: that is no refusal."""
    client = PullClient()
    consumer = PullConsumer(client, "S", "c", capacity=8)  # type: ignore[arg-type]
    await consumer.start()

    _refusal(consumer, "Leadership Change")

    assert [r["batch"] for r in client.requests] == [8, 8]
    assert "refused" not in caplog.text


async def test_a_consumer_whose_handler_slows_down_holds_less_without_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a pull consumer that may hold 8 deliveries, up to 32 while settled fast, holding
    32 after a burst of fast settles,
    when its handler slows down (nothing settled for a second, then one each 30 ms),
    then it asks for no more than 8 held again: `watch()` shrinks what it may hold while
    nothing is settled, rather than after another 32 slow settles."""
    clock = Clock()
    monkeypatch.setattr(pull, "time", clock)
    client = PullClient()
    consumer = PullConsumer(client, "S", "c", capacity=8, max_capacity=32, heartbeat=0.1)  # type: ignore[arg-type]
    await consumer.start()
    seq = 0
    held: list[Delivery] = []

    def arrive(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            reply = f"$JS.ACK.S.c.1.{seq}.{seq}.0.0".encode()
            consumer._on_msg(b"s.a", reply, b"{}", None)

    async def settle(each_s: float) -> None:
        while held:
            clock.now += each_s
            consumer.release(held.pop())

    for _ in range(3):
        arrive(8)
        held += [await consumer.next() for _ in range(8)]
        await settle(0.0001)
    arrive(32)  # what it asked for: it holds 32
    held += [await consumer.next() for _ in range(32)]

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.watch)
        for _ in range(4):  # a second passes between each look of watch()
            clock.now += 1.0
            await anyio.sleep(0.06)
        await settle(0.03)
        consumer.stop_fetching()

    assert sum(r["batch"] for r in client.requests) - seq <= 8
