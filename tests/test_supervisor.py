"""`supervise`, behind `--processes N`: restarts, stops, and the exit code it returns.

The supervisor runs as a real subprocess (`SUPERVISOR`, given its options as JSON), and its
replicas are real processes too: `REPLICA`, a small script that follows a plan, one step per
start. Starts are numbered across all replicas (`run-1`, `run-2`, ... files claimed with
O_EXCL), and start number N follows step N of the plan (the last step repeats):

- `exit:N`: exit with code N at once (a crash, or an app that cannot be imported);
- `serve` / `serve:N`: install a SIGTERM handler, log `ready`, exit 0 (or N) on SIGTERM;
- `drain`: like `serve`, but exit 0 only on the second SIGTERM (a worker draining);
- `unprepared`: never install a handler (a replica killed before it got that far).

Each replica logs `<pid> <start number> <what>` lines to `log`; tests wait for those lines
and for the supervisor's own log lines with deadlines, never for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import alive, wait_until

#: Deadline for something that should happen at once, generous for a busy CI.
SOON = 10.0
POLL = 0.02


T = TypeVar("T")

SUPERVISOR = """
import json, logging, sys
from gdc_worker.supervisor import supervise

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
options = json.loads(sys.argv[1])
fatal = {int(code): meaning for code, meaning in options.pop("fatal_codes", {}).items()}
sys.exit(supervise(options.pop("command"), options.pop("processes"), fatal_codes=fatal, **options))
"""

REPLICA = """
import os, signal, sys, time
from pathlib import Path

out, plan = Path(sys.argv[1]), sys.argv[2].split(",")


def claim():
    n = 1
    while True:
        try:
            os.close(os.open(out / f"run-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def note(*words):
    with open(out / "log", "a") as log:
        log.write(" ".join(str(w) for w in (os.getpid(), run, *words)) + "\\n")


run = claim()
kind, _, arg = plan[min(run, len(plan)) - 1].partition(":")
note("started", kind)
if kind == "exit":
    sys.exit(int(arg))
if kind in ("serve", "drain"):
    stops = []

    def on_sigterm(signum, frame):
        stops.append(signum)
        note("sigterm", len(stops))
        if kind == "serve" or len(stops) == 2:
            os._exit(int(arg or 0))

    signal.signal(signal.SIGTERM, on_sigterm)
    note("ready")
while True:
    time.sleep(3600)
"""


@dataclass(frozen=True)
class Line:
    """One line a replica logged."""

    pid: int
    start: int
    what: str


class Supervised:
    """A supervisor subprocess and what it and its replicas logged."""

    def __init__(self, tmp_path: Path, plan: list[str], processes: int, **options: Any) -> None:
        self.out = tmp_path / "replicas"
        self.out.mkdir(parents=True)
        script = tmp_path / "replica.py"
        script.write_text(REPLICA)
        options = {
            "command": [sys.executable, str(script), str(self.out), ",".join(plan)],
            "processes": processes,
            "poll": POLL,
            **options,
        }
        self.stderr_path = tmp_path / "supervisor.err"
        with self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, json.dumps(options)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def lines(self, what: str | None = None) -> list[Line]:
        log = self.out / "log"
        if not log.exists():
            return []
        lines = []
        for text in log.read_text().splitlines():
            pid, start, rest = text.split(" ", 2)
            lines.append(Line(int(pid), int(start), rest))
        return [line for line in lines if what is None or line.what == what]

    def starts(self) -> int:
        """How many replica processes have started so far."""
        return len(list(self.out.glob("run-*")))

    def ready(self, count: int) -> list[int]:
        """Wait for `count` replicas to log `ready`; their pids."""

        def found() -> list[int]:
            self.check_running()
            pids = [line.pid for line in self.lines("ready")]
            return pids if len(pids) >= count else []

        return wait_until(found, f"{count} replica(s) ready", said=lambda: self.stderr)

    def logged(self, pattern: str) -> re.Match[str]:
        """Wait for the supervisor to log a line matching `pattern`."""

        def found() -> re.Match[str] | None:
            self.check_running()
            return re.search(pattern, self.stderr, re.M)

        return wait_until(found, f"{pattern!r} in the supervisor's log", said=lambda: self.stderr)

    def spawned(self) -> int:
        """How many replica processes the supervisor started."""
        return len(re.findall(r"^INFO replica \d+ started \(pid \d+\)$", self.stderr, re.M))

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            pytest.fail(f"supervisor exited with {self.popen.returncode}:\n{self.stderr}")

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def exit_code(self, timeout: float = SOON) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"supervisor still running after {timeout:g}s:\n{self.stderr}")

    def close(self) -> None:
        """Kill the supervisor and any replica it left."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for line in self.lines():
            if alive(line.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(line.pid, signal.SIGKILL)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start a supervisor: `supervised(plan, processes, **supervise_options)`."""
    started: list[Supervised] = []

    def start(plan: list[str], processes: int, **options: Any) -> Supervised:
        supervisor = Supervised(tmp_path / f"s{len(started)}", plan, processes, **options)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.close()


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_reaches_each_replica_once_and_a_clean_stop_exits_0(
    supervised: Callable[..., Supervised],
) -> None:
    """Given two replicas running with their handlers installed,
    when the supervisor gets SIGTERM,
    then each replica gets one SIGTERM, none is started again, and the supervisor exits 0."""
    supervisor = supervised(["serve"], 2)
    pids = supervisor.ready(2)

    supervisor.send(signal.SIGTERM)

    assert supervisor.exit_code() == 0, supervisor.stderr
    assert sorted(line.pid for line in supervisor.lines("sigterm 1")) == sorted(pids)
    assert supervisor.spawned() == 2
    assert not any(alive(pid) for pid in pids)


def test_second_signal_is_forwarded_again_so_replicas_cancel_their_handlers(
    supervised: Callable[..., Supervised],
) -> None:
    """Given two replicas that drain after a first SIGTERM and stop on a second,
    when the supervisor gets SIGTERM and, while they drain, SIGINT (a Ctrl-C),
    then each replica gets a second SIGTERM, stops, and the supervisor exits 0."""
    supervisor = supervised(["drain"], 2)
    pids = supervisor.ready(2)
    supervisor.send(signal.SIGTERM)
    wait_until(lambda: len(supervisor.lines("sigterm 1")) == 2, "both replicas draining")

    supervisor.send(signal.SIGINT)

    assert supervisor.exit_code() == 0, supervisor.stderr
    assert sorted(line.pid for line in supervisor.lines("sigterm 2")) == sorted(pids)


def test_sighup_stops_the_replicas_as_sigterm_does_and_leaves_none_running(
    supervised: Callable[..., Supervised],
) -> None:
    """Given two replicas running with their handlers installed,
    when the supervisor gets SIGHUP (its terminal or session went away),
    then each replica gets one SIGTERM, none outlives the supervisor, and it exits 0."""
    supervisor = supervised(["serve"], 2)
    pids = supervisor.ready(2)

    supervisor.send(signal.SIGHUP)

    assert supervisor.exit_code() == 0, supervisor.stderr
    assert sorted(line.pid for line in supervisor.lines("sigterm 1")) == sorted(pids)
    assert not any(alive(pid) for pid in pids)


def test_sigterm_during_a_restart_delay_exits_0_and_restarts_nothing(
    supervised: Callable[..., Supervised],
) -> None:
    """Given two replicas, one of which crashed young (exit 1) and waits 60 s for its restart,
    when the supervisor gets SIGTERM during that wait,
    then it stops the other replica, does not restart the crashed one and exits 0 at once:
    the crash was reported when it happened and does not make the clean stop a failure."""
    supervisor = supervised(["exit:1", "serve"], 2, restart_delay=60.0, max_restart_delay=60.0)
    [serving] = supervisor.ready(1)
    supervisor.logged(r"^WARNING replica \d \(pid \d+\) exited with code 1 .*restarting in 60s$")

    supervisor.send(signal.SIGTERM)

    assert supervisor.exit_code() == 0, supervisor.stderr
    assert [line.pid for line in supervisor.lines("sigterm 1")] == [serving]
    assert supervisor.spawned() == 2
    assert re.search(r"^INFO replica \d is not restarted: stopping$", supervisor.stderr, re.M)


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(["unprepared"], id="first-start"),
        pytest.param(["exit:1", "unprepared"], id="restarted"),
    ],
)
def test_replica_killed_by_the_forwarded_sigterm_before_its_handlers_stopped_cleanly(
    supervised: Callable[..., Supervised], plan: list[str]
) -> None:
    """Given a replica that has started (first, or restarted after a crash) but not yet
    installed its signal handlers,
    when the supervisor gets SIGTERM and forwards it,
    then the replica dies of that SIGTERM, which counts as a clean stop (it had nothing in
    flight): the supervisor exits 0."""
    supervisor = supervised(plan, 1, restart_delay=0.05)
    [line] = wait_until(
        lambda: [x for x in supervisor.lines() if x.what == "started unprepared"],
        "the unprepared replica started",
    )

    supervisor.send(signal.SIGTERM)

    assert supervisor.exit_code() == 0, supervisor.stderr
    assert not alive(line.pid)
    assert f"stopped with code {-signal.SIGTERM}" in supervisor.stderr


@pytest.mark.parametrize(
    ("plan", "code"),
    [
        pytest.param(["serve:4"], 4, id="all-lost-the-connection"),
        pytest.param(["serve", "serve:4"], 4, id="one-of-two"),
        pytest.param(["serve:4", "serve:1"], 1, id="different-codes"),
    ],
)
def test_replica_that_fails_its_stop_gives_its_exit_code(
    supervised: Callable[..., Supervised], plan: list[str], code: int
) -> None:
    """Given two replicas running, some of which will exit non-zero when they stop,
    when the supervisor gets SIGTERM,
    then it exits with the code the failed replicas agree on (1 when they differ), with an
    ERROR line naming each failed replica."""
    supervisor = supervised(plan, 2)
    supervisor.ready(2)

    supervisor.send(signal.SIGTERM)

    assert supervisor.exit_code() == code, supervisor.stderr
    assert re.search(r"^ERROR \d replica\(s\) did not stop cleanly: ", supervisor.stderr, re.M)


# -- restarting -------------------------------------------------------------------------------


def test_replica_that_keeps_dying_young_is_restarted_after_a_growing_delay(
    supervised: Callable[..., Supervised],
) -> None:
    """Given a replica that crashes at once three times, then runs,
    when the supervisor runs it (first delay 0.05 s, at most 0.15 s),
    then it reports each crash and restarts it after 0.05, 0.1 and 0.15 s (doubled, capped),
    and the fourth start runs."""
    plan = ["exit:1", "exit:1", "exit:1", "serve"]
    supervisor = supervised(plan, 1, restart_delay=0.05, max_restart_delay=0.15)

    supervisor.ready(1)

    crashes = r"exited with code 1 after .*; restarting in (\S+)s$"
    delays = re.findall(crashes, supervisor.stderr, re.M)
    assert delays == ["0.05", "0.1", "0.15"]
    assert supervisor.spawned() == supervisor.starts() == 4
    supervisor.send(signal.SIGTERM)
    assert supervisor.exit_code() == 0, supervisor.stderr


def test_replica_that_ran_long_enough_is_restarted_at_once(
    supervised: Callable[..., Supervised],
) -> None:
    """Given a replica that ran longer than min_uptime, then was killed,
    when the supervisor sees it die,
    then it restarts it at once, with no delay."""
    supervisor = supervised(["serve"], 1, min_uptime=0.0, restart_delay=60.0)
    [first] = supervisor.ready(1)

    os.kill(first, signal.SIGKILL)

    [_, second] = supervisor.ready(2)
    assert second != first
    supervisor.logged(rf"exited with code {-signal.SIGKILL} after .*; restarting in 0s$")


@pytest.mark.parametrize(("code", "meaning"), [(3, "the app cannot be imported"), (2, "usage")])
def test_replica_exiting_with_a_fatal_code_stops_the_group_with_that_code(
    supervised: Callable[..., Supervised], code: int, meaning: str
) -> None:
    """Given two replicas, one of which exits with a code a restart cannot help (3: the app
    cannot be imported), the other running,
    when the supervisor sees it,
    then it logs an ERROR line naming the code and its meaning, stops the other replica,
    restarts nothing and exits with that code."""
    fatal = {str(code): meaning}
    supervisor = supervised([f"exit:{code}", "serve"], 2, fatal_codes=fatal, restart_delay=0.05)

    assert supervisor.exit_code() == code, supervisor.stderr

    error = rf"^ERROR replica \d \(pid \d+\) exited with code {code} \({meaning}\): "
    assert re.search(error, supervisor.stderr, re.M)
    assert supervisor.spawned() == 2
    assert not any(alive(line.pid) for line in supervisor.lines())
