"""`--processes N`: run N replica processes of a worker and restart any that dies."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

__all__ = ["STOP_SIGNALS", "supervise"]

log = logging.getLogger(__name__)

#: The signals that stop a worker or a group gracefully (a second one, forcefully). SIGHUP is
#: one: its default action would kill the process on the spot, a supervisor's replicas (in
#: process groups of their own) left running without it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class _Replica:
    """One replica slot: its current process, or none while it waits to be restarted."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: The delay before the last restart; it doubles while the replica keeps dying young.
    restart_delay: float = 0.0
    restart_at: float | None = None
    #: SIGTERMs forwarded to the current process.
    stops_sent: int = 0
    #: The exit code of a process that was running when the stop reached it.
    final_code: int | None = None


def supervise(
    command: Sequence[str],
    processes: int,
    *,
    env: Mapping[str, str] | None = None,
    fatal_codes: Mapping[int, str] | None = None,
    poll: float = 0.05,
    min_uptime: float = 5.0,
    restart_delay: float = 1.0,
    max_restart_delay: float = 30.0,
    on_change: Callable[[list[int]], None] | None = None,
) -> int:
    """Run `command` `processes` times until a `STOP_SIGNALS` one; returns the exit code to use.

    The replicas get `env` (default: this process's environment). Each signal is forwarded
    to every running replica as a SIGTERM (the first asks for a graceful stop, the second makes
    them cancel running handlers). A replica that exits while not asked to is reported and
    restarted: at once if it ran `min_uptime` seconds, else after `restart_delay`, doubled up
    to `max_restart_delay` while it keeps dying young.

    A replica that exits with a code in `fatal_codes` (code → what it means, e.g.
    `{3: "the app cannot be imported"}`) cannot be helped by a restart: it is logged as an
    ERROR, the whole group is stopped at once and that code returned.

    Otherwise, once stopped, returns 0 if every replica that was running when the stop came
    ended cleanly: with 0, or by the SIGTERM we sent before it could install its handlers
    (then it had nothing in flight). A replica waiting for its restart is not counted: its
    crash was reported when it happened. A failed stop returns the replicas' exit code if
    they agree on one, else 1. Signals and exits are noticed within `poll` seconds.
    `on_change` is told the pids of the running replicas whenever one starts or exits.
    """
    group = _Group(
        command,
        env=env,
        fatal_codes=fatal_codes or {},
        min_uptime=min_uptime,
        restart_delay=restart_delay,
        max_restart_delay=max_restart_delay,
        on_change=on_change,
    )
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # Only note it: the loop forwards it, so a replica being spawned right now gets it too.
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        group.start(processes)
        log.info("supervising %d replica(s): %s", processes, " ".join(command))
        while not group.done:
            for signum in signals[group.signals_seen :]:
                group.signals_seen += 1
                again = group.signals_seen > 1
                log.info(
                    "received %s%s: %s",
                    signal.Signals(signum).name,
                    " again" if again else "",
                    "forwarding it, to cancel running handlers" if again else "stopping replicas",
                )
            group.step(time.monotonic())
            if not group.done:
                time.sleep(poll)
    finally:
        group.abandon()  # if the loop failed: no replica outlives its supervisor
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return group.exit_code()


class _Group:
    """The replicas and what the supervisor decides about them, one `step` at a time."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        fatal_codes: Mapping[int, str],
        min_uptime: float,
        restart_delay: float,
        max_restart_delay: float,
        on_change: Callable[[list[int]], None] | None,
    ) -> None:
        self.command = list(command)
        self.on_change = on_change
        self.env = dict(env) if env is not None else None
        self.fatal_codes = fatal_codes
        self.min_uptime = min_uptime
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.replicas: list[_Replica] = []
        self.signals_seen = 0
        self.fatal: int | None = None

    def start(self, processes: int) -> None:
        self.replicas = [_Replica(i) for i in range(processes)]
        for replica in self.replicas:
            self._spawn(replica)

    @property
    def stopping(self) -> bool:
        return self.signals_seen > 0 or self.fatal is not None

    @property
    def done(self) -> bool:
        return self.stopping and all(r.process is None for r in self.replicas)

    def step(self, now: float) -> None:
        """Reap exited replicas, forward stops, and restart the replicas that are due."""
        for replica in self.replicas:
            self._reap(replica, now)
        # One SIGTERM per signal received; a fatal exit asks for a graceful stop.
        stops_wanted = max(self.signals_seen, 1 if self.fatal is not None else 0)
        for replica in self.replicas:
            if self.stopping and replica.process is None and replica.restart_at is not None:
                log.info("replica %d is not restarted: stopping", replica.index)
                replica.restart_at = None
            process = replica.process
            while process is not None and replica.stops_sent < stops_wanted:
                replica.stops_sent += 1
                process.send_signal(signal.SIGTERM)
            if not self.stopping and replica.restart_at is not None and now >= replica.restart_at:
                self._spawn(replica)

    def _reap(self, replica: _Replica, now: float) -> None:
        process = replica.process
        if process is None:
            return
        code = process.poll()
        if code is None:
            return
        replica.process = None
        self._changed()
        if replica.stops_sent:  # it was running when the stop reached it
            replica.final_code = code
            log.info("replica %d (pid %d) stopped with code %d", replica.index, process.pid, code)
            return
        meaning = self.fatal_codes.get(code)
        if meaning is not None:
            log.error(
                "replica %d (pid %d) exited with code %d (%s): restarting cannot help; "
                "stopping all replicas",
                replica.index,
                process.pid,
                code,
                meaning,
            )
            if self.fatal is None:
                self.fatal = code
            return
        uptime = now - replica.started
        if uptime >= self.min_uptime:
            delay = 0.0
        else:
            delay = min(2 * replica.restart_delay or self.restart_delay, self.max_restart_delay)
        replica.restart_delay = delay
        if self.stopping:
            log.warning(
                "replica %d (pid %d) exited with code %d after %.1fs; not restarted: stopping",
                replica.index,
                process.pid,
                code,
                uptime,
            )
            return
        log.warning(
            "replica %d (pid %d) exited with code %d after %.1fs; restarting in %gs",
            replica.index,
            process.pid,
            code,
            uptime,
            delay,
        )
        replica.restart_at = now + delay

    def _spawn(self, replica: _Replica) -> None:
        # Its own process group: a Ctrl-C reaches the replicas once, through on_signal, not twice.
        process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, process_group=0, env=self.env
        )
        replica.process = process
        replica.started = time.monotonic()
        replica.restart_at = None
        replica.stops_sent = 0
        log.info("replica %d started (pid %d)", replica.index, process.pid)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change([r.process.pid for r in self.replicas if r.process is not None])

    def abandon(self) -> None:
        """SIGTERM every replica still running (when supervising fails midway)."""
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)

    def exit_code(self) -> int:
        if self.fatal is not None:
            return self.fatal
        stopped = [(r.index, r.final_code) for r in self.replicas if r.final_code is not None]
        failed = [(index, code) for index, code in stopped if not _stopped_cleanly(code)]
        if not failed:
            log.info("all replicas stopped (exit codes %s)", sorted({c for _, c in stopped}))
            return 0
        log.error(
            "%d replica(s) did not stop cleanly: %s",
            len(failed),
            ", ".join(f"replica {index} exited with code {code}" for index, code in failed),
        )
        # A replica killed by a signal has no code of its own to pass on: 1.
        codes = {max(code, 1) for _, code in failed}
        return codes.pop() if len(codes) == 1 else 1


def _stopped_cleanly(code: int) -> bool:
    # -SIGTERM: our SIGTERM arrived before the replica installed its handlers (or after it
    # restored them on its way out): it had nothing in flight.
    return code in (0, -signal.SIGTERM)
