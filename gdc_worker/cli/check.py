"""`gdc-worker check [APP]`: a health probe on consumer lag and age, and a config doctor."""

from __future__ import annotations

import sys

import anyio
import click

from ..app import App
from ..bus import ConsumerState, NATSEventBus
from ..config import NATSConfig
from ..runner import consumer_max_ack_pending
from .common import (
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_OK,
    FiniteFloat,
    connection,
    consumer_names,
    creds_option,
    reported_errors,
    url_option,
)
from .run import load_app
from .status import age_text

__all__ = ["check", "doctor"]


def doctor(app: App, processes: int, concurrency: int | None) -> list[str]:
    """The settings of `app`'s handlers that cannot work as meant, one line each, for a
    deployment of `processes` replicas (at `concurrency`, as `run --concurrency` sets it)."""
    warnings = []
    for spec in app.handlers.values():
        calls = spec.concurrency or concurrency or app.concurrency
        name = f"handler {spec.name}"
        if spec.timeout is not None and spec.timeout > spec.ack_wait:
            warnings.append(
                f"{name}: timeout {spec.timeout:g}s is longer than ack_wait {spec.ack_wait:g}s: "
                "an attempt outlives the ack wait, and the event is delivered again whenever "
                "the worker cannot keep extending it (a blocked loop, a lost connection)"
            )
        limit = consumer_max_ack_pending(spec, calls)
        if limit < processes * calls:
            warnings.append(
                f"{name}: max_ack_pending {limit} is below replicas x concurrency = "
                f"{processes} x {calls} = {processes * calls}: some handler slots stay idle"
            )
        if len(spec.backoff) > spec.max_deliver - 1:
            used = spec.max_deliver - 1
            warnings.append(
                f"{name}: backoff has {len(spec.backoff)} steps, but max_deliver "
                f"{spec.max_deliver} redelivers {used} time{'s' * (used != 1)} at most: "
                f"{', '.join(f'{d:g}s' for d in spec.backoff[used:])} never apply"
            )
    return warnings


async def _differences(bus: NATSEventBus, app: App, concurrency: int | None) -> list[str]:
    """Existing consumers of `app`'s handlers that a worker would not have created so."""
    warnings = []
    for spec in app.handlers.values():
        calls = spec.concurrency or concurrency or app.concurrency
        found = await bus.consumer_differences(
            spec.durable,
            bus.config.subject_for(spec.pattern),
            ack_wait=spec.ack_wait,
            max_ack_pending=consumer_max_ack_pending(spec, calls),
        )
        if found:
            warnings.append(
                f"consumer {spec.durable} differs from handler {spec.name}: {'; '.join(found)}"
            )
    return warnings


def _problems(state: ConsumerState, max_lag: int | None, max_age: float | None) -> list[str]:
    problems = []
    if max_lag is not None and state.lag > max_lag:
        problems.append(f"consumer {state.name}: lag {state.lag:,} is above {max_lag:,}")
    if max_age is not None and state.oldest_unacked_age_s > max_age:
        age = age_text(state.oldest_unacked_age_s)
        problems.append(
            f"consumer {state.name}: oldest unacked event is {age} old, above {age_text(max_age)}"
        )
    return problems


@click.command(
    epilog=f"""Output: one `OK:` line when healthy; else one `FAIL:` line saying why, and one
`WARN:` line per setting of APP that cannot work as meant.

\b
Examples:
  gdc-worker check --consumer scheduler-plan_pin --max-lag 1000 --max-age 300
  gdc-worker check myservice:app --processes 4

{EXIT_CODES_HELP} A FAIL or a WARN exits 1: a warning names a setting that cannot work, so CI
and deploy scripts stop on it.
"""
)
@click.argument("target", metavar="[APP]", required=False)
@url_option
@creds_option
@click.option(
    "--consumer",
    "consumers",
    multiple=True,
    callback=consumer_names,
    help="Check this durable (repeatable; default: APP's, else every durable of the stream).",
)
@click.option("--max-lag", type=click.IntRange(min=0), help="Fail above this lag.")
@click.option(
    "--max-age",
    type=FiniteFloat(min=0),
    metavar="SECONDS",
    help="Fail when the oldest unacked event is older.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Replicas APP runs as (`run --processes`), for the doctor.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Handler calls in flight per process (`run --concurrency`), for the doctor.",
)
def check(
    target: str | None,
    url: str | None,
    creds: str | None,
    consumers: tuple[str, ...],
    max_lag: int | None,
    max_age: float | None,
    processes: int,
    concurrency: int | None,
) -> None:
    """Exit 0 if the stream and its consumers are healthy, 1 saying why if not: a probe for
    Kubernetes and cron. Lag is pending + ack pending, read from each consumer's leader.

    With APP (module:app), check its handlers' consumers, and warn on settings that cannot
    work: a timeout longer than ack_wait, max_ack_pending below replicas x concurrency, more
    backoff steps than redeliveries, an existing consumer that differs from its handler.
    """

    with reported_errors():
        app = load_app(target) if target else None
        base = app.config if app is not None else NATSConfig.from_env()
        config = base.replace(**connection(url, creds))
        warnings = doctor(app, processes, concurrency) if app is not None else []
        code = anyio.run(_check, config, app, concurrency, consumers, max_lag, max_age, warnings)
    sys.exit(code)


async def _check(
    config: NATSConfig,
    app: App | None,
    concurrency: int | None,
    named: tuple[str, ...],
    max_lag: int | None,
    max_age: float | None,
    warnings: list[str],
) -> int:
    """Print the verdict: notes and warnings, then one FAIL or OK line; returns the exit code."""
    problems, notes, states = [], [], []
    async with await NATSEventBus.connect(config, setup_stream=False) as bus:
        if await bus.stream_state() is None:
            problems.append(f"stream {config.stream_name} does not exist on {bus.server_url}")
        else:
            if app is not None:
                warnings = warnings + await _differences(bus, app, concurrency)
            durables = named
            if not named and app is not None:
                durables = tuple(spec.durable for spec in app.handlers.values())
            if not durables and app is None:
                states = await bus.consumer_states()
            for durable in durables:
                state = await bus.consumer_state(durable)
                if state is not None:
                    states.append(state)
                elif named:
                    problems.append(f"consumer {durable} does not exist on {config.stream_name}")
                else:
                    notes.append(f"consumer {durable} does not exist yet (a worker creates it)")
            for state in states:
                problems += _problems(state, max_lag, max_age)
    for line in [f"note: {n}" for n in notes] + [f"WARN: {w}" for w in warnings]:
        click.echo(line)
    if problems:
        click.echo(f"FAIL: {'; '.join(problems)}")
        return EXIT_FAILURE
    click.echo(f"OK: {_summary(config.stream_name, states)}")
    return EXIT_FAILURE if warnings else EXIT_OK


def _summary(stream: str, states: list[ConsumerState]) -> str:
    if not states:
        return f"stream {stream}, no consumers to check"
    laggard = max(states, key=lambda s: s.lag)
    oldest = max(states, key=lambda s: s.oldest_unacked_age_s)
    return (
        f"stream {stream}, {len(states)} consumer{'s' * (len(states) > 1)}: "
        f"highest lag {laggard.lag:,} ({laggard.name}), oldest unacked "
        f"{age_text(oldest.oldest_unacked_age_s)} ({oldest.name})"
    )
