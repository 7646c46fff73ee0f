"""The docs cannot rot: every Python sample in docs/*.md (and the README) runs, and every
`gdc-worker` command line in a shell sample parses with the CLI as it is.

The Python samples of one page run in order in one namespace, in a process of their own (a page
may register payload types or set a tracer provider), on one event loop, so a sample may use
top-level `await` (as in `python -m asyncio`) and what an earlier sample of its page defined.
The environment points `GDC_NATS_*` at the session's real nats-server with a stream of the
page's own, so `NATSConfig.from_env()` and `App(...)` in a sample reach it. Shell, YAML and
output samples are not run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gdc_worker import NATSServer
from gdc_worker.cli import main
from gdc_worker.testing import isolated_config
from tests.processes import worker_env

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)

#: Runs the blocks given as JSON on stdin, in order, in one namespace and one event loop.
_RUNNER = """
import ast, asyncio, inspect, json, sys

async def main(blocks):
    namespace = {"__name__": "__docs__"}
    for line, source in blocks:
        code = compile("\\n" * (line - 1) + source, sys.argv[1], "exec",
                       flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result

asyncio.run(main(json.load(sys.stdin)))
"""


def blocks(page: Path, *languages: str) -> list[tuple[int, str]]:
    """The fenced blocks of `page` in `languages`: the line each code starts on, and the code."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) in languages
    ]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_docs_have_samples_to_check() -> None:
    """Given the docs folder, then it has pages with Python and shell samples (so the tests
    below check something, rather than pass on an empty or misplaced folder)."""
    assert len(PAGES) > 5
    assert sum(len(blocks(p, "python")) for p in PAGES) > 10
    assert sum(len(blocks(p, "sh")) for p in PAGES) > 5


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=page_id)
def test_every_python_sample_runs(page: Path, nats_server: NATSServer) -> None:
    """Given a page's Python samples and a real nats-server,
    when they run in order, as a reader would paste them into `python -m asyncio`,
    then every one of them runs without an error."""
    # Its streams, as a deployment would set them; no limit the test streams could hit.
    env = worker_env(
        isolated_config(nats_server.url), GDC_NATS_MAX_BYTES="0", GDC_NATS_CONNECT_TIMEOUT="5"
    )
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, page_id(page)],
        input=json.dumps(blocks(page, "python")),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=100,
    )
    assert run.returncode == 0, run.stderr


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """Each `gdc-worker ...` command of `page`'s shell samples: its line and its arguments,
    up to a comment, a pipe or a `&`."""
    found = []
    for start, code in blocks(page, "sh"):
        for offset, line in enumerate(code.splitlines()):
            if not line.startswith("gdc-worker "):
                continue
            words = shlex.split(line, comments=True)
            for end, word in enumerate(words):
                if word in ("|", "&", "&&", ";"):
                    words = words[:end]
                    break
            found.append((start + offset, words[1:]))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=page_id)
def test_every_command_line_parses(page: Path) -> None:
    """Given a page's `gdc-worker` command lines,
    when each is parsed by the CLI (with `--help`, so nothing runs),
    then every command and option exists: none exits 2 (bad usage)."""
    wrong = []
    for line, args in commands(page):
        result = CliRunner().invoke(main, [*args, "--help"])
        if result.exit_code != 0:
            wrong.append(f"{page_id(page)}:{line}: gdc-worker {shlex.join(args)}: {result.output}")
    assert not wrong, "\n".join(wrong)
