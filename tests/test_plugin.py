"""The pytest plugin: installing gdc-worker gives a project the real-server fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gdc_worker.testing
from gdc_worker import NATSServerError

USER_TEST = """
import pytest

from gdc_worker import NATSEventBus, new_node_up_event

pytestmark = pytest.mark.anyio


async def test_publishes(event_bus: NATSEventBus, anyio_backend: str) -> None:
    assert anyio_backend == "asyncio"
    assert await event_bus.publish_event(new_node_up_event("me", "node-1")) == 1
"""


UNMARKED_TEST = """
from gdc_worker import NATSEventBus, new_node_up_event


async def test_publishes_unmarked(event_bus: NATSEventBus) -> None:
    assert await event_bus.publish_event(new_node_up_event("me", "node-1")) == 1
"""


def run_pytest(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """pytest on `project`, which has no conftest and no `pytest_plugins`."""
    (project / "test_user.py").write_text(USER_TEST)
    environ = {k: v for k, v in os.environ.items() if k != "GDC_NATS_SERVER"} | env
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_project_gets_the_fixtures_without_registering_them(tmp_path: Path) -> None:
    """Given a project whose async test uses `event_bus`, with no conftest at all,
    when pytest runs it, then it passes: a real server, a bus on it, on asyncio."""
    result = run_pytest(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_an_async_test_on_the_bus_needs_no_anyio_mark(tmp_path: Path) -> None:
    """Given a project with an async test using `event_bus` and no anyio mark, collected before
    a marked one, when pytest runs them, then both pass: the fixture brings anyio's runner
    (without it pytest refused the fixture, and the marked test then failed inside pytest)."""
    (tmp_path / "test_a_unmarked.py").write_text(UNMARKED_TEST)

    result = run_pytest(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_a_gdc_nats_server_that_names_nothing_fails_the_tests(tmp_path: Path) -> None:
    """Given GDC_NATS_SERVER naming a file that does not exist,
    when pytest runs a test on the server fixtures,
    then the test errors, naming the setting, rather than being skipped."""
    missing = tmp_path / "no-such-nats-server"

    result = run_pytest(tmp_path, GDC_NATS_SERVER=str(missing))

    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout
    assert f"GDC_NATS_SERVER={missing} is not an executable file" in result.stdout


def test_without_a_nats_server_binary_the_fixtures_skip_saying_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given no nats-server anywhere and no GDC_NATS_SERVER,
    when a server fixture looks for the binary, then the test is skipped with that reason."""
    monkeypatch.delenv("GDC_NATS_SERVER", raising=False)

    def nowhere() -> str:
        raise NATSServerError("nats-server not found: install it with ...")

    monkeypatch.setattr(gdc_worker.testing, "find_nats_server", nowhere)

    with pytest.raises(pytest.skip.Exception, match="nats-server not found"):
        gdc_worker.testing._server_binary()
