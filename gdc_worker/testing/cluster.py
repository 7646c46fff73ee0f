"""A real cluster of `nats-server -js` nodes on loopback, routed to each other, for failover tests.

`NATSCluster` starts the nodes (three by default), each with its own server name, ports and
store, and returns once they have a JetStream meta leader. A test can then `kill(i)` a node
(SIGKILL, as a crash would), `restart(i)` it on the same ports and store, and ask which node
leads a stream or a consumer (`leader_of_stream`, `leader_of_consumer`, through the JetStream
API) or move that leadership on purpose (`move_stream_leader`, `move_consumer_leader`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

from ..bus import NATSEventBus
from ..config import NATSConfig
from ..errors import ConnectionFailed, EventBusError, NATSServerError
from ..server import find_nats_server

__all__ = ["FORM_TIMEOUT_S", "LEADER_TIMEOUT_S", "NATSCluster", "free_ports"]

#: How long `start()` waits for every node to be up and to agree on a JetStream meta leader.
FORM_TIMEOUT_S = 30.0
#: How long the leader helpers wait for a stream or consumer to have the leader asked for.
LEADER_TIMEOUT_S = 20.0
_POLL_S = 0.05
#: A leader helper's request; short, so that polling during an election sees the new leader soon.
_API_TIMEOUT_S = 2.0
_READY = "Server is ready"
_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that nothing listens on right now (each bound to port 0 once)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)  # held until all are picked, so no port comes twice
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class _Node:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    store_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


class NATSCluster:
    """`size` nats-server nodes with JetStream, routed to each other, on free loopback ports.

    Nodes are named `n0`, `n1`, ...; `urls[i]` is node i's client URL. Use it as a context
    manager, or `start()` and `stop()`. `kill` and `restart` are for the test's own failures;
    the leader helpers are coroutines, since a test asks them while its workers run.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        name: str = "gdc-test",
        binary: str | None = None,
        form_timeout: float = FORM_TIMEOUT_S,
    ) -> None:
        if size < 1:
            raise ValueError(f"size: must be at least 1, got {size}")
        self.size = size
        self.host = host
        self.name = name
        self.form_timeout = form_timeout
        self._binary = binary
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._nodes: list[_Node] = []

    @property
    def urls(self) -> list[str]:
        """The client URL of each node, in node order."""
        return [f"nats://{self.host}:{node.client_port}" for node in self._started_nodes()]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated, as `NATSConfig.url` takes them."""
        return ",".join(self.urls)

    @property
    def server_names(self) -> list[str]:
        """Each node's server name (what JetStream reports as a leader), in node order."""
        return [node.name for node in self._started_nodes()]

    def running(self, i: int) -> bool:
        """Whether node `i`'s process is alive."""
        process = self._started_nodes()[i].process
        return process is not None and process.poll() is None

    def index_of(self, server_name: str) -> int:
        """The node whose server name this is; `NATSServerError` for a name not in the cluster."""
        for i, node in enumerate(self._started_nodes()):
            if node.name == server_name:
                return i
        raise NATSServerError(f"{server_name!r} is not a node of cluster {self.name}")

    def start(self) -> NATSCluster:
        """Start every node and wait until the cluster has a JetStream meta leader.

        Raises `NATSServerError` if a node exits or the cluster does not form within
        `form_timeout` seconds (naming what each node saw); nothing is left running then.
        A port taken by someone else between picking and binding it is picked again.
        """
        if self._nodes:
            return self
        binary = self._binary or find_nats_server()
        attempt = 1
        while True:
            try:
                self._start(binary)
            except NATSServerError as exc:
                self.stop()
                if _PORT_TAKEN not in str(exc) or attempt == _START_ATTEMPTS:
                    raise
                attempt += 1
            except BaseException:
                self.stop()
                raise
            else:
                return self

    def _start(self, binary: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="gdc-nats-cluster-")
        root = Path(self._tmp.name)
        ports = free_ports(3 * self.size, self.host)
        self._nodes = [
            _Node(
                name=f"n{i}",
                client_port=ports[3 * i],
                cluster_port=ports[3 * i + 1],
                http_port=ports[3 * i + 2],
                store_dir=root / f"n{i}" / "store",
                config_path=root / f"n{i}" / "nats-server.conf",
                log_path=root / f"n{i}" / "nats-server.log",
            )
            for i in range(self.size)
        ]
        for node in self._nodes:
            node.store_dir.mkdir(parents=True)
            node.config_path.write_text(self._config_of(node))
        for i in range(self.size):
            self._spawn(i, binary)
        self.wait_formed(self.form_timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove their stores. Idempotent."""
        processes = [node.process for node in self._nodes if node.process is not None]
        for node in self._nodes:
            node.process = None
        for process in processes:
            if process.poll() is None:
                process.terminate()  # all at once: each one's shutdown waits for no other
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
        self._nodes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self, i: int) -> None:
        """Kill node `i` at once (SIGKILL), as a crash would; its ports and store are kept."""
        node = self._started_nodes()[i]
        process, node.process = node.process, None
        if process is None:
            return
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()

    def restart(self, i: int, timeout: float = FORM_TIMEOUT_S) -> None:
        """Start node `i` again on its ports and store; returns once it is healthy again.

        It blocks: from a coroutine, call it with `anyio.to_thread.run_sync`.
        """
        node = self._started_nodes()[i]
        if node.process is not None and node.process.poll() is None:
            return
        self._spawn(i, self._binary or find_nats_server())
        deadline = time.monotonic() + timeout
        while not self._healthy(node):
            self._check_alive(i)
            if time.monotonic() > deadline:
                raise NATSServerError(
                    f"node {node.name} of cluster {self.name} did not become healthy within "
                    f"{timeout:g}s after a restart; last log line: {self._last_line(node)}"
                )
            time.sleep(_POLL_S)

    def wait_formed(self, timeout: float = FORM_TIMEOUT_S) -> None:
        """Wait until every running node is healthy and names the same JetStream meta leader,
        and that leader sees every other running node as current."""
        deadline = time.monotonic() + timeout
        while True:
            seen: dict[str, str | None] = {}
            for i, node in enumerate(self._nodes):
                if node.process is None:
                    continue
                self._check_alive(i)
                seen[node.name] = self._meta_leader(node)
            leaders = set(seen.values())
            leader = leaders.pop() if len(leaders) == 1 else None
            if leader is not None and self._all_current(leader, set(seen) - {leader}):
                return
            if time.monotonic() > deadline:
                shown = ", ".join(f"{name} sees {lead or 'none'}" for name, lead in seen.items())
                raise NATSServerError(
                    f"cluster {self.name} did not agree on a JetStream meta leader with every "
                    f"node current within {timeout:g}s ({shown})"
                )
            time.sleep(_POLL_S)

    def __enter__(self) -> NATSCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def leader_of_stream(
        self, stream: str, *, other_than: int | None = None, timeout: float = LEADER_TIMEOUT_S
    ) -> int:
        """The node leading `stream`, once it has a leader (and that is not `other_than`).

        Asks `$JS.API.STREAM.INFO.<stream>` of a running node; raises `NATSServerError` after
        `timeout` seconds without such a leader.
        """

        async def ask(bus: NATSEventBus) -> str | None:
            return await bus.leader(stream)

        return await self._wait_leader(f"stream {stream}", ask, other_than, timeout)

    async def leader_of_consumer(
        self,
        stream: str,
        durable: str,
        *,
        other_than: int | None = None,
        timeout: float = LEADER_TIMEOUT_S,
    ) -> int:
        """The node leading the consumer `durable` of `stream`, like `leader_of_stream`."""

        async def ask(bus: NATSEventBus) -> str | None:
            return await bus.leader(stream, durable)

        return await self._wait_leader(f"consumer {durable}", ask, other_than, timeout)

    async def move_stream_leader(self, stream: str, to: int) -> None:
        """Make node `to` the leader of `stream`: a step-down naming it the preferred one, or
        (before 2.11, which refuses a preferred one) step-downs until it leads."""
        await self._move_leader(stream, None, to, lambda: self.leader_of_stream(stream))

    async def move_consumer_leader(self, stream: str, durable: str, to: int) -> None:
        """Make node `to` the leader of the consumer `durable` of `stream`."""
        await self._move_leader(
            stream, durable, to, lambda: self.leader_of_consumer(stream, durable)
        )

    def _started_nodes(self) -> list[_Node]:
        if not self._nodes:
            raise NATSServerError(f"cluster {self.name} is not running")
        return self._nodes

    def _config_of(self, node: _Node) -> str:
        routes = ", ".join(
            f"nats-route://{self.host}:{other.cluster_port}"
            for other in self._nodes
            if other is not node
        )
        # JSON strings are valid quoted strings in nats-server's config format.
        return "\n".join(
            [
                f"server_name: {json.dumps(node.name)}",
                f"listen: {json.dumps(f'{self.host}:{node.client_port}')}",
                f"http: {json.dumps(f'{self.host}:{node.http_port}')}",
                f"jetstream {{ store_dir: {json.dumps(str(node.store_dir))} }}",
                "cluster {",
                f"  name: {json.dumps(self.name)}",
                f"  listen: {json.dumps(f'{self.host}:{node.cluster_port}')}",
                f"  routes: [{routes}]",
                "}",
                "",
            ]
        )

    def _spawn(self, i: int, binary: str) -> None:
        node = self._nodes[i]
        node.log_path.unlink(missing_ok=True)  # a restart must not see the last run's lines
        args = [binary, "-c", str(node.config_path), "-l", str(node.log_path)]
        try:
            node.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise NATSServerError(f"cannot run {binary}: {exc}") from None

    def _check_alive(self, i: int) -> None:
        node = self._nodes[i]
        process = node.process
        if process is not None and process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            reason = stderr.strip().splitlines()[-1:] or [self._last_line(node)]
            raise NATSServerError(
                f"node {node.name} of cluster {self.name} exited with code "
                f"{process.returncode}: {reason[0]}"
            )

    def _last_line(self, node: _Node) -> str:
        lines = node.log_path.read_text().splitlines() if node.log_path.exists() else []
        return lines[-1] if lines else "no output"

    def _monitor(self, node: _Node, path: str) -> Any:
        url = f"http://{self.host}:{node.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:  # /healthz answers 503 while not healthy
            return json.load(exc)
        except (OSError, ValueError):
            return None

    def _meta_leader(self, node: _Node) -> str | None:
        if not (node.log_path.exists() and _READY in node.log_path.read_text()):
            return None
        if not self._healthy(node):
            return None
        leader = self._meta_cluster(node).get("leader")
        return str(leader) if leader else None

    def _meta_cluster(self, node: _Node) -> dict[str, Any]:
        jsz = self._monitor(node, "/jsz")
        meta = (jsz or {}).get("meta_cluster")
        return meta if isinstance(meta, dict) else {}

    def _all_current(self, leader: str, followers: set[str]) -> bool:
        """Whether the meta leader has every one of `followers` as a current replica."""
        replicas = self._meta_cluster(self._nodes[self.index_of(leader)]).get("replicas") or []
        current = {r.get("name") for r in replicas if r.get("current")}
        return followers <= current

    def _healthy(self, node: _Node) -> bool:
        health = self._monitor(node, "/healthz")
        return bool(health) and health.get("status") == "ok"

    async def _client(self) -> NATSEventBus:
        """A bus on the first running node that answers (it sets up no stream)."""
        errors = []
        for i, node in enumerate(self._started_nodes()):
            if not self.running(i):
                continue
            config = NATSConfig(
                url=f"nats://{self.host}:{node.client_port}",
                connect_timeout=_API_TIMEOUT_S,
                max_reconnect_attempts=0,
            )
            try:
                return await NATSEventBus.connect(config, setup_stream=False)
            except ConnectionFailed as exc:
                errors.append(f"{node.name}: {exc}")
        raise NATSServerError(f"no node of cluster {self.name} answers: {'; '.join(errors)}")

    async def _wait_leader(
        self,
        what: str,
        ask: Callable[[NATSEventBus], Awaitable[str | None]],
        other_than: int | None,
        timeout: float,
    ) -> int:
        last = "no answer"
        bus: NATSEventBus | None = None
        try:
            with anyio.move_on_after(timeout):
                while True:
                    if bus is None or not bus.connected:  # its node was killed: another one
                        if bus is not None:
                            await bus.close()
                        bus = await self._client()
                    try:
                        leader = await ask(bus)
                    except EventBusError as exc:
                        leader, last = None, str(exc)
                    if leader:
                        last = f"led by {leader}"
                        index = self.index_of(leader)
                        if index != other_than and self.running(index):
                            return index
                    await anyio.sleep(_POLL_S)
        finally:
            if bus is not None:
                await bus.close()
        unlike = f" other than {self._nodes[other_than].name}" if other_than is not None else ""
        raise NATSServerError(f"{what} had no leader{unlike} within {timeout:g}s ({last})")

    async def _move_leader(
        self,
        stream: str,
        durable: str | None,
        to: int,
        leader: Callable[[], Awaitable[int]],
        tries: int = 12,
    ) -> None:
        what = f"consumer {durable}" if durable else f"stream {stream}"
        preferred: str | None = self._started_nodes()[to].name
        for _ in range(tries):
            current = await leader()
            if current == to:
                return
            bus = await self._client()
            try:
                await bus.step_down(stream, durable, preferred)
            except EventBusError:
                if preferred is None:
                    raise
                preferred = None  # a server before 2.11: step down until `to` is elected
                continue
            finally:
                await bus.close()
            await self._wait_exact(leader, current, what, moved=True)
        await self._wait_exact(leader, to, what)

    async def _wait_exact(
        self,
        leader: Callable[[], Awaitable[int]],
        node: int,
        what: str,
        *,
        moved: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Wait until `node` leads (with `moved`: until another one does)."""
        with anyio.move_on_after(timeout):
            while (await leader() == node) is moved:
                await anyio.sleep(_POLL_S)
            return
        where = f"away from {self._nodes[node].name}" if moved else f"to {self._nodes[node].name}"
        raise NATSServerError(f"{what} did not move {where} within {timeout:g}s")
