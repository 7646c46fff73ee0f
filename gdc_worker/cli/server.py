"""`gdc-worker server`: a nats-server with JetStream in the foreground, for development."""

from __future__ import annotations

import signal

import click

from ..server import NATSServer
from ..supervisor import STOP_SIGNALS
from .common import reported_errors

__all__ = ["server"]


@click.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=4222,
    show_default=True,
    help="Client port (0: a free one).",
)
@click.option(
    "--store-dir",
    # Not click.Path(file_okay=False): NATSServer checks the path and says what is wrong with
    # it in one line, for a file as for a directory it cannot write.
    default=None,
    help="JetStream store directory (default: a temporary one, removed on exit).",
)
def server(port: int, store_dir: str | None) -> None:
    """Run nats-server with JetStream on 127.0.0.1 in the foreground (Ctrl-C stops it)."""
    nats = NATSServer(port=port, store_dir=store_dir)
    with reported_errors():
        nats.start()
    # Ctrl-C, SIGTERM or SIGHUP (the terminal gone) asks the server to shut down cleanly, and
    # wait() then returns: no nats-server left running on its own, with its temporary store.
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: nats.terminate())
    click.echo(
        f"nats-server with JetStream at {nats.url} (store {nats.store_dir}); Ctrl-C stops it"
    )
    try:
        nats.wait()
    finally:
        nats.stop()
    click.echo("nats-server stopped")
