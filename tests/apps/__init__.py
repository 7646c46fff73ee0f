"""Small apps that the CLI tests run as `gdc-worker run tests.apps.<module>:<app>` subprocesses.

They take their NATS settings from the `GDC_NATS_*` environment the test passes in.
"""
