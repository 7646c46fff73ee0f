"""The `gdc-worker` command: thin click wrappers that map known errors to one-line messages."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import msgspec

from .app import App
from .bus import NATSEventBus
from .config import NATSConfig
from .dlq import DeadLetterEntry, DeadLetterQueue
from .errors import GDCWorkerError
from .server import NATSServer
from .supervisor import supervise
from .worker import Worker, serve

__all__ = ["main"]

#: Exit codes, as named in `gdc-worker --help`.
EXIT_OK = 0
EXIT_FAILURE = 1  # a known error: the message says what went wrong

F = TypeVar("F", bound=Callable[..., Any])


class TargetError(GDCWorkerError):
    """`gdc-worker run TARGET` names no importable `App`."""


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn gdc-worker's own errors into `Error: <message>` and exit code 1, no traceback."""
    try:
        yield
    except GDCWorkerError as exc:
        raise click.ClickException(str(exc)) from None
    except BaseExceptionGroup as group:  # raised out of task groups
        ours, rest = group.split(GDCWorkerError)
        if ours is None or rest is not None:
            raise
        raise click.ClickException("; ".join(str(e) for e in _leaves(ours))) from None


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def load_app(target: str) -> App:
    """The `App` named by `module:attr` or `module.attr`, imported from the working directory."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise TargetError(f"target {target!r} must look like module:app or module.app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TargetError(
                f"cannot import {module_name!r}: no module named {exc.name!r}"
            ) from None
        raise TargetError(f"importing {module_name!r} failed: {exc}") from None
    except GDCWorkerError as exc:
        raise TargetError(f"{module_name}: {exc}") from None
    except Exception as exc:
        raise TargetError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    app = getattr(module, attr, None)
    if app is None:
        raise TargetError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise TargetError(f"{target} is a {type(app).__name__}, not a gdc_worker.App")
    return app


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


url_option = click.option(
    "--url",
    envvar="GDC_NATS_URL",
    default=None,
    help="NATS server URL (env GDC_NATS_URL; default nats://localhost:4222).",
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 ok, 1 a reported error, 2 bad usage.",
)
@click.version_option(package_name="gdc-worker")
def main() -> None:
    """Event-driven GDC workers on NATS JetStream."""


@main.command()
@click.option("--port", default=4222, show_default=True, help="Client port (0: a free one).")
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="JetStream store directory (default: a temporary one, removed on exit).",
)
def server(port: int, store_dir: str | None) -> None:
    """Run nats-server with JetStream on 127.0.0.1 in the foreground (Ctrl-C stops it)."""
    nats = NATSServer(port=port, store_dir=store_dir)
    with reported_errors():
        nats.start()
    # Ctrl-C or SIGTERM asks the server to shut down cleanly; wait() then returns.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: nats.terminate())
    click.echo(
        f"nats-server with JetStream at {nats.url} (store {nats.store_dir}); Ctrl-C stops it"
    )
    try:
        nats.wait()
    finally:
        nats.stop()
    click.echo("nats-server stopped")


@main.command(
    epilog="""Examples:

\b
  gdc-worker run examples.scheduler:app
  gdc-worker run examples.scheduler.app --processes 2 --concurrency 64
  gdc-worker run myservice:app --handler plan_pin --embedded
"""
)
@click.argument("target")
@url_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Handler calls in flight per handler and process.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Supervised replica processes.",
)
@click.option("--handler", "handlers", multiple=True, help="Run only this handler (repeatable).")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running handlers get to finish on shutdown.",
)
@click.option(
    "--embedded",
    is_flag=True,
    help="Start a nats-server on 127.0.0.1:4222 with its store in ./.gdc-nats.",
)
def run(
    target: str,
    url: str | None,
    concurrency: int | None,
    processes: int,
    handlers: tuple[str, ...],
    log_level: str,
    grace: float,
    embedded: bool,
) -> None:
    """Run the handlers of the App TARGET (module:app or module.app) until SIGTERM or Ctrl-C."""
    configure_logging(log_level)
    with reported_errors():
        app = load_app(target)
        # The standard port, so that other processes find it without being told.
        server = NATSServer(port=4222, store_dir=Path(".gdc-nats")) if embedded else None
        if server is not None:
            server.start()
            click.echo(f"embedded nats-server at {server.url} (store .gdc-nats)", err=True)
            url = server.url
        try:
            config = app.config.replace(url=url) if url else app.config
            # Built here even for --processes, so a bad --handler fails once, not per replica.
            worker = Worker(
                app, config=config, concurrency=concurrency, handlers=handlers, grace=grace
            )
            if processes > 1:
                command = [sys.executable, "-m", "gdc_worker", "run", target, "--url", config.url]
                command += ["--log-level", log_level, "--grace", str(grace)]
                command += [f"--concurrency={concurrency}"] if concurrency else []
                command += [f"--handler={name}" for name in handlers]
                sys.exit(supervise(command, processes))
            anyio.run(serve, worker)
        finally:
            if server is not None:
                server.stop()
    _leave_stuck_threads()


def _leave_stuck_threads() -> None:
    """Exit now if a timed-out or cancelled plain-function handler still runs in its thread.

    Python would wait for such a thread at exit, keeping a stopped worker alive indefinitely.
    """
    stuck = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if stuck:
        logging.getLogger(__name__).warning(
            "%d handler thread(s) still running after shutdown; exiting without them", len(stuck)
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_OK)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge the dead-letter stream."""


@asynccontextmanager
async def _dead_letters(url: str | None) -> AsyncIterator[DeadLetterQueue]:
    config = NATSConfig.from_env(url=url)
    async with await NATSEventBus.connect(config, setup_stream=False) as bus:
        yield DeadLetterQueue(bus)


def _run_dlq(url: str | None, action: Callable[[DeadLetterQueue], Awaitable[int]]) -> None:
    async def main() -> int:
        async with _dead_letters(url) as queue:
            return await action(queue)

    with reported_errors():
        code = anyio.run(main)
    sys.exit(code)


def _summary(entry: DeadLetterEntry) -> dict[str, Any]:
    record = entry.record
    return {
        "id": entry.id,
        "failed_at": record.failed_at.isoformat(timespec="seconds"),
        "consumer": record.consumer,
        "handler": record.handler,
        "event_type": record.event_type,
        "event_id": record.event.id if record.event else "",
        "deliveries": record.deliveries,
        "error_type": record.error_type,
        "error": record.error_message or record.reason,
        "reason": record.reason,
    }


def _filters(func: F) -> F:
    func = click.option("--consumer", help="Only entries of this consumer (durable).")(func)
    return click.option("--type", "event_type", help="Only entries of this event type.")(func)


@dlq.command("list")
@url_option
@_filters
@click.option("--limit", type=click.IntRange(min=1), help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def dlq_list(
    url: str | None, event_type: str | None, consumer: str | None, limit: int | None, as_json: bool
) -> None:
    """List dead letters, oldest first."""

    async def action(queue: DeadLetterQueue) -> int:
        rows = [
            _summary(e)
            async for e in queue.entries(event_type=event_type, consumer=consumer, limit=limit)
        ]
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
            return EXIT_OK
        if not rows:
            click.echo("no dead letters")
            return EXIT_OK
        columns = ["id", "failed_at", "consumer", "event_type", "event_id", "deliveries", "error"]
        table = [columns] + [[str(row[c])[:60] for c in columns] for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        for line in table:
            click.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            )
        return EXIT_OK

    _run_dlq(url, action)


@dlq.command("show")
@url_option
@click.argument("entry_id", metavar="ID", type=int)
def dlq_show(url: str | None, entry_id: int) -> None:
    """Show one dead letter: the event, the error and the traceback."""

    async def action(queue: DeadLetterQueue) -> int:
        entry = await queue.get(entry_id)
        record = entry.record
        click.echo(f"id:          {entry.id}")
        click.echo(f"failed at:   {record.failed_at.isoformat()}")
        click.echo(f"reason:      {record.reason}")
        click.echo(f"consumer:    {record.consumer} (handler {record.handler})")
        click.echo(f"message:     {record.stream} #{record.stream_seq} on {record.subject}")
        click.echo(f"deliveries:  {record.deliveries}")
        if record.error_type:
            click.echo(f"error:       {record.error_type}: {record.error_message}")
        if record.event is not None:
            event = json.dumps(msgspec.to_builtins(record.event), indent=2)
            click.echo("event:\n" + event)
        else:
            click.echo(f"raw message: {record.data!r}")
        if record.traceback:
            click.echo("traceback:\n" + record.traceback.rstrip())
        return EXIT_OK

    _run_dlq(url, action)


def _select(ids: tuple[int, ...], select_all: bool, *filters: str | None) -> None:
    if bool(ids) == select_all:
        raise click.UsageError("give entry IDs or --all, not both and not neither")
    if ids and any(filters):
        raise click.UsageError("--type and --consumer go with --all, not with entry IDs")


async def _targets(
    queue: DeadLetterQueue, ids: tuple[int, ...], event_type: str | None, consumer: str | None
) -> list[int]:
    if ids:
        return list(ids)
    return [e.id async for e in queue.entries(event_type=event_type, consumer=consumer)]


@dlq.command("replay")
@url_option
@click.argument("ids", metavar="[ID]...", type=int, nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every entry (matching the filters).")
@_filters
def dlq_replay(
    url: str | None,
    ids: tuple[int, ...],
    select_all: bool,
    event_type: str | None,
    consumer: str | None,
) -> None:
    """Publish dead letters again to their subjects and remove them from the DLQ."""
    _select(ids, select_all, event_type, consumer)

    async def action(queue: DeadLetterQueue) -> int:
        code = EXIT_OK
        targets = await _targets(queue, ids, event_type, consumer)
        for entry_id in targets:
            try:
                entry = await queue.replay(entry_id)
            except GDCWorkerError as exc:
                click.echo(f"Error: {exc}", err=True)
                code = EXIT_FAILURE
                continue
            what = f"event {entry.record.event.id}" if entry.record.event else "message"
            click.echo(f"replayed #{entry_id}: {what} to {entry.record.subject}")
        if not targets:
            click.echo("no dead letters")
        return code

    _run_dlq(url, action)


@dlq.command("purge")
@url_option
@click.argument("ids", metavar="[ID]...", type=int, nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every entry (matching the filters).")
@_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(
    url: str | None,
    ids: tuple[int, ...],
    select_all: bool,
    event_type: str | None,
    consumer: str | None,
    yes: bool,
) -> None:
    """Delete dead letters for good."""
    _select(ids, select_all, event_type, consumer)

    async def action(queue: DeadLetterQueue) -> int:
        targets = await _targets(queue, ids, event_type, consumer)
        if not targets:
            click.echo("no dead letters")
            return EXIT_OK
        if not yes:
            shown = ", ".join(f"#{i}" for i in targets[:10]) + (" ..." if len(targets) > 10 else "")
            prompt = f"Delete {len(targets)} dead letter(s) ({shown}) for good?"
            if not await anyio.to_thread.run_sync(lambda: click.confirm(prompt, default=False)):
                click.echo("nothing deleted")
                return EXIT_FAILURE
        code = EXIT_OK
        for entry_id in targets:
            try:
                await queue.purge(entry_id)
            except GDCWorkerError as exc:
                click.echo(f"Error: {exc}", err=True)
                code = EXIT_FAILURE
                continue
            click.echo(f"purged #{entry_id}")
        return code

    _run_dlq(url, action)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
