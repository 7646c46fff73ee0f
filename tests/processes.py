"""`gdc-worker` as real subprocesses: their environment, their output, and cleaning up.

The `spawn` fixture (registered in conftest.py) starts them in the repository root, each in
its own process group, and kills whatever is left after the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import pytest

from gdc_worker import Event, NATSConfig, new_node_up_event
from gdc_worker.testing import isolated_env
from tests.support import alive, eventually

ROOT = Path(__file__).resolve().parent.parent
GDC_WORKER = str(Path(sysconfig.get_path("scripts")) / "gdc-worker")
#: Deadline for a subprocess to start, connect and log `worker ready:`; generous for a busy CI.
READY_TIMEOUT = 20.0
#: Deadline for a process to exit once it should.
EXIT_TIMEOUT = 10.0
POLL = 0.02
READY = re.compile(r"\[(\d+)\] gdc_worker\.worker: worker ready:")


#: Kept by `clean_env()`: which nats-server binary the embedded servers run.
KEPT_GDC_VARIABLES = frozenset({"GDC_NATS_SERVER"})


def clean_env() -> dict[str, str]:
    """This process's environment without `GDC_*` variables, except `KEPT_GDC_VARIABLES`."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GDC_") or key in KEPT_GDC_VARIABLES
    }


def worker_env(config: NATSConfig, **extra: str) -> dict[str, str]:
    """`clean_env()` plus `config` as `GDC_NATS_*` variables, plus `extra`."""
    return {**clean_env(), **isolated_env(config), **extra}


# -- subprocesses -----------------------------------------------------------------------------


class Process:
    """A `gdc-worker` subprocess in the repository root, its stdout and stderr in files."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], logs: Path, cwd: Path = ROOT
    ) -> None:
        self.stdout_path = logs.with_suffix(".out")
        self.stderr_path = logs.with_suffix(".err")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # Its own process group, so cleanup can reach a nats-server it started.
            self.popen = subprocess.Popen(
                [GDC_WORKER, *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait_for(
        self, pattern: re.Pattern[str], count: int = 1, timeout: float = READY_TIMEOUT
    ) -> list[re.Match[str]]:
        """The first `count` matches of `pattern` in stderr, once there are that many."""

        def matches() -> list[re.Match[str]]:
            found = list(pattern.finditer(self.stderr))
            if len(found) < count and self.popen.poll() is not None:
                pytest.fail(f"exited with {self.popen.returncode} first; stderr:\n{self.stderr}")
            return found[:count] if len(found) >= count else []

        return await eventually(matches, f"{count} x {pattern.pattern!r} in stderr", timeout)

    async def ready(self, count: int = 1) -> list[int]:
        """Wait for `count` `worker ready` lines; the pids that logged them."""
        return [int(m.group(1)) for m in await self.wait_for(READY, count)]

    async def exit_code(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the process to exit; its exit code."""
        with anyio.move_on_after(timeout):
            while self.popen.poll() is None:
                await anyio.sleep(POLL)
        if self.popen.returncode is None:
            pytest.fail(f"still running after {timeout:g}s; stderr:\n{self.stderr}")
        return self.popen.returncode

    def _replica_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"replica \d+ started \(pid (\d+)\)", self.stderr)]

    def close(self) -> None:
        """Kill what is left: the process's group and any replica it started."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()
        for pid in self._replica_pids():
            cmdline = Path(f"/proc/{pid}/cmdline")
            if alive(pid) and b"gdc_worker" in cmdline.read_bytes():
                os.kill(pid, signal.SIGKILL)


class Spawn(Protocol):
    def __call__(self, *args: str, env: dict[str, str], cwd: Path = ROOT) -> Process: ...


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `gdc-worker ARGS...` subprocesses; whatever still runs is killed afterwards."""
    started: list[Process] = []

    def start(*args: str, env: dict[str, str], cwd: Path = ROOT) -> Process:
        process = Process(args, env, tmp_path / f"process-{len(started)}", cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# -- what the tests.apps.recorder handlers report -----------------------------------------

#: The durable consumers of `tests.apps.recorder`'s apps.
RECORDER_DURABLE = "recorder-record"
SHORT_ACK_DURABLE = "recorder-short-ack-record"


@dataclass(frozen=True)
class Report:
    """One line a `tests.apps.recorder` handler wrote: it started or finished an event."""

    phase: str
    event_id: str
    pid: int


def reports(path: Path) -> list[Report]:
    """The lines the handlers wrote so far.

    A reader can see an append half done (the kernel copies a write that crosses a page
    boundary a page at a time), so a last line without its newline is left for the next look.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line.split() for line in text[: text.rfind("\n") + 1].splitlines()]
    return [Report(phase, event_id, int(pid)) for phase, event_id, pid in lines]


def ids(path: Path, phase: str, pid: int | None = None) -> list[str]:
    """Event ids reported in `phase` (by `pid`, if given), in reporting order."""
    return [r.event_id for r in reports(path) if r.phase == phase and pid in (None, r.pid)]


def node_ups(n: int) -> list[Event]:
    return [new_node_up_event("health-monitor", f"node-{i}") for i in range(n)]
