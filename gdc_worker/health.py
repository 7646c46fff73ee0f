"""The monitoring endpoint, `/metrics`, `/healthz` and `/readyz` on one port, and the probes
behind it, for one worker process or a supervised group of replicas.

- `/healthz`: the event loop answers (in a group: every replica's loop does). A blocked loop is
  what a restart fixes; a lost connection is not (the client reconnects), so it stays healthy.
- `/readyz`: connected, every consumer bound and answered by the server, and not stopping (in a
  group: every replica).

Each answers 200 `ok` or 503 with one line of why. The server runs in a daemon thread, so a
blocked event loop cannot keep it from answering that the loop is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from .errors import ConfigError
from .metrics import ConsumerGauges, Metrics, Snapshot, families, watch_consumers, watch_outbox
from .worker import Worker, serve

if TYPE_CHECKING:
    from .config import NATSConfig

__all__ = [
    "GroupEndpoint",
    "GroupHealth",
    "HealthEndpoint",
    "LoopProbe",
    "serve_monitored",
    "serve_replica",
    "write_heartbeats",
]

log = logging.getLogger(__name__)

#: How often a replica writes its heartbeat; one older than `STALE_S` means a blocked loop.
HEARTBEAT_S = 1.0
STALE_S = 5.0
#: How long `/healthz` waits for the event loop to run a no-op.
LOOP_ANSWER_S = 2.0

#: What the endpoint serves; any other path answers 404.
_PATHS = ("/metrics", "/healthz", "/readyz")

#: Returns None when all is well, else one line of what is not.
Check = Callable[[], str | None]


class HealthEndpoint:
    """`/metrics` (of `registry`), `/healthz` (`alive`) and `/readyz` (`ready`) on `port`.

    With no `host`, on every address, IPv4 and IPv6 alike (IPv4 only where the machine has no
    IPv6), so that probes and scrapes reach it in IPv6-only and dual-stack clusters too.
    """

    def __init__(
        self, port: int, registry: Collector, *, alive: Check, ready: Check, host: str = ""
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._checks = {"/healthz": alive, "/readyz": ready}
        try:
            self._server = self._listen(host, port)
        except OSError as exc:
            raise ConfigError(f"metrics port {port}: cannot listen ({exc.strerror})") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gdc-worker-metrics", daemon=True
        )

    def _listen(self, host: str, port: int) -> WSGIServer:
        if not host:
            try:
                return make_server("::", port, self._app, _DualStackServer, _QuietHandler)
            except OSError:  # no IPv6 here (or the port is taken: IPv4 says so in turn)
                pass
        return make_server(host, port, self._app, _ThreadingServer, _QuietHandler)

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen when asked for 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HealthEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """Route by path: any other path is a 404, so that a probe with a mistyped path fails
        instead of passing on the metrics page; HEAD answers as GET does, without the body."""
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path not in _PATHS:
            return _answer(start_response, "404 Not Found", f"no {path}: try {', '.join(_PATHS)}")
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return _answer(start_response, "405 Method Not Allowed", f"{method}: use GET", allow)
        if path == "/metrics":
            body = self._metrics({**environ, "REQUEST_METHOD": "GET"}, start_response)
        else:
            try:
                problem = self._checks[path]()
            except Exception as exc:  # a probe that fails says so; the endpoint keeps serving
                problem = f"{path} check failed: {exc!r}"
            status = "200 OK" if problem is None else "503 Service Unavailable"
            body = _answer(start_response, status, problem or "ok")
        return [] if method == "HEAD" else body


def _answer(
    start_response: Callable[..., Any],
    status: str,
    text: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """A one-line plain-text answer."""
    body = f"{text}\n".encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        + (headers or []),
    )
    return [body]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _DualStackServer(_ThreadingServer):
    """On `::` with IPV6_V6ONLY off: IPv4 clients arrive as `::ffff:a.b.c.d`."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not worth a log line each."""


class LoopProbe:
    """Whether the event loop that created it still runs callbacks, asked from another thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()

    def __call__(self) -> str | None:
        answered = threading.Event()
        try:
            self._loop.call_soon_threadsafe(answered.set)
        except RuntimeError:
            return "the event loop is closed"
        if answered.wait(LOOP_ANSWER_S):
            return None
        return f"the event loop did not answer within {LOOP_ANSWER_S:g}s (a handler blocks it?)"


async def write_heartbeats(
    directory: Path, state: Callable[[], str], metrics: Callable[[], Snapshot]
) -> None:
    """As a replica: write `state()` ("ready" or why not) and `metrics()` to
    `<directory>/<pid>.json` (an existing directory) every `HEARTBEAT_S`, from the event loop,
    so a fresh file also says the loop runs. Until cancelled; then once more, as `stopped`:
    the file stays, so what this replica counted stays in the group's totals.
    """
    path = directory / f"{os.getpid()}.json"
    scratch = path.with_suffix(".tmp")

    def write(now: str) -> None:
        scratch.write_text(json.dumps({"state": now, "metrics": metrics()}))
        scratch.replace(path)  # atomic: the supervisor never reads half a file

    try:
        while True:
            write(state())
            await anyio.sleep(HEARTBEAT_S)
    finally:
        write("stopped")


def _read(path: Path) -> tuple[float, dict[str, Any]] | None:
    """A heartbeat file's age in seconds and content; None if it is not there (yet)."""
    try:
        age = time.time() - path.stat().st_mtime
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return age, content


class GroupHealth(Collector):
    """The health and metrics of `replicas` replica processes from their heartbeat files in
    `directory`.

    `pids()` lists the replicas running now. One with no heartbeat yet is starting: alive, not
    ready. One whose heartbeat is older than `STALE_S` has a blocked loop: not alive.
    """

    def __init__(self, directory: Path, replicas: int, pids: Callable[[], list[int]]) -> None:
        self.directory = directory
        self.replicas = replicas
        self._pids = pids

    def _states(self) -> dict[int, str | None]:
        """Each running replica's state; None for a stale heartbeat, "starting" for none yet."""
        states: dict[int, str | None] = {}
        for pid in self._pids():
            heartbeat = _read(self.directory / f"{pid}.json")
            if heartbeat is None:
                states[pid] = "starting"
            else:
                age, content = heartbeat
                states[pid] = None if age > STALE_S else str(content["state"])
        return states

    def collect(self) -> Iterator[Metric]:
        """The replicas' metrics: counters of every replica that ran, gauges of the live."""
        live = set(self._pids())
        every, running = [], []
        for path in sorted(self.directory.glob("*.json")):
            heartbeat = _read(path)
            if heartbeat is not None:
                every.append(heartbeat[1]["metrics"])
                if path.stem.isdigit() and int(path.stem) in live:
                    running.append(heartbeat[1]["metrics"])
        return families(every, running)

    def alive(self) -> str | None:
        stale = [pid for pid, state in self._states().items() if state is None]
        if stale:
            return f"replica(s) {', '.join(map(str, stale))}: no heartbeat for {STALE_S:g}s"
        return None

    def ready(self) -> str | None:
        states = self._states()
        if len(states) < self.replicas:
            return f"{len(states)} of {self.replicas} replicas running"
        waiting = {pid: state or "not answering" for pid, state in states.items()}
        waiting = {pid: state for pid, state in waiting.items() if state != "ready"}
        if waiting:
            return "; ".join(f"replica {pid}: {state}" for pid, state in sorted(waiting.items()))
        return None


async def serve_monitored(worker: Worker, metrics: Metrics, port: int) -> None:
    """`serve(worker)` with its endpoint on `port`: `metrics` (registered on the worker) and
    the consumer gauges of its handlers, `/healthz` from its loop, `/readyz` from its state."""
    gauges = ConsumerGauges()
    metrics.registry.register(gauges)
    endpoint = HealthEndpoint(port, metrics.registry, alive=LoopProbe(), ready=worker.not_ready)
    log.info("metrics, /healthz and /readyz on port %d", endpoint.port)
    with endpoint:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_consumers, worker.config, [s.durable for s in worker.specs], gauges)
            tg.start_soon(watch_outbox, worker.outbox_stats, metrics)
            await serve(worker)
            tg.cancel_scope.cancel()


async def serve_replica(
    worker: Worker, metrics: Metrics, directory: Path, supervisor_pid: int | None = None
) -> None:
    """`serve(worker)` as one replica of a group: heartbeats with `metrics` in `directory`,
    for the supervisor's endpoint; it stops when `supervisor_pid` is gone."""
    async with anyio.create_task_group() as tg:
        state = lambda: worker.not_ready() or "ready"  # noqa: E731
        tg.start_soon(write_heartbeats, directory, state, metrics.snapshot)
        tg.start_soon(watch_outbox, worker.outbox_stats, metrics)
        await serve(worker, supervisor_pid=supervisor_pid)
        tg.cancel_scope.cancel()


class GroupEndpoint:
    """The endpoint of a supervised group on `port`: the replicas' metrics summed from their
    heartbeat files in `directory`, one reading of the consumer gauges, and `/healthz`,
    `/readyz` from the heartbeats. Pass `replicas_changed` to `supervise(on_change=...)`.
    """

    def __init__(
        self, port: int, directory: Path, replicas: int, config: NATSConfig, durables: list[str]
    ) -> None:
        self.directory = directory
        self._pids: list[int] = []
        self._health = GroupHealth(directory, replicas, lambda: list(self._pids))
        registry = CollectorRegistry()
        registry.register(self._health)
        gauges = ConsumerGauges()
        registry.register(gauges)
        self._endpoint = HealthEndpoint(
            port, registry, alive=self._health.alive, ready=self._health.ready
        )
        self._poller = _LoopThread(watch_consumers(config, durables, gauges))

    def replicas_changed(self, pids: list[int]) -> None:
        self._pids = pids

    def __enter__(self) -> GroupEndpoint:
        self._endpoint.start()
        self._poller.start()
        log.info("metrics, /healthz and /readyz of the group on port %d", self._endpoint.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._poller.stop()
        self._endpoint.stop()


class _LoopThread(threading.Thread):
    """Runs one coroutine on an event loop of its own until `stop()`."""

    def __init__(self, main: Coroutine[Any, Any, None]) -> None:
        super().__init__(name="gdc-worker-consumer-metrics", daemon=True)
        self._main = main
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._main

    def stop(self) -> None:
        self._started.wait()
        if self._loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended on its own
                self._loop.call_soon_threadsafe(self._task.cancel)
        self.join(timeout=5)
