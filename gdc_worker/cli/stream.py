"""`gdc-worker stream apply`: bring the event stream's limits to the configuration."""

from __future__ import annotations

import sys

import anyio
import anyio.to_thread
import click

from ..bus import LimitChange, NATSEventBus
from ..config import NATSConfig
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    aligned,
    connection,
    creds_option,
    reported_errors,
    url_option,
)

__all__ = ["stream"]


@click.group()
def stream() -> None:
    """Inspect and set up the event stream."""


@stream.command("apply")
@url_option
@creds_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def stream_apply(url: str | None, creds: str | None, yes: bool) -> None:
    """Show how the event stream's limits differ from the configuration, then apply them.

    The configuration is `GDC_NATS_*` (see the docs, Deploying). Lowering a limit deletes the stored
    events beyond it at once.
    """

    async def main() -> int:
        config = NATSConfig.from_env(None, **connection(url, creds))
        async with await NATSEventBus.connect(config, setup_stream=False) as bus:
            changes = await bus.stream_changes()
            name = config.stream_name
            if changes == []:
                click.echo(f"stream {name}: nothing to change")
                return EXIT_OK
            if changes is None:
                click.echo(f"stream {name} does not exist on {bus.server_url}")
                prompt = f"Create stream {name} with the configured limits?"
            else:
                click.echo(f"stream {name} on {bus.server_url}:")
                for line in _table(changes):
                    click.echo(line)
                prompt = (
                    f"Update stream {name} to the configured limits? (a lower limit deletes "
                    "the events beyond it at once)"
                )
            if not yes and not await anyio.to_thread.run_sync(
                lambda: click.confirm(prompt, default=False)
            ):
                click.echo("nothing changed")
                return EXIT_FAILURE
            await bus.apply_stream()
            click.echo(f"stream {name}: {'created' if changes is None else 'updated'}")
            return EXIT_OK

    with reported_errors():
        code = anyio.run(main)
    sys.exit(code)


def _table(changes: list[LimitChange]) -> list[str]:
    """The differing limits as an aligned table: field, server, config."""
    return aligned(
        [("field", "server", "config")] + [(c.field, c.server, c.config) for c in changes]
    )
