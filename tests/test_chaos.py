"""Zero loss under chaos: replicas killed -9 about every second, nats-server restarted mid-flow.

Three `gdc-worker run` processes of `tests.apps.recorder:short_ack_wait` (a 2 s ack wait, so
what a killed replica held comes back soon) share one durable consumer. The test restarts
them itself, at once, rather than through `--processes`, whose supervisor waits longer and
longer before restarting replicas that keep dying young. The nats-server is the test's own,
on a fixed port and store dir (JetStream file storage), so it can be stopped and started
under everyone. The publisher runs in the test and retries each event with the same id until
it is stored, as a real one does.

`pytest -s -m chaos` prints what happened; the figures are also attached to the test report
(`record_property`, in the JUnit XML).
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from gdc_worker import DeadLetterQueue, Event, NATSEventBus, NATSServer, PublishError
from gdc_worker.testing import isolated_config
from tests.processes import (
    READY,
    SHORT_ACK_DURABLE,
    Process,
    ids,
    node_ups,
    reports,
    worker_env,
)
from tests.support import free_port, settled

EVENTS = 5000
#: Events published per second: 5,000 take 25 s, the span of the chaos.
PUBLISH_RATE = 200.0
REPLICAS = 3
#: About how often a replica is killed.
KILL_EVERY_S = 1.0
#: How long each handler call takes, so that kills land in the middle of some.
HANDLER_S = "0.05"
#: Deadline for the publisher to store every event, chaos and the restart included.
PUBLISH_TIMEOUT = 75.0
#: Deadline for the last events to be handled once the chaos stops; events a killed replica
#: held come back after the 2 s ack wait, then may be fetched by one killed again.
SETTLE_TIMEOUT = 60.0
#: How long the nats-server stays down when it restarts: longer than the publisher's connect
#: timeout, so that its publishes fail and are sent again (replicas also reconnect, and those
#: started meanwhile exit 4 and are replaced).
DOWN_S = 3.0
#: The publisher's connect timeout: how long `publish_event` retries by itself.
PUBLISH_CONNECT_TIMEOUT_S = 1.0
#: Pause before a publish that failed (the server down longer than connect_timeout) is retried.
REPUBLISH_WAIT_S = 0.1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NATSServer]:
    """A nats-server of the test's own, on a fixed port and store dir, so it can restart."""
    nats = NATSServer(port=free_port(), store_dir=tmp_path / "jetstream")
    try:
        yield nats.start()
    finally:
        nats.stop()


class Replicas:
    """`gdc-worker run` replicas of one app, `count` at a time: a killed one, or one that
    exits by itself (it started while the server was down, say), is replaced at once."""

    def __init__(self, args: list[str], env: dict[str, str], logs: Path, count: int) -> None:
        self._args = args
        self._env = env
        self._logs = logs
        self.started: list[Process] = []
        self.killed: list[Process] = []
        self.current = [self._start() for _ in range(count)]

    def _start(self) -> Process:
        process = Process(self._args, self._env, self._logs / f"replica-{len(self.started)}")
        self.started.append(process)
        return process

    def replace_exited(self) -> None:
        self.current = [p if p.popen.poll() is None else self._start() for p in self.current]

    def kill_one(self) -> None:
        """SIGKILL a random replica that is working (it logged `worker ready`), start another."""
        working = [p for p in self.current if p.popen.poll() is None and READY.search(p.stderr)]
        if working:
            victim = random.choice(working)
            victim.send(signal.SIGKILL)
            victim.popen.wait()
            self.killed.append(victim)
        self.replace_exited()

    def exits(self) -> Counter[int]:
        """The exit codes of the replicas that ended by themselves (not killed by the test)."""
        return Counter(
            p.popen.returncode
            for p in self.started
            if p not in self.killed and p.popen.poll() is not None
        )

    def close(self) -> None:
        for process in self.started:
            process.close()


@dataclass
class Publisher:
    """Publishes events steadily, each retried with the same id until JetStream stores it."""

    bus: NATSEventBus
    #: The ids of the events stored so far, in the order published.
    published: list[str] = field(default_factory=list)
    #: Set once half the events are stored.
    half_way: anyio.Event = field(default_factory=anyio.Event)
    #: Publishes that raised `PublishError` and were sent again.
    retries: int = 0

    async def run(self, events: list[Event]) -> None:
        start = anyio.current_time()
        for n, event in enumerate(events):
            await anyio.sleep_until(start + n / PUBLISH_RATE)
            while True:
                try:
                    await self.bus.publish_event(event)
                    break
                except PublishError:
                    self.retries += 1
                    await anyio.sleep(REPUBLISH_WAIT_S)
            self.published.append(event.id)
            if len(self.published) == len(events) // 2:
                self.half_way.set()


async def restart(server: NATSServer, when: anyio.Event) -> float:
    """Stop the server (SIGTERM) once `when` is set, start it again `DOWN_S` seconds later;
    the seconds it was unreachable."""
    await when.wait()
    began = time.monotonic()
    await anyio.to_thread.run_sync(server.stop)
    await anyio.sleep(DOWN_S)
    await anyio.to_thread.run_sync(server.start)
    return time.monotonic() - began


async def kill_until(replicas: Replicas, done: anyio.Event) -> None:
    """Kill a replica about every `KILL_EVERY_S` seconds until `done` is set.

    The pauses are random (half to one and a half times that): at a fixed period, a multiple
    of the ack wait, an event cut short by one kill came back just before a later one, every
    time, and was dead-lettered after five kills caught it."""
    while not done.is_set():
        with anyio.move_on_after(KILL_EVERY_S * random.uniform(0.5, 1.5)):
            await done.wait()
        if not done.is_set():
            replicas.kill_one()


async def unhandled(out: Path, wanted: set[str], timeout: float) -> set[str]:
    """The ids in `wanted` not handled yet: once there are none, or those left after `timeout`."""
    missing = wanted - set(ids(out, "done"))
    with anyio.move_on_after(timeout):
        while missing:
            await anyio.sleep(0.1)
            missing -= set(ids(out, "done"))
    return missing


def interrupted(out: Path, killed: list[Process]) -> int:
    """Handler calls a kill cut short: started by a killed replica, never done by it."""
    pids = {p.pid for p in killed}
    calls = Counter((r.event_id, r.pid) for r in reports(out) if r.pid in pids)
    return sum(1 for count in calls.values() if count == 1)


@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.anyio
async def test_no_event_is_lost_while_replicas_are_killed_and_nats_restarts(
    server: NATSServer, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Given three replicas of an app whose handler takes 50 ms and records each event it
    handled, and a publisher sending 5,000 events steadily (200/s) that retries with the same
    ids,
    when a random replica is killed -9 about every second (and a new one started), and the
    nats-server is restarted once half-way (same port and store, down for 3 s),
    then every published event is handled at least once, the consumer ends with nothing
    pending or awaiting an ack, and no event is dead-lettered."""
    config = isolated_config(server.url)
    out = tmp_path / "handled"
    env = worker_env(
        config,
        GDC_NATS_CONNECT_TIMEOUT=str(config.connect_timeout),
        GDC_NATS_RECONNECT_WAIT=str(config.reconnect_wait),
        GDC_NATS_MAX_RECONNECT_ATTEMPTS="-1",
        GDC_NATS_MAX_BYTES="0",
        GDC_TEST_OUT=str(out),
        GDC_TEST_SLEEP=HANDLER_S,
    )
    events = node_ups(EVENTS)
    publisher_config = config.replace(connect_timeout=PUBLISH_CONNECT_TIMEOUT_S)
    async with await NATSEventBus.connect(publisher_config) as bus:
        replicas = Replicas(
            ["run", "tests.apps.recorder:short_ack_wait", "--concurrency", "8"],
            env,
            tmp_path,
            REPLICAS,
        )
        try:
            for replica in replicas.current:
                await replica.ready()
            publisher = Publisher(bus)
            published = anyio.Event()
            restarted: list[float] = []
            began = time.monotonic()

            async def publish() -> None:
                await publisher.run(events)
                published.set()

            async def restart_once() -> None:
                restarted.append(await restart(server, publisher.half_way))

            with anyio.fail_after(PUBLISH_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish)
                    tg.start_soon(restart_once)
                    tg.start_soon(kill_until, replicas, published)

            replicas.replace_exited()
            wanted = set(publisher.published)
            missing = await unhandled(out, wanted, SETTLE_TIMEOUT)
            info = await settled(config, SHORT_ACK_DURABLE, SETTLE_TIMEOUT)
            dead = await DeadLetterQueue(bus).count()
            took = time.monotonic() - began
            calls = ids(out, "done")  # once per call that got to its end
            cut_short = interrupted(out, replicas.killed)
            exits = replicas.exits()
        finally:
            replicas.close()

    duplicate_rate = len(calls) / len(set(calls)) - 1
    figures = {
        "published": len(wanted),
        "handler_calls_done": len(calls),
        "duplicate_rate": f"{duplicate_rate:.2%}",
        "kills": len(replicas.killed),
        "calls_cut_short": cut_short,
        "replicas_started": len(replicas.started),
        "replica_exits": dict(exits),
        "server_restart_s": round(restarted[0], 1),
        "publish_retries": publisher.retries,
        "never_handled": len(missing),
        "consumer_pending": info.num_pending,
        "consumer_ack_pending": info.num_ack_pending,
        "dead_letters": dead,
        "seconds": round(took),
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\nchaos:", ", ".join(f"{name} {value}" for name, value in figures.items()))
    assert wanted == {e.id for e in events}
    assert not missing, f"{len(missing)} of {len(wanted)} events never handled"
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert dead == 0
    assert len(replicas.killed) >= 10, "the chaos barely happened"
    assert cut_short > 0, "no kill landed in the middle of a handler call"
