"""Failover on a real three-node JetStream cluster: a leader killed mid-flow loses nothing.

Each cluster test publishes steadily while a worker consumes, kills a node with SIGKILL once
the flow runs, and checks what a user relies on: every event handled and acked, stored exactly
once, and the publisher never failing (its retries keep the event's `Nats-Msg-Id`). A stream
or consumer whose leader is killed gets a new one after nats-server's Raft election timeout
(4-9 s, `server/raft.go`), so each of these tests waits that long once; what gdc-worker adds
on top is what the measurements bound. The last tests check, on one server, the failures a
publish does not retry.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.to_thread
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, PeerInfo

from gdc_worker import App, Event, NATSConfig, NATSEventBus, PublishError
from gdc_worker.events import event_headers
from gdc_worker.testing import NATSCluster, isolated_config
from tests.recording import Recording
from tests.support import (
    GRACE,
    Call,
    Calls,
    consumer_info,
    eventually,
    node_up,
    running,
    worker_for,
)

pytestmark = pytest.mark.anyio

#: Events handled before the kill, so that it lands in the middle of the flow.
BEFORE_KILL = 150
#: Events published once deliveries resumed, so that the flow is seen to go on.
AFTER_RESUME = 100
#: Publishes per second, one at a time.
PUBLISH_RATE = 150.0
#: A killed leader is replaced within nats-server's election timeout (9 s at most), plus
#: room for a second round and a loaded machine.
FAILOVER_TIMEOUT = 25.0
#: Each publish may retry this long: one election, plus a try lost with the dying leader.
CONNECT_TIMEOUT = 15.0
#: An ack lost with a dying consumer leader means a redelivery after this; short, so the
#: test sees it.
ACK_WAIT = 3.0
#: Deliveries resume this soon after the consumer has a new leader. Measured: -0.5 to +0.7 s
#: after the test saw the new leader (it polls, so it sees the leader up to ~0.5 s late), as
#: the pull consumer asks again every 0.5 s while no leader takes its requests; it was 4-10 s
#: when the server did not tell the worker of the new leader and only a 10 s silence check
#: re-issued the pull requests.
RESUME_BOUND_S = 3.0
DURABLE = "failover-handle"
#: A worker's JetStream requests wait this long while the cluster has no quorum: the setup
#: asks for three of them, time for two nodes to come back and elect a leader.
QUORUM_ASK_TIMEOUT = 8.0


@dataclass(frozen=True)
class Published:
    """One event stored by `publish_event`: when the call started, and how long it took."""

    event: Event
    started: float
    took: float


@dataclass
class Failover:
    """What happened around one kill."""

    published: Recording[Published] = field(default_factory=lambda: Recording(lambda p: p.event))
    errors: list[PublishError] = field(default_factory=list)
    calls: Calls = field(default_factory=Calls)
    killed_at: float = 0.0
    new_leader_at: float = 0.0
    resumed_at: float = 0.0
    consumer: ConsumerInfo | None = None
    stored: int = 0

    def report(self) -> str:
        longest = max(p.took for p in self.published.items)
        return (
            f"new leader {self.new_leader_at - self.killed_at:.2f}s after the kill, deliveries "
            f"resumed {self.resumed_at - self.killed_at:.2f}s after it "
            f"({self.resumed_at - self.new_leader_at:+.2f}s after the new leader); "
            f"{len(self.published.items)} published, longest publish {longest:.2f}s, "
            f"{len(self.errors)} PublishError(s), {len(self.calls.items)} calls"
        )


def cluster_config(url: str) -> NATSConfig:
    """The test's own streams, on three replicas, reached through `url`."""
    return isolated_config(url).replace(replicas=3, connect_timeout=CONNECT_TIMEOUT)


async def publish_steadily(bus: NATSEventBus, flow: Failover, stop: anyio.Event) -> None:
    """Publish events one at a time at `PUBLISH_RATE` until `stop` is set."""
    n = 0
    due = time.monotonic()
    while not stop.is_set():
        n += 1
        event = node_up(f"node-{n}")
        started = time.monotonic()
        try:
            await bus.publish_event(event)
        except PublishError as exc:
            flow.errors.append(exc)
        else:
            flow.published.note(Published(event, started, time.monotonic() - started))
        due = max(due + 1 / PUBLISH_RATE, time.monotonic())  # no burst after a stall
        await anyio.sleep(max(0.0, due - time.monotonic()))


def first_call_published_after(flow: Failover, moment: float) -> Call | None:
    """The first handler call of an event whose publish started after `moment`."""
    after = {p.event.id for p in flow.published.items if p.started > moment}
    return next((c for c in flow.calls.items if c.event.id in after), None)


@asynccontextmanager
async def flowing(
    cluster: NATSCluster, config: NATSConfig, *, stream_on: int, consumer_on: int
) -> AsyncIterator[Failover]:
    """A worker consuming and a publisher publishing on `config` until the block ends, with
    the stream led by node `stream_on` and its consumer by `consumer_on`; then wait until
    every event is handled and acked, and note what the stream and consumer hold."""
    flow = Failover()
    app = App("failover", config)

    @app.on("node.up", retry=None, ack_wait=ACK_WAIT)
    async def handle(event: Event) -> None:
        flow.calls.record(event)

    stop = anyio.Event()
    async with await NATSEventBus.connect(config) as bus, running(worker_for(app, config, GRACE)):
        await cluster.move_stream_leader(config.stream_name, stream_on)
        await cluster.move_consumer_leader(config.stream_name, DURABLE, consumer_on)
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_steadily, bus, flow, stop)
            try:
                yield flow
            finally:
                stop.set()
        nc = await nats.connect([url for i, url in enumerate(cluster.urls) if cluster.running(i)])
        try:
            js = nc.jetstream(timeout=5.0)
            flow.consumer = await consumer_info(
                js, config.stream_name, DURABLE, timeout=FAILOVER_TIMEOUT
            )
            flow.stored = (await js.stream_info(config.stream_name)).state.messages
        finally:
            await nc.close()


async def kill_mid_flow(
    cluster: NATSCluster,
    flow: Failover,
    victim: int,
    new_leader: Literal["stream", "consumer"],
    config: NATSConfig,
) -> None:
    """Kill `victim` once the flow runs; note when the stream or consumer (`new_leader`) has a
    new leader and when events published after the kill are handled, then publish some more."""
    await flow.calls.wait_for(BEFORE_KILL)
    flow.killed_at = time.monotonic()
    cluster.kill(victim)
    if new_leader == "stream":
        await cluster.leader_of_stream(
            config.stream_name, other_than=victim, timeout=FAILOVER_TIMEOUT
        )
    else:
        await cluster.leader_of_consumer(
            config.stream_name, DURABLE, other_than=victim, timeout=FAILOVER_TIMEOUT
        )
    flow.new_leader_at = time.monotonic()
    await flow.calls.wait_until(
        lambda _: first_call_published_after(flow, flow.killed_at) is not None, FAILOVER_TIMEOUT
    )
    first = first_call_published_after(flow, flow.killed_at)
    assert first is not None
    flow.resumed_at = first.at
    resumed = len(flow.published.items)
    await flow.published.wait_for(resumed + AFTER_RESUME)


async def replica_once_caught_up(cluster: NATSCluster, stream: str, name: str) -> PeerInfo:
    """The stream's replica on node `name` as its leader reports it, once it is current with
    no lag (or the last report after `FAILOVER_TIMEOUT`, for the caller to assert on)."""
    replica: PeerInfo | None = None
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream(timeout=5.0)
        with anyio.move_on_after(FAILOVER_TIMEOUT):
            while replica is None or not replica.current or replica.lag:
                await anyio.sleep(0.05)
                info = (await js.stream_info(stream)).cluster
                replicas = info.replicas if info is not None else None
                replica = next((r for r in replicas or [] if r.name == name), None)
    finally:
        await nc.close()
    assert replica is not None, f"{name} is no replica of {stream}"
    return replica


def assert_nothing_lost(flow: Failover) -> None:
    """Every event handled at least once and acked; the stream holds each exactly once."""
    published = {p.event.id for p in flow.published.items}
    assert flow.errors == []
    assert flow.consumer is not None
    assert (flow.consumer.num_pending, flow.consumer.num_ack_pending) == (0, 0)
    assert published - set(flow.calls.ids) == set()
    assert flow.stored == len(flow.published.items)


async def test_killing_the_stream_leader_mid_flow_loses_and_duplicates_nothing(
    nats_cluster: NATSCluster,
) -> None:
    """Given a stream on three replicas led by n2, its consumer led by n1, a worker and a
    publisher configured with all three nodes' URLs (each connected to any of them),
    when n2 is killed with SIGKILL while events are published and handled,
    then the publisher never raises (it retries while a new leader is elected), every event
    is handled and acked, and the stream holds each event exactly once; and n2, restarted on
    its ports and store, catches up with the stream."""
    config = cluster_config(nats_cluster.url)
    async with flowing(nats_cluster, config, stream_on=2, consumer_on=1) as flow:
        await kill_mid_flow(nats_cluster, flow, 2, "stream", config)
    await anyio.to_thread.run_sync(nats_cluster.restart, 2)
    replica = await replica_once_caught_up(nats_cluster, config.stream_name, "n2")

    print(f"stream leader killed: {flow.report()}")
    assert_nothing_lost(flow)
    assert (replica.current, replica.lag or 0, bool(replica.offline)) == (True, 0, False)


async def test_killing_the_consumer_leader_mid_flow_resumes_deliveries_soon(
    nats_cluster: NATSCluster,
) -> None:
    """Given a stream on three replicas led by n1, its consumer led by n2, a worker and a
    publisher connected to n0,
    when n2 is killed with SIGKILL while events are published and handled,
    then deliveries resume within RESUME_BOUND_S of the consumer's new leader being elected
    (the worker asks again for the pull requests that died with the old one), and nothing is
    lost or stored twice."""
    config = cluster_config(nats_cluster.urls[0])
    async with flowing(nats_cluster, config, stream_on=1, consumer_on=2) as flow:
        await kill_mid_flow(nats_cluster, flow, 2, "consumer", config)

    print(f"consumer leader killed: {flow.report()}")
    assert flow.resumed_at - flow.new_leader_at <= RESUME_BOUND_S, flow.report()
    assert_nothing_lost(flow)


async def test_killing_the_only_configured_node_fails_over_to_the_others(
    nats_cluster: NATSCluster,
) -> None:
    """Given a worker and a publisher configured with n0's URL only, and n0 leading both the
    stream and its consumer,
    when n0 is killed with SIGKILL while events are published and handled,
    then both reconnect to the nodes the cluster advertised, the publisher never raises,
    every event is handled and acked, and the stream holds each event exactly once."""
    config = cluster_config(nats_cluster.urls[0])
    async with flowing(nats_cluster, config, stream_on=0, consumer_on=0) as flow:
        await kill_mid_flow(nats_cluster, flow, 0, "consumer", config)

    print(f"configured node killed: {flow.report()}")
    assert_nothing_lost(flow)


async def test_a_worker_started_while_the_cluster_has_no_quorum_binds_once_it_has(
    nats_cluster: NATSCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a cluster with two of its three nodes killed, so that JetStream cannot answer,
    when a worker starts on the third and, once its first setup request has timed out, the
    two come back,
    then the worker asks again (one warning says why) and binds its stream, on three
    replicas, and its consumer once the cluster answers; an event published then is handled.
    Before, the first timeout ended the worker, as a lost answer to a create did."""
    nats_cluster.kill(1)
    nats_cluster.kill(2)
    config = cluster_config(nats_cluster.urls[0]).replace(connect_timeout=QUORUM_ASK_TIMEOUT)
    calls = Calls()
    app = App("quorum", config)
    app.on("node.up", retry=None)(calls.record)

    async def restart(i: int) -> None:
        await anyio.to_thread.run_sync(nats_cluster.restart, i)

    async def restart_once_asked_again() -> None:
        await eventually(
            lambda: "asking again" in caplog.text, "the setup asked again", 2 * QUORUM_ASK_TIMEOUT
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(restart, 1)
            tg.start_soon(restart, 2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart_once_asked_again)
        worker = worker_for(app, config, GRACE)
        async with running(worker), await NATSEventBus.connect(config, setup_stream=False) as bus:
            event = node_up()
            await bus.publish_event(event)
            await calls.wait_for_event(event)
    nc = await nats.connect(nats_cluster.urls)
    try:
        replicas = (await nc.jetstream().stream_info(config.stream_name)).config.num_replicas
    finally:
        await nc.close()

    asked_again = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    assert len(asked_again) == 1
    assert "setting up stream" in asked_again[0]
    assert replicas == 3


# -- what a publish does not retry (one server) -------------------------------------------------


async def test_a_publish_jetstream_refuses_fails_at_once_without_retrying(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a bus whose publishes may retry for its connect timeout (5 s),
    when a message is published with an expected stream that is not the subject's,
    then PublishError names JetStream's refusal well within that timeout, and nothing is
    stored."""
    event = node_up()
    headers = {**event_headers(event), "Nats-Expected-Stream": "NOT_THIS_ONE"}
    started = time.monotonic()

    with pytest.raises(PublishError, match="expected stream does not match"):
        await event_bus.publish_raw(
            nats_config.subject_for(event.type), event.to_json(), headers, what="the event"
        )

    assert time.monotonic() - started < nats_config.connect_timeout / 2
    assert (await jetstream.stream_info(nats_config.stream_name)).state.messages == 0


async def test_a_publish_no_stream_captures_fails_at_once_without_retrying(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a bus whose stream was deleted behind its back,
    when an event is published,
    then PublishError says that no stream captures the subject, well within the connect
    timeout the publish may otherwise retry for."""
    await jetstream.delete_stream(nats_config.stream_name)
    started = time.monotonic()

    with pytest.raises(PublishError, match="no stream captures the subject"):
        await event_bus.publish_event(node_up())

    assert time.monotonic() - started < nats_config.connect_timeout / 2
