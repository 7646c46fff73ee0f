"""`--processes N`: run N replica processes of a worker and restart any that dies."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

__all__ = ["supervise"]

log = logging.getLogger(__name__)

#: A replica that lives shorter than this counts as crash-looping: wait before the restart.
_MIN_UPTIME = 5.0
_MAX_RESTART_DELAY = 30.0


@dataclass
class _Replica:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    restart_delay: float = 0.0


def supervise(command: Sequence[str], processes: int, *, poll: float = 0.2) -> int:
    """Run `command` `processes` times until SIGINT/SIGTERM; returns the exit code to use.

    The first signal is forwarded to every replica (a graceful stop), a second one too (which
    makes them cancel running handlers). A replica that exits while not asked to is restarted,
    after a growing delay if it keeps dying young. Returns 0 if every replica stopped cleanly.
    """
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        for replica in replicas:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)

    replicas: list[_Replica] = []
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        replicas.extend(_spawn(command, i) for i in range(processes))
        log.info("supervising %d replica(s): %s", processes, " ".join(command))
        while not signals:
            time.sleep(poll)
            for n, replica in enumerate(replicas):
                code = replica.process.poll()
                if code is None or signals:
                    continue
                uptime = time.monotonic() - replica.started
                delay = 0.0 if uptime >= _MIN_UPTIME else max(1.0, 2 * replica.restart_delay)
                delay = min(delay, _MAX_RESTART_DELAY)
                log.warning(
                    "replica %d (pid %d) exited with code %d; restarting in %gs",
                    replica.index,
                    replica.process.pid,
                    code,
                    delay,
                )
                restart_at = time.monotonic() + delay
                while not signals and time.monotonic() < restart_at:
                    time.sleep(poll)  # in steps, so a signal is not kept waiting
                if not signals:
                    replicas[n] = _spawn(command, replica.index, restart_delay=delay)
        codes = [replica.process.wait() for replica in replicas]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("all replicas stopped (exit codes %s)", codes)
    return 0 if all(code == 0 for code in codes) else 1


def _spawn(command: Sequence[str], index: int, restart_delay: float = 0.0) -> _Replica:
    # Its own process group: a Ctrl-C reaches the replicas once, through on_signal, not twice.
    process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, process_group=0)
    log.info("replica %d started (pid %d)", index, process.pid)
    return _Replica(index, process, time.monotonic(), restart_delay)
