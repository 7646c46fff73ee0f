"""`python -m gdc_worker` is the `gdc-worker` command."""

from .cli import main

main()
