"""`gdc-worker run TARGET`: import an App and run its handlers, in one or N processes."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path

import anyio
import click
from click.core import ParameterSource

from ..app import App
from ..bus import NATSEventBus
from ..config import NATSConfig
from ..dlq import DeadLetterQueue
from ..errors import GDCWorkerError, TargetError
from ..health import GroupEndpoint, serve_monitored, serve_replica
from ..metrics import Metrics
from ..server import NATSServer
from ..supervisor import supervise
from ..worker import Worker, serve
from .common import (
    CREDS_ENVVAR,
    EXIT_CODES_HELP,
    EXIT_IMPORT,
    EXIT_OK,
    EXIT_USAGE,
    LOG_FORMATS,
    URL_ENVVAR,
    FiniteFloat,
    configure_logging,
    connection,
    creds_option,
    reported_errors,
    url_option,
)

__all__ = ["load_app", "run"]

#: The standard NATS port: other processes find an --embedded server without being told.
EMBEDDED_PORT = 4222
METRICS_PORT_ENVVAR = "GDC_METRICS_PORT"
#: Set by the supervisor for its replicas: where they write metrics and heartbeats.
REPLICA_METRICS_ENVVAR = "GDC_WORKER_REPLICA_METRICS_DIR"
#: Set by the supervisor for its replicas: its pid, so that a replica stops once it is gone.
SUPERVISOR_PID_ENVVAR = "GDC_WORKER_SUPERVISOR_PID"


def load_app(target: str) -> App:
    """The `App` named by `module:attr` or `module.attr`, imported from the working directory.

    Raises `TargetError` for anything that keeps it from being imported, whatever the module's
    import raised.
    """
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise TargetError(f"target {target!r} must look like module:app or module.app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise TargetError(
                f"cannot import {module_name!r}: no module named {exc.name!r}"
            ) from None
        raise TargetError(f"importing {module_name!r} failed: {exc}") from None
    except GDCWorkerError as exc:
        raise TargetError(f"{module_name}: {exc}") from None
    except BaseException as exc:  # SystemExit and the like from a module's import too
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TargetError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    app = getattr(module, attr, None)
    if app is None:
        raise TargetError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise TargetError(f"{target} is a {type(app).__name__}, not a gdc_worker.App")
    return app


@click.command(
    epilog=f"""Examples:

\b
  gdc-worker run examples.scheduler:app
  gdc-worker run examples.scheduler.app --processes 2 --concurrency 64
  gdc-worker run myservice:app --handler plan_pin --embedded

{EXIT_CODES_HELP} With --processes, a replica that exits 3 stops them all with 3.
"""
)
@click.argument("target")
@url_option
@creds_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Handler calls in flight per handler and process.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Supervised replica processes.",
)
@click.option("--handler", "handlers", multiple=True, help="Run only this handler (repeatable).")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    help="json: one object per line, with event_id, trace_id, handler... on delivery lines.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar=METRICS_PORT_ENVVAR,
    help="Serve /metrics, /healthz and /readyz on this port (env GDC_METRICS_PORT; "
    "with --processes, one endpoint for the group).",
)
@click.option(
    "--grace",
    type=FiniteFloat(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running handlers get to finish on shutdown.",
)
@click.option(
    "--embedded",
    is_flag=True,
    help="Start a nats-server on 127.0.0.1:4222 (or --embedded-port), its store in ./.gdc-nats.",
)
@click.option(
    "--embedded-port",
    type=click.IntRange(0, 65535),
    default=EMBEDDED_PORT,
    show_default=True,
    help="Port of the --embedded server (0: a free one).",
)
@click.pass_context
def run(
    ctx: click.Context,
    target: str,
    url: str | None,
    creds: str | None,
    concurrency: int | None,
    processes: int,
    handlers: tuple[str, ...],
    log_level: str,
    log_format: str,
    metrics_port: int | None,
    grace: float,
    embedded: bool,
    embedded_port: int,
) -> None:
    """Run the handlers of the App TARGET (module:app or module.app) until SIGTERM or Ctrl-C."""
    if not embedded and ctx.get_parameter_source("embedded_port") != ParameterSource.DEFAULT:
        raise click.UsageError("--embedded-port goes with --embedded", ctx)
    configure_logging(log_level, log_format)
    replica_dir = os.environ.get(REPLICA_METRICS_ENVVAR)
    supervisor_pid = _supervisor_pid()
    with reported_errors():
        app = load_app(target)
        # The standard port by default, so that other processes find it without being told.
        server = NATSServer(port=embedded_port, store_dir=Path(".gdc-nats")) if embedded else None
        if server is not None:
            server.start()
            logging.getLogger(__name__).info(
                "embedded nats-server at %s (store .gdc-nats)", server.url
            )
            url = server.url
        try:
            config = app.config.replace(**connection(url, creds))
            metrics = Metrics(app.name) if metrics_port is not None or replica_dir else None
            # Built here even for --processes, so a bad --handler fails once, not per replica.
            worker = Worker(
                app,
                config=config,
                concurrency=concurrency,
                handlers=handlers,
                grace=grace,
                hooks=[metrics] if metrics else [],
            )
            if metrics is not None:
                metrics.read_in_flight(worker.in_flight)
            if processes > 1:
                replica_args = ["--log-level", log_level, "--log-format", log_format]
                replica_args += ["--grace", str(grace)]
                replica_args += [f"--concurrency={concurrency}"] if concurrency else []
                replica_args += [f"--handler={name}" for name in handlers]
                durables = [spec.durable for spec in worker.specs]
                code = _supervise(target, replica_args, config, processes, metrics_port, durables)
                sys.exit(code)
            if metrics is not None and replica_dir:
                anyio.run(serve_replica, worker, metrics, Path(replica_dir), supervisor_pid)
            elif metrics is not None and metrics_port is not None:
                anyio.run(serve_monitored, worker, metrics, metrics_port)
            else:
                anyio.run(partial(serve, worker, supervisor_pid=supervisor_pid))
        finally:
            if server is not None:
                server.stop()
    _leave_stuck_threads()


def _supervise(
    target: str,
    args: list[str],
    config: NATSConfig,
    processes: int,
    metrics_port: int | None,
    durables: list[str],
) -> int:
    """Check NATS once, then run `processes` replicas of `gdc-worker run TARGET ARGS...`,
    with one metrics endpoint for them all on `metrics_port`."""
    # Connect and set up the streams here first: NATS out of reach (4) or a stream of another
    # shape (1) is one error line, not N replicas restarted over and over. With an outbox the
    # replicas start during an outage and wait for NATS themselves.
    if not config.outbox_path:
        anyio.run(_preflight, config)
    command = [sys.executable, "-m", "gdc_worker", "run", target, *args]
    # The URL goes in the environment, not on the command line, where `ps` shows a password.
    env = {**os.environ, URL_ENVVAR: config.url, SUPERVISOR_PID_ENVVAR: str(os.getpid())}
    env.pop(METRICS_PORT_ENVVAR, None)  # the supervisor serves the port, not each replica
    if config.creds_file:
        env[CREDS_ENVVAR] = config.creds_file
    fatal = {EXIT_USAGE: "bad usage", EXIT_IMPORT: "the app cannot be imported"}
    if metrics_port is None:
        return supervise(command, processes, env=env, fatal_codes=fatal)
    directory = Path(tempfile.mkdtemp(prefix="gdc-worker-metrics-"))
    try:
        env[REPLICA_METRICS_ENVVAR] = str(directory)
        with GroupEndpoint(metrics_port, directory, processes, config, durables) as endpoint:
            return supervise(
                command, processes, env=env, fatal_codes=fatal, on_change=endpoint.replicas_changed
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _supervisor_pid() -> int | None:
    """The pid of the supervisor whose replica this process is; None if it is none's (a stale
    variable inherited from elsewhere names a process that is not our parent)."""
    value = os.environ.get(SUPERVISOR_PID_ENVVAR, "")
    return int(value) if value.isdigit() and int(value) == os.getppid() else None


async def _preflight(config: NATSConfig) -> None:
    async with await NATSEventBus.connect(config, name="gdc-worker:supervisor") as bus:
        await DeadLetterQueue(bus).ensure()


def _leave_stuck_threads() -> None:
    """Exit now if a timed-out or cancelled plain-function handler still runs in its thread.

    Python would wait for such a thread at exit, keeping a stopped worker alive indefinitely.
    """
    stuck = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if stuck:
        logging.getLogger(__name__).warning(
            "%d handler thread(s) still running after shutdown; exiting without them", len(stuck)
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_OK)
