"""`gdc-worker stream apply`: the event stream's limits against the configuration, on a real
server, in-process through click's `CliRunner` in a thread beside the test's event loop."""

from __future__ import annotations

import functools

import anyio.to_thread
import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from gdc_worker import NATSConfig
from gdc_worker.cli import main
from gdc_worker.testing import isolated_env
from tests.go_peer import DEFAULTS, GIB, RAISED, add_raised_stream, stream_limits

pytestmark = pytest.mark.anyio


async def stream(config: NATSConfig, *args: str, answer: str | None = None) -> Result:
    """`gdc-worker stream ARGS...` on the test's stream with the default limits."""
    env = {**isolated_env(config), "GDC_NATS_MAX_BYTES": str(GIB)}
    invoke = functools.partial(
        CliRunner().invoke, main, ["stream", *args], env=env, input=answer, catch_exceptions=False
    )
    return await anyio.to_thread.run_sync(invoke)


async def test_apply_shows_the_difference_and_changes_nothing_when_declined(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a stream with raised limits (7 d / 10 GiB / 10 M / 10 min),
    when `stream apply` runs and the operator answers "n",
    then it shows an aligned table of each differing field (server, config), says nothing
    changed, exits 1, and the stream keeps its limits."""
    await add_raised_stream(jetstream, nats_config)

    result = await stream(nats_config, "apply", answer="n\n")

    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("field"))
    table = [line.split() for line in lines[header : header + 5]]
    assert table == [
        ["field", "server", "config"],
        ["max_age", "7d", "1d"],
        ["max_bytes", "10", "GiB", "1", "GiB"],
        ["max_msgs", "10,000,000", "1,000,000"],
        ["duplicate_window", "10min", "5min"],
    ]
    server, config = lines[header].index("server"), lines[header].index("config")
    assert [line[server:config].split()[0] for line in lines[header + 1 : header + 5]] == [
        "7d",
        "10",
        "10,000,000",
        "10min",
    ]
    assert "nothing changed" in result.output
    assert result.exit_code == 1
    assert await stream_limits(jetstream, nats_config) == RAISED


async def test_apply_yes_updates_the_stream_then_there_is_nothing_to_change(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a stream with raised limits,
    when `stream apply --yes` runs, then again,
    then the first updates the stream to the configured limits without asking (exit 0), and
    the second says "nothing to change" (exit 0)."""
    await add_raised_stream(jetstream, nats_config)

    first = await stream(nats_config, "apply", "--yes")
    second = await stream(nats_config, "apply")

    assert (first.exit_code, second.exit_code) == (0, 0)
    assert "max_age" in first.output
    assert f"stream {nats_config.stream_name}: updated" in first.output
    assert await stream_limits(jetstream, nats_config) == DEFAULTS
    assert second.output.strip() == f"stream {nats_config.stream_name}: nothing to change"


async def test_apply_creates_a_missing_stream_on_confirmation(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given no event stream,
    when `stream apply` runs and the operator answers "y",
    then the stream is created with the configured limits."""
    result = await stream(nats_config, "apply", answer="y\n")

    assert result.exit_code == 0, result.output
    assert "does not exist" in result.output
    assert await stream_limits(jetstream, nats_config) == DEFAULTS


async def test_apply_refuses_a_stream_of_another_shape(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a stream of the configured name without our subjects (someone else's),
    when `stream apply --yes` runs,
    then it exits 1 with one `Error:` line saying so, and the stream is unchanged."""
    others = [f"other.{nats_config.stream_name.lower()}.>"]  # no other test's subjects
    await jetstream.add_stream(name=nats_config.stream_name, subjects=others)

    result = await stream(nats_config, "apply", "--yes")

    assert result.exit_code == 1
    assert f"Error: stream {nats_config.stream_name} exists with other" in result.output
    info = await jetstream.stream_info(nats_config.stream_name)
    assert info.config.subjects == others
