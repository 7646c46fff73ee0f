"""The `gdc-worker` command: thin click wrappers, one module per command.

Each command parses its options, calls the library, and maps known errors to one-line
messages and the exit codes in `common`.
"""

from __future__ import annotations

import sys

import click

from .check import check
from .common import EXIT_CODES_HELP
from .dlq import dlq
from .outbox import outbox
from .publish import publish
from .run import run
from .server import server
from .status import status
from .stream import stream
from .tail import tail

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="gdc-worker")
def main() -> None:
    """Event-driven GDC workers on NATS JetStream."""


main.add_command(run)
main.add_command(dlq)
main.add_command(outbox)
main.add_command(server)
main.add_command(stream)
main.add_command(status)
main.add_command(tail)
main.add_command(publish)
main.add_command(check)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
