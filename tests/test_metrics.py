"""Metrics, health and JSON logs, scraped from real workers on a real server.

`gdc-worker run --metrics-port` runs as a subprocess (one process, or `--processes 2` with
one endpoint for the group) with `tests.apps.metered`, whose outcome follows the event's
subject. The probes and the consumer gauges are also checked in-process, where the worker's
state can be held still.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gdc_worker import App, Breaker, Event, NATSConfig, NATSEventBus, NATSServer, Worker
from gdc_worker.health import HealthEndpoint, LoopProbe
from gdc_worker.logs import JSONFormatter
from gdc_worker.metrics import ConsumerGauges, Metrics, watch_consumers, watch_outbox
from gdc_worker.outbox import Outbox
from gdc_worker.testing import isolated_config
from tests.processes import Spawn, worker_env
from tests.support import GRACE, alive, eventually, free_port, node_up, running

pytestmark = pytest.mark.anyio

DURABLE = "metered-judge"
HANDLER = {"app": "metered", "handler": "judge"}
#: Generous: the consumer gauges are read every 5 s, and CI machines are busy.
SCRAPE_TIMEOUT = 30.0


def get(port: int, path: str, method: str = "GET", host: str = "127.0.0.1") -> tuple[int, str]:
    """The status and body of GET (or `method`) http://host:port/path (no exception for a
    503)."""
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), -1.0)


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = await anyio.to_thread.run_sync(get, port, "/metrics")
    assert status == 200, body
    return samples(body)


async def test_a_call_in_flight_is_counted_until_it_returns(
    spawn: Spawn, nats_config: NATSConfig, event_bus: NATSEventBus, tmp_path: Path
) -> None:
    """Given `gdc-worker run --metrics-port` on the metered app,
    when a handler call runs until the test lets it return,
    then /metrics shows 1 handler call in flight while it runs, and 0 once it returned."""
    port = free_port()
    worker = spawn(
        "run", "tests.apps.metered:app", "--metrics-port", str(port), env=worker_env(nats_config)
    )
    await worker.ready()
    gate = tmp_path / "return-now"
    await event_bus.publish_event(Event.new("node.up", "test", "slow", {"until": str(gate)}))

    async def in_flight(count: float) -> bool:
        return value(await scrape(port), "gdc_worker_handlers_in_flight", **HANDLER) == count

    await eventually(lambda: in_flight(1.0), "the slow call in flight", SCRAPE_TIMEOUT)
    gate.touch()
    await eventually(lambda: in_flight(0.0), "the slow call returned", SCRAPE_TIMEOUT)


def outcomes_event_list() -> list[Event]:
    """3 ok, 1 flaky, 1 bad, 1 broken: see `tests.apps.metered`."""
    return [node_up(s) for s in ("ok", "ok", "ok", "flaky", "bad", "broken")]


#: What those events come to, per metric (see `tests.apps.metered`).
EXPECTED = {
    ("gdc_worker_deliveries_total", "acked"): 4.0,  # 3 ok, flaky
    ("gdc_worker_deliveries_total", "nakd"): 1.0,  # broken, delivery 1
    ("gdc_worker_deliveries_total", "dead_lettered"): 2.0,  # bad, broken on delivery 2
}


async def test_metrics_count_what_happened_and_lag_falls_to_0(
    spawn: Spawn, nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given `gdc-worker run --metrics-port` on the metered app,
    when 3 good events, a flaky one, a rejected one and a broken one are handled,
    then /metrics counts 4 acked, 1 nak'd and 2 dead-lettered deliveries, 3 retries (flaky
    once, broken once per delivery), 1 redelivery, 10 handler calls in the duration histogram,
    3 stored publishes from the handler, the connection up, and the consumer's lag, ack
    pending and oldest unacked age back at 0."""
    port = free_port()
    worker = spawn(
        "run", "tests.apps.metered:app", "--metrics-port", str(port), env=worker_env(nats_config)
    )
    await worker.ready()
    for event in outcomes_event_list():
        await event_bus.publish_event(event)

    async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        scraped = await scrape(port)
        done = all(
            value(scraped, name, **HANDLER, consumer=DURABLE, outcome=outcome) == count
            for (name, outcome), count in EXPECTED.items()
        )
        pending = value(scraped, "gdc_worker_consumer_pending", consumer=DURABLE)
        acks = value(scraped, "gdc_worker_consumer_ack_pending", consumer=DURABLE)
        return scraped if done and (pending, acks) == (0.0, 0.0) else None

    scraped = await eventually(counted, "the deliveries counted, lag 0", SCRAPE_TIMEOUT)

    assert value(scraped, "gdc_worker_handler_retries_total", **HANDLER) == 3.0
    assert value(scraped, "gdc_worker_redeliveries_total", **HANDLER) == 1.0
    assert value(scraped, "gdc_worker_handler_duration_seconds_count", **HANDLER) == 10.0
    assert value(scraped, "gdc_worker_handlers_in_flight", **HANDLER) == 0.0
    assert value(scraped, "gdc_worker_publishes_total", app="metered", result="stored") == 3.0
    assert value(scraped, "gdc_worker_publishes_total", app="metered", result="failed") == 0.0
    assert value(scraped, "gdc_worker_publish_duration_seconds_count", app="metered") == 3.0
    assert value(scraped, "gdc_worker_connected", app="metered") == 1.0
    assert value(scraped, "gdc_worker_consumer_oldest_unacked_age_seconds", consumer=DURABLE) == 0
    assert await anyio.to_thread.run_sync(get, port, "/readyz") == (200, "ok\n")
    assert await anyio.to_thread.run_sync(get, port, "/healthz") == (200, "ok\n")
    worker.send(signal.SIGTERM)
    assert await worker.exit_code() == 0, worker.stderr


async def test_consumer_gauges_show_a_backlog_and_its_age_then_0(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a consumer bound with nothing consuming it, and the gauges read every 0.1 s,
    when 5 events are published, then consumed by a worker,
    then the gauges first show 5 pending and an oldest-unacked age above 0, then 0 and 0."""
    app = App("svc", nats_config)
    handled: list[str] = []

    @app.on("node.up")
    async def handle(event: Event) -> None:
        handled.append(event.id)

    await event_bus.ensure_consumer("svc-handle", nats_config.subject_for("node.up"))
    for n in range(5):
        await event_bus.publish_event(node_up(f"node-{n}"))
    gauges = ConsumerGauges()
    registry = CollectorRegistry()
    registry.register(gauges)

    def reading(name: str) -> float | None:
        return registry.get_sample_value(f"gdc_worker_consumer_{name}", {"consumer": "svc-handle"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_consumers, nats_config, ["svc-handle"], gauges, 0.1)
        await eventually(lambda: reading("pending") == 5, "5 pending")
        assert (reading("oldest_unacked_age_seconds") or 0) > 0
        async with running(Worker(app, config=nats_config, grace=GRACE)):
            await eventually(lambda: len(handled) == 5, "5 handled")
            await eventually(
                lambda: (reading("pending"), reading("ack_pending")) == (0, 0), "lag 0"
            )
        assert reading("oldest_unacked_age_seconds") == 0
        tg.cancel_scope.cancel()


async def test_consumer_gauges_are_not_reported_while_they_cannot_be_read(
    tmp_path: Path,
) -> None:
    """Given the gauges of a bound consumer read every 0.1 s,
    when nats-server stops, then starts again on its port,
    then the gauges disappear while no reading can be made (a frozen lag of 0 would hide an
    outage from a lag alert), and come back once one can."""
    server = NATSServer(port=free_port(), store_dir=tmp_path / "jetstream").start()
    nats_config = isolated_config(server.url)
    async with await NATSEventBus.connect(nats_config) as bus:
        await bus.ensure_consumer("svc-handle", nats_config.subject_for("node.up"))
    gauges = ConsumerGauges()
    registry = CollectorRegistry()
    registry.register(gauges)

    def pending() -> float | None:
        return registry.get_sample_value("gdc_worker_consumer_pending", {"consumer": "svc-handle"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_consumers, nats_config, ["svc-handle"], gauges, 0.1)
        try:
            await eventually(lambda: pending() == 0, "the consumer's gauges read")
            server.stop()
            await eventually(lambda: pending() is None, "the gauges gone with the server")
            server.start()
            await eventually(lambda: pending() == 0, "the gauges read again", SCRAPE_TIMEOUT)
        finally:
            tg.cancel_scope.cancel()
            server.stop()


async def test_readyz_waits_for_the_consumers_and_fails_while_stopping(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a worker's endpoint started before the worker, and a handler that holds its event,
    when the worker starts, then stops with the handler still running,
    then /readyz says 503 before the worker runs, 200 once it is bound, and 503 `stopping`
    as soon as it stops; /healthz says 200 all along (its loop answers)."""
    endpoint_port = free_port()
    app = App("svc", nats_config)
    release = anyio.Event()
    started = anyio.Event()

    @app.on("node.up")
    async def hold(event: Event) -> None:
        started.set()
        await release.wait()

    worker = Worker(app, config=nats_config, grace=GRACE)
    endpoint = HealthEndpoint(
        endpoint_port, CollectorRegistry(), alive=LoopProbe(), ready=worker.not_ready
    )
    probe = await anyio.to_thread.run_sync(get, endpoint_port, "/readyz")  # not listening yet
    assert probe[0] == 0
    with endpoint:
        status, body = await anyio.to_thread.run_sync(get, endpoint_port, "/readyz")
        assert (status, body) == (503, "connecting to NATS\n")
        async with running(worker):
            assert await anyio.to_thread.run_sync(get, endpoint_port, "/readyz") == (200, "ok\n")
            await event_bus.publish_event(node_up())
            await started.wait()
            worker.stop()
            stopping = await anyio.to_thread.run_sync(get, endpoint_port, "/readyz")
            healthy = await anyio.to_thread.run_sync(get, endpoint_port, "/healthz")
            release.set()
    assert stopping == (503, "stopping\n")
    assert healthy == (200, "ok\n")


async def test_healthz_fails_while_the_event_loop_is_blocked() -> None:
    """Given an endpoint whose /healthz asks this event loop,
    when the loop is blocked for 3 s while /healthz is asked,
    then it answers 503 naming the loop; once unblocked, 200."""
    endpoint_port = free_port()
    answers: list[tuple[int, str]] = []
    with HealthEndpoint(endpoint_port, CollectorRegistry(), alive=LoopProbe(), ready=lambda: None):
        asked = threading.Thread(target=lambda: answers.append(get(endpoint_port, "/healthz")))
        asked.start()
        time.sleep(3)  # noqa: ASYNC251 - blocking the loop is the point
        await anyio.to_thread.run_sync(asked.join)
        after = await anyio.to_thread.run_sync(get, endpoint_port, "/healthz")
    [(status, body)] = answers
    assert status == 503
    assert "event loop did not answer" in body
    assert after == (200, "ok\n")


def test_the_endpoint_answers_on_ipv4_and_ipv6() -> None:
    """Given an endpoint on a port and no host, as `--metrics-port` starts it,
    when probes ask /readyz over IPv4 loopback and over IPv6 loopback (as in an IPv6-only
    cluster),
    then both get the answer."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    port = free_port()
    with HealthEndpoint(port, CollectorRegistry(), alive=lambda: None, ready=lambda: None):
        answers = [get(port, "/readyz", host=host) for host in ("127.0.0.1", "[::1]")]

    assert answers == [(200, "ok\n"), (200, "ok\n")]


def test_the_endpoint_answers_404_for_a_path_it_does_not_serve() -> None:
    """Given an endpoint whose /readyz is not ready,
    when a probe asks a mistyped path (`/ready`, `/readyz/`, `/`), POSTs to /readyz, or asks
    HEAD /healthz and HEAD /metrics,
    then the mistyped paths answer 404 naming the three it serves (not 200 with the metrics,
    which would pass the probe), the POST 405, and the HEADs 200 with no body."""
    port = free_port()
    with HealthEndpoint(port, CollectorRegistry(), alive=lambda: None, ready=lambda: "stopping"):
        mistyped = [get(port, path) for path in ("/ready", "/readyz/", "/")]
        posted = get(port, "/readyz", "POST")
        heads = [get(port, path, "HEAD") for path in ("/healthz", "/metrics")]
        ready = get(port, "/readyz")

    assert [status for status, _ in mistyped] == [404, 404, 404]
    assert mistyped[0][1] == "no /ready: try /metrics, /healthz, /readyz\n"
    assert posted[0] == 405
    assert heads == [(200, ""), (200, "")]
    assert ready == (503, "stopping\n")


async def test_processes_2_serve_one_endpoint_summing_the_replicas(
    spawn: Spawn, nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given `gdc-worker run --processes 2 --metrics-port P`,
    when 40 good events are handled and then one replica is killed with SIGKILL,
    then the supervisor's /metrics counts 40 acked deliveries in one series (the replicas
    summed), one value per consumer gauge, /readyz is 200 with both replicas ready, and after
    the kill the count stays 40 and /readyz is 200 again once the replacement is ready."""
    port = free_port()
    supervisor = spawn(
        "run",
        "tests.apps.metered:app",
        "--processes",
        "2",
        "--metrics-port",
        str(port),
        env=worker_env(nats_config),
    )
    replicas = await supervisor.ready(2)
    for n in range(40):
        await event_bus.publish_event(node_up("ok" if n % 2 else "flaky"))
    acked = {**HANDLER, "consumer": DURABLE, "outcome": "acked"}

    async def all_counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        scraped = await scrape(port)
        lag = value(scraped, "gdc_worker_consumer_pending", consumer=DURABLE)
        done = value(scraped, "gdc_worker_deliveries_total", **acked) == 40 and lag == 0
        return scraped if done else None

    scraped = await eventually(all_counted, "40 acked in one series", SCRAPE_TIMEOUT)
    series = [key for key in scraped if key[0] == "gdc_worker_consumer_ack_pending"]
    assert series == [("gdc_worker_consumer_ack_pending", frozenset({("consumer", DURABLE)}))]
    assert not any("pid" in dict(labels) for _, labels in scraped)
    await eventually(
        lambda: get(port, "/readyz") == (200, "ok\n"), "both replicas ready", SCRAPE_TIMEOUT
    )

    os.kill(replicas[0], signal.SIGKILL)
    await supervisor.ready(3)
    assert not alive(replicas[0])
    await eventually(
        lambda: get(port, "/readyz") == (200, "ok\n"), "the replacement ready", SCRAPE_TIMEOUT
    )
    after = await scrape(port)
    assert value(after, "gdc_worker_deliveries_total", **acked) == 40
    supervisor.send(signal.SIGTERM)
    assert await supervisor.exit_code() == 0, supervisor.stderr


async def test_json_logs_carry_the_delivery_keys(
    spawn: Spawn, nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given `gdc-worker run --log-format json`,
    when a broken event is nak'd then dead-lettered,
    then every stderr line is one JSON object, and the lines about the event carry its
    event_id, trace_id, handler, consumer, deliveries and outcome."""
    worker = spawn(
        "run", "tests.apps.metered:app", "--log-format", "json", env=worker_env(nats_config)
    )

    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in Path(worker.stderr_path).read_text().splitlines()]

    await eventually(
        lambda: any(str(line["message"]).startswith("worker ready") for line in lines()),
        "worker ready",
    )
    event = node_up("broken", trace_id="trace-42")
    await event_bus.publish_event(event)
    about = await eventually(
        lambda: [line for line in lines() if line.get("event_id") == event.id and line["outcome"]][
            1:
        ],
        "the nak and the dead letter logged",
    )
    worker.send(signal.SIGTERM)
    assert await worker.exit_code() == 0
    outcomes = [line["outcome"] for line in lines() if line.get("event_id") == event.id]
    assert outcomes == ["nakd", "dead_lettered"]
    for line in about:
        assert line["trace_id"] == "trace-42"
        assert (line["handler"], line["consumer"]) == ("judge", DURABLE)
    assert [line["deliveries"] for line in lines() if line.get("event_id") == event.id] == [1, 2]


def json_lines(stderr: str) -> list[dict[str, object]]:
    """Each stderr line as the JSON object it must be."""
    return [json.loads(line) for line in stderr.splitlines()]


def test_json_logs_report_a_known_error_as_a_json_line() -> None:
    """Given `gdc-worker run --log-format json` with no NATS at its URL, or an app that cannot
    be imported,
    when it fails,
    then it exits 4 or 3, and its error is a JSON line (level ERROR), not `Error: ...`."""
    url = f"nats://127.0.0.1:{free_port()}"
    for args, code, named in [
        (["tests.apps.metered:app", "--url", url], 4, url),
        (["tests.apps.no_such_module:app"], 3, "tests.apps.no_such_module"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "gdc_worker", "run", *args, "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert result.returncode == code, result.stderr
        last = json_lines(result.stderr)[-1]
        assert (last["level"], last["logger"]) == ("ERROR", "gdc_worker.cli")
        assert named in str(last["message"])


@pytest.mark.parametrize("where", ["main", "thread"])
def test_json_logs_report_an_uncaught_exception_as_one_json_line(where: str) -> None:
    """Given the JSON log format, as `run --log-format json` sets it up,
    when an exception nobody catches ends the program or a thread (a defect),
    then stderr is one JSON line at CRITICAL naming it, with the traceback in `exc_info`."""
    raising = "raise RuntimeError('boom')"
    body = (
        raising
        if where == "main"
        else f"""
import threading
def fail():
    {raising}
t = threading.Thread(target=fail, name="failing")
t.start()
t.join()
"""
    )
    program = "from gdc_worker.cli.common import configure_logging\n"
    program += "configure_logging('INFO', 'json')\n" + body
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )

    [line] = json_lines(result.stderr)
    assert result.returncode == (1 if where == "main" else 0)
    assert line["level"] == "CRITICAL"
    assert "RuntimeError: boom" in str(line["message"])
    assert "Traceback" in str(line["exc_info"])
    if where == "thread":
        assert "thread failing" in str(line["message"])


def test_json_logs_stay_one_object_per_line_whatever_is_logged() -> None:
    """Given the JSON log format,
    when a library logs a message whose arguments do not fit it, a message with newlines and
    non-ASCII text, an exception whose message cannot be shown, and a line with its stack,
    then each is one JSON object on one line (no `--- Logging error ---` block), keeping the
    message, the arguments, the traceback and the stack."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger("tests.json-lines")
    log.addHandler(handler)
    log.propagate = False

    class Unshowable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    try:
        log.warning("%d events left", "many")
        log.warning("two\nlines, caf\u00e9 \u2603")
        try:
            raise Unshowable
        except Unshowable:
            log.exception("failed")
        log.warning("here", stack_info=True)
    finally:
        log.removeHandler(handler)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 4
    assert lines[0]["message"] == "%d events left ('many',)"
    assert "TypeError" in lines[0]["log_error"]
    assert lines[1]["message"] == "two\nlines, caf\u00e9 \u2603"
    assert "Unshowable" in lines[2]["exc_info"]
    assert "test_json_logs_stay_one_object_per_line" in lines[3]["stack_info"]


def test_breaker_changes_are_a_state_gauge_and_a_transitions_counter() -> None:
    """Given the metrics hook and a handler with a breaker,
    when the breaker opens, half-opens and closes,
    then the state gauge follows (2, 1, 0) and each state entered is counted once."""
    app = App("svc")

    @app.on("node.up", breaker=Breaker(failures=3))
    async def fragile(event: Event) -> None:
        pass

    spec = app.handlers["fragile"]
    metrics = Metrics("svc")
    metrics.worker_ready("svc", [spec])
    labels = {"app": "svc", "handler": "fragile"}

    def state() -> float | None:
        return metrics.registry.get_sample_value("gdc_worker_breaker_state", labels)

    assert state() == 0
    seen = []
    for entered in ("open", "half_open", "closed"):
        metrics.breaker_changed(spec, entered)
        seen.append(state())
    assert seen == [2, 1, 0]
    for entered in ("open", "half_open", "closed"):
        count = metrics.registry.get_sample_value(
            "gdc_worker_breaker_transitions_total", {**labels, "state": entered}
        )
        assert count == 1


async def test_outbox_gauges_follow_what_the_outbox_holds(tmp_path: Path) -> None:
    """Given the metrics hook watching an outbox file,
    when three events are queued in it, then the outbox is emptied,
    then the gauges show 3 events, their bytes and an age, then 0, 0 and 0."""
    metrics = Metrics("svc")
    labels = {"app": "svc"}

    def reading(name: str) -> float | None:
        return metrics.registry.get_sample_value(f"gdc_worker_outbox_{name}", labels)

    async with await Outbox.open(tmp_path / "outbox.db") as outbox, anyio.create_task_group() as tg:
        tg.start_soon(watch_outbox, outbox.stats, metrics, 0.01)
        for n in range(3):
            await outbox.add("gdc.events.node.up", b"{}", {"Nats-Msg-Id": f"id-{n}"}, "event")
        await eventually(lambda: reading("events") == 3, "3 events in the gauge")
        assert (reading("bytes") or 0) > 0
        assert (reading("oldest_age_seconds") or -1) >= 0
        await outbox.remove([row.id for row in await outbox.head(10)])
        await eventually(lambda: reading("events") == 0, "the outbox emptied")
        assert (reading("bytes"), reading("oldest_age_seconds")) == (0, 0)
        tg.cancel_scope.cancel()


def test_reconnects_count_a_connect_only_after_a_drop() -> None:
    """Given the metrics hook of a bus that started while NATS was down,
    when it connects, drops, and connects again,
    then one reconnect is counted, and the connected gauge follows each change."""
    metrics = Metrics("svc")

    def reading(name: str) -> float | None:
        return metrics.registry.get_sample_value(f"gdc_worker_{name}", {"app": "svc"})

    seen = []
    for connected in (True, False, True):
        metrics.connection_changed(connected)
        seen.append(reading("connected"))

    assert seen == [1, 0, 1]
    assert reading("reconnects_total") == 1
