"""A watchdog on the event loop: names the async handler that blocks it (e.g. `time.sleep`).

A blocked loop starves everything else, the keep-alive included, so JetStream redelivers the
event while the handler still "runs". The watchdog is a thread: the loop marks a heartbeat a
few times a second, and when a beat is late the thread reads the loop thread's stack, finds
the handler whose code is running there, and logs one warning per handler. It costs the hot
path nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Sequence
from types import CodeType, FrameType, TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import HandlerSpec

__all__ = ["LoopWatchdog"]

log = logging.getLogger("gdc_worker.worker")

#: A loop that does not answer for this long is blocked.
DEFAULT_THRESHOLD = 1.0


class LoopWatchdog:
    """Use as `with LoopWatchdog(specs):` inside the running loop; `add()` more handlers."""

    def __init__(
        self, specs: Sequence[HandlerSpec] = (), *, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        self._handlers: dict[CodeType, str] = {}
        for spec in specs:
            self.add(spec)
        self._threshold = threshold
        self._interval = threshold / 4
        self._beat = time.monotonic()
        self._reported: set[str] = set()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoopWatchdog:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="gdc-worker-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def add(self, spec: HandlerSpec) -> None:
        """Name `spec`'s handler when its code blocks the loop."""
        code = _code_of(spec.func)
        if code is not None:
            self._handlers[code] = spec.name

    def _mark(self) -> None:
        self._beat = time.monotonic()

    def _watch(self) -> None:
        assert self._loop is not None
        blocked_since_beat = None
        while not self._stop.wait(self._interval):
            try:
                self._loop.call_soon_threadsafe(self._mark)
            except RuntimeError:  # the loop is closed
                return
            late = time.monotonic() - self._beat
            if late < self._threshold:
                blocked_since_beat = None
                continue
            if blocked_since_beat == self._beat:
                continue  # this block is reported already
            blocked_since_beat = self._beat
            self._report(late)

    def _report(self, late: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        name, where = self._culprit(frame)
        if name in self._reported:
            return
        self._reported.add(name)
        log.warning(
            "handler %s blocked the event loop for over %.1fs (at %s): nothing else runs "
            "meanwhile, not even the keep-alive, so JetStream may redeliver its event while "
            "it still runs. Await instead of blocking (asyncio.sleep, an async client), or "
            "make it a plain def, which runs in a thread (reported once per handler)",
            name,
            late,
            where,
        )

    def _culprit(self, frame: FrameType | None) -> tuple[str, str]:
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        while frame is not None:
            name = self._handlers.get(frame.f_code)
            if name is not None:
                return name, where
            frame = frame.f_back
        return "(unknown: no handler's code on the stack)", where


def _code_of(func: object) -> CodeType | None:
    code = getattr(func, "__code__", None)
    if code is None:  # an object with an async __call__
        code = getattr(getattr(type(func), "__call__", None), "__code__", None)  # noqa: B004
    return code if isinstance(code, CodeType) else None
