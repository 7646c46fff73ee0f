"""What every command shares: exit codes, the error-to-message mapping, common options."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import anyio
import click
from click.core import ParameterSource

from ..errors import ConnectionFailed, GDCWorkerError, TargetError, describe, one_error
from ..logs import JSONFormatter
from ..subjects import check_pattern
from ..supervisor import STOP_SIGNALS

__all__ = [
    "CREDS_ENVVAR",
    "EXIT_CODES_HELP",
    "EXIT_CONNECT",
    "EXIT_FAILURE",
    "EXIT_IMPORT",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_FORMATS",
    "URL_ENVVAR",
    "FiniteFloat",
    "ReportedError",
    "aligned",
    "configure_logging",
    "connection",
    "consumer_names",
    "creds_option",
    "exit_code_of",
    "one_line",
    "pattern_of",
    "reported_errors",
    "run_until_stopped",
    "since_option",
    "since_time",
    "url_option",
]

#: Exit codes, as listed in `gdc-worker --help` (dramatiq's scheme, shifted past click's 2).
EXIT_OK = 0
EXIT_FAILURE = 1  # a reported error: the message says what went wrong
EXIT_USAGE = 2  # bad usage (click's own)
EXIT_IMPORT = 3  # the target cannot be imported, or is not an App
EXIT_CONNECT = 4  # NATS cannot be reached, or the connection was lost for good

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 a reported error, 2 bad usage, 3 the target cannot be imported or is "
    "not an App, 4 NATS cannot be reached or the connection was lost for good."
)

log = logging.getLogger("gdc_worker.cli")

URL_ENVVAR = "GDC_NATS_URL"
CREDS_ENVVAR = "GDC_NATS_CREDS_FILE"


class ReportedError(click.ClickException):
    """A known error, printed as one line with the exit code its kind has: `Error: ...`, or
    a JSON log line where the logs are JSON (`run --log-format json`)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance too

    def show(self, file: Any = None) -> None:
        if _json_logs():
            log.error("%s", self.format_message())
        else:
            super().show(file)


def exit_code_of(exc: BaseException) -> int:
    """The exit code for one of gdc-worker's errors."""
    if isinstance(exc, ConnectionFailed):
        return EXIT_CONNECT
    if isinstance(exc, TargetError):
        return EXIT_IMPORT
    return EXIT_FAILURE


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn gdc-worker's own errors into `Error: <message>` and their exit code, no traceback."""
    try:
        yield
    except GDCWorkerError as exc:
        raise ReportedError(str(exc), exit_code_of(exc)) from None
    except BaseExceptionGroup as group:  # raised out of task groups
        error = one_error(group)
        if not isinstance(error, GDCWorkerError) or error.__cause__ is not None:
            raise
        raise ReportedError(str(error), exit_code_of(error)) from None


LOG_FORMATS = ("text", "json")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level`, as text lines or (`json`) one JSON object per line; with
    JSON, an uncaught exception (a defect) is a JSON line too, not a bare traceback."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format.lower() == "json":
        handler.setFormatter(JSONFormatter())
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _json_logs() -> bool:
    return any(isinstance(h.formatter, JSONFormatter) for h in logging.getLogger().handlers)


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    log.critical("uncaught %s", describe(error), exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and not isinstance(args.exc_value, SystemExit):
        thread = args.thread.name if args.thread is not None else "?"
        log.critical(
            "uncaught %s in thread %s",
            describe(args.exc_value),
            thread,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )


def _nonempty_url(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Refuse an empty `--url` or `GDC_NATS_URL` as bad usage, in one line.

    Not a `click.BadParameter`: that prints the usage too, and the mistake is not in how the
    command is typed when it comes from the environment.
    """
    if value is None:
        # click reads an empty variable as unset; that would quietly connect to the default.
        if os.environ.get(URL_ENVVAR, "x").strip():
            return None
        raise ReportedError(f"{URL_ENVVAR} is empty: give a NATS URL or unset it", EXIT_USAGE)
    if not str(value).strip():
        if ctx.get_parameter_source(param.name or "url") == ParameterSource.ENVIRONMENT:
            raise ReportedError(f"{URL_ENVVAR} is empty: give a NATS URL or unset it", EXIT_USAGE)
        raise ReportedError("--url is empty: give a NATS URL or leave the option out", EXIT_USAGE)
    return value


url_option = click.option(
    "--url",
    envvar=URL_ENVVAR,
    default=None,
    callback=_nonempty_url,
    help="NATS server URL (env GDC_NATS_URL; default nats://localhost:4222).",
)


def _nonempty_creds(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None or str(value).strip():
        return value
    if ctx.get_parameter_source(param.name or "creds") == click.core.ParameterSource.ENVIRONMENT:
        return None  # an empty GDC_NATS_CREDS_FILE means none, as for NATSConfig.from_env
    raise ReportedError("--creds is empty: give a .creds file or leave it out", EXIT_USAGE)


creds_option = click.option(
    "--creds",
    metavar="FILE",
    envvar=CREDS_ENVVAR,
    default=None,
    callback=_nonempty_creds,
    help="NATS user credentials (JWT .creds) file (env GDC_NATS_CREDS_FILE).",
)


class FiniteFloat(click.FloatRange):
    """A `click.FloatRange` that also refuses NaN and infinity, which pass its range check:
    `--max-age nan` would never fail a probe, `--watch nan` crash the sleep."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def consumer_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """The callback of a repeatable `--consumer`: names JetStream can have, else bad usage.

    A name with `.`, `*`, `>` or a space would make another API subject (or none), and the
    server would answer a question nobody asked, or not at all.
    """
    for name in value:
        if not name or any(c in ".*>" or not c.isprintable() or c.isspace() for c in name):
            raise click.BadParameter(
                f"{name!r} is not a consumer name (non-empty, without '.', '*', '>' or spaces)",
                ctx,
                param,
            )
    return value


def pattern_of(what: str, pattern: str, check: Callable[[str], str] = check_pattern) -> str:
    """`pattern` (an event type, `pin.*`, `>`) as `check` takes it (`check_pattern`; for a
    type to publish, `check_event_type`), or one line of bad usage naming `what` (the
    argument or option) and saying what it takes."""
    try:
        return check(pattern)
    except GDCWorkerError as exc:
        raise ReportedError(f"{what}: {exc}", EXIT_USAGE) from None


def connection(url: str | None, creds: str | None) -> dict[str, str]:
    """The settings `--url` and `--creds` override, for `NATSConfig.replace`/`from_env`."""
    given = {"url": url, "creds_file": creds}
    return {name: value for name, value in given.items() if value is not None}


def one_line(text: str) -> str:
    """`text` with what a terminal acts on (line breaks, escape sequences) shown escaped, so
    that what came from anywhere (an event, a dead letter) is one line and cannot restyle
    the screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def aligned(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as lines of aligned columns two spaces apart; the columns in `right` (numbers)
    aligned right. An empty cell shows as `-`, so that the columns stay apart; control
    characters in a cell show escaped (`one_line`)."""
    cells = [[one_line(cell) or "-" for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))] if cells else []
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]


def run_until_stopped(work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` until it returns, or a stop signal (SIGINT, SIGTERM, SIGHUP) arrives (then
    cancel it), so that Ctrl-C ends a command that follows something (`tail`, `status
    --watch`) cleanly; and so does a reader of its output that stops (`| head`): it has what
    it wanted."""
    try:
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the handler was there
            anyio.run(_until_stopped, work)
    except BrokenPipeError:
        # What is still buffered cannot go out either: flushing it at exit would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _until_stopped(work: Callable[[], Awaitable[None]]) -> None:
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:

                async def stop() -> None:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(stop)
                await work()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the task group's wrapping of what `work` raised
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


#: `--since 10m`: seconds per unit.
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def since_time(text: str, now: datetime | None = None) -> datetime:
    """`10m`, `2h`, `30s`, `1d` ago, or an ISO 8601 time (local time when it has no offset),
    not after `now`; raises `ValueError` saying what it takes."""
    now = now or datetime.now(UTC)
    ago = _AGO.fullmatch(text.strip())
    try:
        if ago:
            when = now - timedelta(seconds=float(ago[1]) * _UNITS_S[ago[2]])
        else:
            when = datetime.fromisoformat(text.strip()).astimezone(UTC)
    except OverflowError:
        raise ValueError(f"--since {text!r}: that is before the earliest time there is") from None
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a time ago such as 10m, 2h, 30s or 1d, or an ISO time "
            "such as 2024-05-01T10:00:00+00:00"
        ) from None
    if when > now:
        raise ValueError(f"--since {text!r}: {when.isoformat()} is in the future")
    return when


def since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """The callback of a `--since` option: its time, or one line of bad usage (exit 2)."""
    if value is None:
        return None
    try:
        return since_time(value)
    except ValueError as exc:
        raise ReportedError(str(exc), EXIT_USAGE) from None
