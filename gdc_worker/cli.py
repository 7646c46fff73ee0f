"""The `gdc-worker` command: thin click wrappers that map known errors to one-line messages."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from .errors import GDCWorkerError
from .server import NATSServer

__all__ = ["main"]

#: Exit codes, as named in `gdc-worker --help`.
EXIT_OK = 0
EXIT_FAILURE = 1  # a known error: the message says what went wrong
EXIT_USAGE = 2  # click's own code for bad options

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn gdc-worker's own errors into `Error: <message>` and exit code 1, no traceback."""
    try:
        yield
    except GDCWorkerError as exc:
        raise click.ClickException(str(exc)) from None


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
