"""Declaring a service, without a server: `@app.on` registration and what it refuses."""

from __future__ import annotations

import inspect
import math
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import anyio
import pytest

from gdc_worker import (
    App,
    Context,
    Event,
    EventType,
    GDCWorkerError,
    HandlerDefinitionError,
    NATSConfig,
    RetryPolicy,
    Worker,
    WorkerError,
    new_node_up_event,
)
from gdc_worker.app import as_async
from gdc_worker.retry import DEFAULT_BACKOFF, DEFAULT_RETRY

# -- accepted handlers ---------------------------------------------------------------------------


async def async_event(event: Event) -> None:
    pass


async def async_event_ctx(event: Event, ctx: Context) -> None:
    pass


def sync_event(event: Event) -> None:
    pass


def sync_event_ctx(event: Event, ctx: Context) -> None:
    pass


async def optional_ctx(event: Event, ctx: Context | None = None) -> None:
    pass


async def varargs(*args: Any) -> None:
    pass


async def keyword_only_with_default(event: Event, *, verbose: bool = False) -> None:
    pass


class AsyncAuditor:
    """A callable object with an async `__call__(event, ctx)`."""

    async def __call__(self, event: Event, ctx: Context) -> None:
        pass


class SyncAuditor:
    """A callable object with a plain `__call__(event)`."""

    def __call__(self, event: Event) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "name", "takes_context"),
    [
        (async_event, "async_event", False),
        (async_event_ctx, "async_event_ctx", True),
        (sync_event, "sync_event", False),
        (sync_event_ctx, "sync_event_ctx", True),
        (optional_ctx, "optional_ctx", True),
        (varargs, "varargs", True),
        (keyword_only_with_default, "keyword_only_with_default", False),
        (AsyncAuditor(), "AsyncAuditor", True),
        (SyncAuditor(), "SyncAuditor", False),
    ],
)
def test_accepted_handler_signatures_register_with_or_without_context(
    handler: Callable[..., Any], name: str, takes_context: bool
) -> None:
    """Given a function or callable object taking (event) or (event, ctx), sync or async,
    when it is decorated with `@app.on`,
    then the decorator returns it unchanged and registers it under its name, called with a
    context exactly when it takes a second argument, through an async `call`."""
    app = App("svc")

    returned = app.on("node.up")(handler)

    assert returned is handler
    spec = app.handlers[name]
    assert (spec.name, spec.func, spec.takes_context) == (name, handler, takes_context)
    assert inspect.iscoroutinefunction(spec.call)


@pytest.mark.anyio
async def test_a_sync_handler_is_called_in_a_worker_thread() -> None:
    """Given a plain (non-async) handler,
    when the worker calls it through its spec,
    then it runs in a thread other than the event loop's and gets the event."""
    app = App("svc")
    seen: list[tuple[str, int]] = []

    @app.on("node.up")
    def blocking(event: Event) -> None:
        seen.append((event.id, threading.get_ident()))

    event = new_node_up_event("monitor", "node-1")
    await app.handlers["blocking"].call(event)

    [(event_id, thread)] = seen
    assert event_id == event.id
    assert thread != threading.get_ident()


def test_registration_keeps_the_pattern_and_options() -> None:
    """Given a handler registered with every option,
    when its spec is read,
    then it holds the pattern and options as given (backoff as a tuple)."""
    app = App("svc")
    policy = RetryPolicy.attempts(2)

    @app.on(
        "pin.*",
        durable="pins",
        max_deliver=7,
        ack_wait=12.5,
        backoff=[0.5, 1.5],
        retry=policy,
        timeout=3.0,
        concurrency=4,
        max_ack_pending=50,
    )
    async def pins(event: Event) -> None:
        pass

    spec = app.handlers["pins"]
    assert (spec.pattern, spec.durable, spec.max_deliver, spec.ack_wait) == (
        "pin.*",
        "pins",
        7,
        12.5,
    )
    assert (spec.backoff, spec.retry, spec.timeout) == ((0.5, 1.5), policy, 3.0)
    assert (spec.concurrency, spec.max_ack_pending) == (4, 50)


def test_registration_defaults() -> None:
    """Given a handler registered with no options,
    when its spec is read,
    then it has the documented defaults (5 deliveries, 30 s ack wait, the default backoff and
    retries, no timeout, the app's concurrency)."""
    app = App("svc")

    @app.on(EventType.NODE_UP)
    async def handle(event: Event) -> None:
        pass

    spec = app.handlers["handle"]
    assert spec.pattern == "node.up"
    assert (spec.max_deliver, spec.ack_wait, spec.backoff) == (5, 30.0, DEFAULT_BACKOFF)
    assert (spec.retry, spec.timeout, spec.concurrency, spec.max_ack_pending) == (
        DEFAULT_RETRY,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("app_name", "durable"),
    [
        ("svc", "svc-handle_pin"),
        ("my.svc", "my-svc-handle_pin"),
        ("gdc.scheduler.v2", "gdc-scheduler-v2-handle_pin"),
    ],
)
def test_default_durable_is_app_dash_function_made_safe(app_name: str, durable: str) -> None:
    """Given an app whose name may hold dots,
    when a handler is registered without `durable=`,
    then its durable is `<app>-<function>` with dots replaced by '-' (a valid consumer name)."""
    app = App(app_name)

    @app.on("pin.requested")
    async def handle_pin(event: Event) -> None:
        pass

    assert app.handlers["handle_pin"].durable == durable


def test_two_apps_get_different_durables_for_the_same_function_name() -> None:
    """Given two apps with a handler of the same name,
    when both register,
    then their durables differ, so each app gets its own copy of every event."""
    scheduler, auditor = App("scheduler"), App("auditor")
    for app in (scheduler, auditor):
        app.on("pin.requested")(async_event)

    durables = {app.handlers["async_event"].durable for app in (scheduler, auditor)}
    assert durables == {"scheduler-async_event", "auditor-async_event"}


def test_app_config_is_the_one_given_else_read_from_the_environment_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given an app with a config and one without,
    when `GDC_NATS_URL` is set after they were created,
    then the first keeps its config and the second reads the environment at that moment."""
    config = NATSConfig(url="nats://given:4222")
    given, from_env = App("a", config), App("b")

    monkeypatch.setenv("GDC_NATS_URL", "nats://from-env:4222")

    assert given.config is config
    assert from_env.config.url == "nats://from-env:4222"


# -- refused handlers ----------------------------------------------------------------------------


def refused(match: str) -> pytest.RaisesExc[HandlerDefinitionError]:
    return pytest.raises(HandlerDefinitionError, match=match)


def test_definition_errors_are_gdc_worker_errors_and_type_errors() -> None:
    """Given a handler that cannot work,
    when it is decorated,
    then the error can be caught as HandlerDefinitionError, GDCWorkerError or TypeError."""
    app = App("svc")

    with pytest.raises(HandlerDefinitionError) as caught:
        app.on("node.up", max_deliver=0)(async_event)

    assert isinstance(caught.value, GDCWorkerError)
    assert isinstance(caught.value, TypeError)


def test_the_same_durable_twice_is_refused_naming_both() -> None:
    """Given a handler registered with `durable="shared"`,
    when another handler of the app asks for the same durable,
    then it is refused naming the durable and the first handler (they would split events)."""
    app = App("svc")
    app.on("pin.requested", durable="shared")(async_event)

    with refused(r"durable 'shared' is already used by handler 'async_event'"):
        app.on("pin.completed", durable="shared")(sync_event)

    assert list(app.handlers) == ["async_event"]


def test_the_same_function_name_twice_is_refused() -> None:
    """Given a handler registered as `handle` for one type,
    when a second function also named `handle` is registered for another type,
    then it is refused (its default durable is taken) and the first stays registered."""
    app = App("svc")

    @app.on("pin.requested")
    async def handle(event: Event) -> None:
        pass

    first = handle
    with refused(r"durable 'svc-handle' is already used by handler 'handle'"):

        @app.on("pin.completed")
        async def handle(event: Event) -> None:
            pass

    assert app.handlers["handle"].func is first


def test_the_same_function_name_with_another_durable_is_refused() -> None:
    """Given a handler registered as `handle`,
    when another function named `handle` registers with a durable of its own,
    then it is refused: handlers are selected by name (`--handler`)."""
    app = App("svc")
    app.on("pin.requested")(async_event)

    with refused(r"a handler named 'async_event' is already registered"):
        app.on("pin.completed", durable="other")(async_event)


@pytest.mark.parametrize(
    "pattern", ["pin..x", "a.>.b", "", "pin.", "pin requested", "pin.*x", "pin.requested\n"]
)
def test_a_malformed_pattern_is_refused_naming_it(pattern: str) -> None:
    """Given a malformed event type or pattern,
    when `@app.on` is called with it,
    then it is refused at once, naming the pattern."""
    app = App("svc")

    with refused(re.escape(repr(pattern))):
        app.on(pattern)(async_event)

    assert app.handlers == {}


async def no_args() -> None:
    pass


async def three_required(event: Event, ctx: Context, extra: int) -> None:
    pass


async def required_keyword_only(event: Event, *, flag: bool) -> None:
    pass


async def keywords_only(**kwargs: Any) -> None:
    pass


@pytest.mark.parametrize(
    "handler",
    [no_args, three_required, required_keyword_only, keywords_only],
    ids=["no-args", "three-required", "required-keyword-only", "only-kwargs"],
)
def test_a_handler_with_an_unusable_signature_is_refused(handler: Callable[..., Any]) -> None:
    """Given a handler that cannot be called as (event) or (event, ctx),
    when it is decorated,
    then it is refused at decoration time, naming the handler and what it must take."""
    app = App("svc")

    with refused(rf"handler '{handler.__qualname__}' must take \(event\) or \(event, ctx\)"):
        app.on("node.up")(handler)

    assert app.handlers == {}


def test_something_not_callable_is_refused() -> None:
    """Given a value that is not a function,
    when it is decorated,
    then it is refused saying it is not callable."""
    app = App("svc")

    with refused("is not callable"):
        app.on("node.up")(cast(Any, 42))


def sync_generator(event: Event) -> Iterator[None]:
    yield


async def async_generator(event: Event) -> AsyncIterator[None]:
    yield


class GeneratorCall:
    def __call__(self, event: Event) -> Iterator[None]:
        yield


@pytest.mark.parametrize(
    "handler", [sync_generator, async_generator, GeneratorCall()], ids=["def", "async", "call"]
)
def test_a_generator_function_is_refused(handler: Callable[..., Any]) -> None:
    """Given a handler with `yield` in it (a plain or async generator function, or an object
    whose __call__ is one), whose call would run none of its body,
    when it is decorated,
    then it is refused saying it is a generator function, and nothing is registered (it
    would have been acked unhandled at every event)."""
    app = App("svc")

    with refused("is a generator function"):
        app.on("node.up", durable="gen")(handler)

    assert app.handlers == {}


def test_a_lambda_needs_an_explicit_durable() -> None:
    """Given a lambda (its name `<lambda>` is no consumer name),
    when it is registered without `durable=`, then with one,
    then the first is refused naming the durable, the second registers."""
    app = App("svc")

    with refused(r"durable 'svc-<lambda.*' may hold only letters, digits, '-' and '_'"):
        app.on("node.up")(lambda event: None)
    app.on("node.up", durable="svc-lambda")(lambda event: None)

    assert app.handlers["<lambda>"].durable == "svc-lambda"


@pytest.mark.parametrize("durable", ["pin.audit", "pin audit", "pin>", "pin*", "ü"])
def test_an_invalid_durable_is_refused_naming_it(durable: str) -> None:
    """Given a durable name with characters a consumer name cannot hold,
    when a handler is registered with it,
    then it is refused, naming it."""
    with refused(re.escape(repr(durable))):
        App("svc").on("node.up", durable=durable)(async_event)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_deliver": 0}, "max_deliver must be at least 1, got 0"),
        ({"max_deliver": -1}, "max_deliver must be at least 1, got -1"),
        ({"ack_wait": 0}, "ack_wait must be a positive number of seconds, got 0"),
        ({"ack_wait": -1.5}, "ack_wait must be a positive number of seconds, got -1.5"),
        ({"ack_wait": math.nan}, "ack_wait must be a positive number of seconds, got nan"),
        ({"ack_wait": math.inf}, "ack_wait must be a positive number of seconds, got inf"),
        (
            {"backoff": (1.0, -0.5)},
            "backoff must be one or more delays >= 0 seconds, got [1.0, -0.5]",
        ),
        ({"backoff": ()}, "backoff must be one or more delays >= 0 seconds, got []"),
        (
            {"backoff": (1.0, math.inf)},
            "backoff must be one or more delays >= 0 seconds, got [1.0, inf]",
        ),
        ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
        ({"timeout": -2.0}, "timeout must be a positive number of seconds, got -2.0"),
        ({"timeout": math.nan}, "timeout must be a positive number of seconds, got nan"),
        ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
        ({"max_ack_pending": 0}, "max_ack_pending must be at least 1, got 0"),
    ],
)
def test_invalid_options_are_refused_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    """Given an option with a value that cannot work,
    when `@app.on` is called with it,
    then it is refused before any handler is registered, naming the option and the value."""
    app = App("svc")

    with refused(re.escape(message)):
        app.on("node.up", **options)(async_event)

    assert app.handlers == {}


def test_several_invalid_options_are_reported_together() -> None:
    """Given two invalid options,
    when `@app.on` is called with them,
    then one error names both, so they are fixed in one go."""
    with refused(r"max_deliver must be at least 1.*; timeout must be a positive number"):
        App("svc").on("node.up", max_deliver=0, timeout=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("", {}, "app name '' must be letters, digits"),
        ("svc/x", {}, "app name 'svc/x' must be letters, digits"),
        ("my svc", {}, "app name 'my svc' must be letters, digits"),
        ("pin.*", {}, "app name 'pin.*' must be letters, digits"),
        ("svc", {"concurrency": 0}, "concurrency must be at least 1, got 0"),
    ],
)
def test_an_invalid_app_is_refused(name: str, kwargs: dict[str, Any], message: str) -> None:
    """Given an empty or unsafe app name, or an app concurrency of 0,
    when the App is created,
    then it is refused naming the problem."""
    with refused(re.escape(message)):
        App(name, **kwargs)


# -- choosing handlers to run --------------------------------------------------------------------


def two_handler_app() -> App:
    app = App("svc")
    app.on("pin.requested")(async_event)
    app.on("pin.completed")(sync_event)
    return app


def test_a_worker_runs_every_handler_by_default_or_the_ones_named() -> None:
    """Given an app with two handlers,
    when a worker is created without and with `handlers=`,
    then it runs both, or only the named one."""
    app = two_handler_app()

    assert [s.name for s in Worker(app).specs] == ["async_event", "sync_event"]
    assert [s.name for s in Worker(app, handlers=["sync_event"]).specs] == ["sync_event"]


def test_a_worker_for_an_unknown_handler_is_refused_naming_the_known_ones() -> None:
    """Given an app with two handlers,
    when a worker is asked for a handler the app does not have,
    then it raises WorkerError naming the unknown one and the ones the app has."""
    with pytest.raises(WorkerError) as caught:
        Worker(two_handler_app(), handlers=["nope", "async_event"])

    message = str(caught.value)
    assert "no handler named nope" in message
    assert "it has: async_event, sync_event" in message


def test_a_worker_for_an_app_without_handlers_is_refused() -> None:
    """Given an app with no handlers,
    when a worker is created for it,
    then it raises WorkerError (a GDCWorkerError) saying to decorate functions."""
    with pytest.raises(WorkerError, match=r"app 'svc' has no handlers.*@app\.on") as caught:
        Worker(App("svc"))

    assert isinstance(caught.value, GDCWorkerError)


def test_a_worker_with_concurrency_zero_is_refused() -> None:
    """Given an app with a handler,
    when a worker is created with concurrency 0,
    then it raises HandlerDefinitionError naming the value, as App and @app.on do."""
    with pytest.raises(HandlerDefinitionError, match="concurrency must be at least 1, got 0"):
        Worker(two_handler_app(), concurrency=0)


async def _double(value: int) -> int:
    return 2 * value


def test_a_plain_function_returning_a_coroutine_is_awaited() -> None:
    """Given a plain function that returns a coroutine (a sync decorator around an async
    handler), when called through the worker's adapter, the coroutine is run, not dropped."""

    def wrapper(value: int) -> Any:
        return _double(value)

    assert anyio.run(as_async(wrapper), 21) == 42
