"""Helpers shared by the suite's real-server tests: running workers, recording calls, waiting
on consumer state and dead letters with a deadline, free ports."""

from __future__ import annotations

import contextvars
import inspect
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import anyio
import anyio.abc
import anyio.from_thread
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from gdc_worker import (
    App,
    Context,
    DeadLetterQueue,
    DeadLetterRecord,
    Delivery,
    Event,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    RetryPolicy,
    Worker,
    new_node_up_event,
)
from tests.recording import ARRIVAL_TIMEOUT, Recording

#: How long a test's workers may take to stop once asked.
STOP_TIMEOUT = 10.0
#: Grace of the workers that are not testing stops: a stuck handler fails fast.
GRACE = 2.0
#: Three in-process attempts about a millisecond apart.
FAST_RETRY = RetryPolicy.attempts(3, initial=0.001, maximum=0.001)

#: Which worker runs the current task (set by `running`), for tests with several workers.
REPLICA: contextvars.ContextVar[str] = contextvars.ContextVar("replica", default="?")


@dataclass(frozen=True)
class Call:
    """One handler call as the handler saw it."""

    event: Event
    deliveries: int
    at: float
    replica: str
    thread: int


class Calls(Recording[Call]):
    """A record of handler calls; tests wait on it with a deadline."""

    def __init__(self) -> None:
        super().__init__(lambda call: call.event)

    def record(self, event: Event, ctx: Context | None = None, thread: int | None = None) -> None:
        """Note a call (on the event loop's thread; see `record_from_thread`)."""
        deliveries = ctx.deliveries if ctx is not None else 0
        thread = thread if thread is not None else threading.get_ident()
        self.note(Call(event, deliveries, time.monotonic(), REPLICA.get(), thread))

    def record_from_thread(self, event: Event, ctx: Context | None = None) -> None:
        """Note a call made in a worker thread (a sync handler), with that thread's id."""
        anyio.from_thread.run_sync(self.record, event, ctx, threading.get_ident())

    def of(self, event: Event) -> list[Call]:
        return [call for call in self.items if call.event.id == event.id]


async def _run(
    worker: Worker,
    label: str,
    returned: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    REPLICA.set(label)  # the worker's tasks, and so its handler calls, inherit it
    try:
        await worker.run(task_status=task_status)
    finally:
        returned.set()


@asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[list[anyio.Event]]:
    """Run the workers (labelled "0", "1", ... in `Call.replica`) until the block ends, then
    stop them and wait for them to return. Yields one event per worker, set when `run` returns."""
    returned = [anyio.Event() for _ in workers]
    async with anyio.create_task_group() as tg:
        for n, (worker, done) in enumerate(zip(workers, returned, strict=True)):
            await tg.start(_run, worker, str(n), done)
        try:
            yield returned
        finally:
            for worker, done in zip(workers, returned, strict=True):
                if not done.is_set():
                    worker.stop()
            with anyio.fail_after(STOP_TIMEOUT):
                for done in returned:
                    await done.wait()


async def consumer_info(
    js: JetStreamContext,
    stream: str,
    durable: str,
    until: Callable[[ConsumerInfo], bool] | None = None,
    timeout: float = ARRIVAL_TIMEOUT,
) -> ConsumerInfo:
    """The consumer's info once `until(info)` holds (by default: nothing pending or awaiting an
    ack), or the last one seen after `timeout`, for the caller to assert on.

    Acks are fire-and-forget and the server applies them without a notice a client could wait
    on, so this polls.
    """
    until = until or (lambda i: (i.num_ack_pending, i.num_pending) == (0, 0))
    info: ConsumerInfo = await js.consumer_info(stream, durable)
    with anyio.move_on_after(timeout):
        while not until(info):
            await anyio.sleep(0.05)
            info = await js.consumer_info(stream, durable)
    return info


def acked_up_to(info: ConsumerInfo) -> int:
    """The stream sequence up to which every message is acked (the consumer's ack floor)."""
    return info.ack_floor.stream_seq if info.ack_floor is not None else 0


async def dead_letters(
    bus: NATSEventBus, count: int = 1, timeout: float = ARRIVAL_TIMEOUT
) -> list[DeadLetterRecord]:
    """The dead-letter records once there are at least `count`; fails after `timeout`."""
    dlq = DeadLetterQueue(bus)
    with anyio.fail_after(timeout):
        while True:
            records = [entry.record async for entry in dlq.entries()]
            if len(records) >= count:
                return records
            await anyio.sleep(0.05)


def delivery(
    reply: str = "$JS.ACK.GDC_EVENTS.svc-h.1.1.1.1700000000000000000.0", client: Any = None
) -> Delivery:
    """A delivery with this reply subject, settled through `client` (none: for tests that
    never settle it)."""
    return Delivery(client, "gdc.events.node.up", reply, b"{}", None)


def node_up(node_id: str = "node-1", trace_id: str = "") -> Event:
    return new_node_up_event("health-monitor", node_id, trace_id)


def worker_for(app: App, nats_config: NATSConfig, grace: float = GRACE) -> Worker:
    return Worker(app, config=nats_config, grace=grace)


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


#: How often the polling helpers look again.
POLL = 0.02

T = TypeVar("T")


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def stopped(pid: int) -> bool:
    """Whether every thread of process `pid` is stopped: a SIGSTOP sent to it has taken hold
    (it does so on each thread in turn, not when `kill()` returns)."""
    threads = Path(f"/proc/{pid}/task").iterdir()
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for t in threads)


@asynccontextmanager
async def frozen(server: NATSServer) -> AsyncIterator[None]:
    """`server` stopped with SIGSTOP for the block: its connections stay open, and what they
    send waits unanswered until it goes on (SIGCONT) at the end."""
    process = server._process  # the test freezes the server itself
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        await eventually(lambda: stopped(process.pid), "the server to stop")
        yield
    finally:
        process.send_signal(signal.SIGCONT)


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = ...
) -> T: ...


@overload
async def eventually(check: Callable[[], T | None], what: str, timeout: float = ...) -> T: ...


async def eventually(check: Callable[[], Any], what: str, timeout: float = ARRIVAL_TIMEOUT) -> Any:
    """Poll `check` (plain or async) until it returns something truthy; fail the test after
    `timeout` seconds, naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        await anyio.sleep(POLL)


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float = ARRIVAL_TIMEOUT,
    said: Callable[[], str] = str,
) -> T:
    """`eventually` for synchronous tests; `said()` (a process's log, say) joins the failure."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s\n{said()}".rstrip())
        time.sleep(POLL)


async def settled(
    config: NATSConfig, durable: str, timeout: float = ARRIVAL_TIMEOUT
) -> ConsumerInfo:
    """`consumer_info` of the config's stream, on a connection of its own."""
    nc = await nats.connect(config.url)
    try:
        return await consumer_info(nc.jetstream(), config.stream_name, durable, timeout=timeout)
    finally:
        await nc.close()
