"""The public API: what `gdc_worker` exports, as anyio checks its facade."""

import importlib
import inspect
import pkgutil

import pytest

import gdc_worker
from gdc_worker import EventType, GDCWorkerError
from gdc_worker.payloads import payload_types


def test_every_exported_name_exists_once_and_is_sorted() -> None:
    """Given `gdc_worker.__all__`, every name in it is importable, listed once, in order."""
    names = gdc_worker.__all__

    assert [name for name in names if not hasattr(gdc_worker, name)] == []
    assert len(set(names)) == len(names)
    assert names == sorted(names)


def test_every_exported_error_shares_the_root() -> None:
    """Given the exported exception types, each one a user can catch derives from
    GDCWorkerError, except the two a handler raises on purpose (Retry, Reject)."""
    errors = {
        name
        for name in gdc_worker.__all__
        if isinstance(getattr(gdc_worker, name), type)
        and issubclass(getattr(gdc_worker, name), BaseException)
    }

    outside = {name for name in errors if not issubclass(getattr(gdc_worker, name), GDCWorkerError)}
    assert outside == {"Retry", "Reject"}


def test_the_payload_type_of_every_gdc_event_type_is_exported() -> None:
    """Given the 17 GDC event types, each has a registered payload struct, importable from
    `gdc_worker` as `register_payload_type` is: a typed handler needs only the facade."""
    registry = payload_types()
    exported = [getattr(gdc_worker, name) for name in gdc_worker.__all__]

    assert [t for t in EventType if t not in registry] == []
    assert [registry[t].__name__ for t in EventType if registry[t] not in exported] == []
    assert gdc_worker.register_payload_type in exported


def _modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(gdc_worker.__path__, prefix="gdc_worker.")
        if info.name != "gdc_worker.__main__"
    ]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_every_module_lists_what_it_defines_for_others(name: str) -> None:
    """Given a module of the package,
    then it has an `__all__` whose names exist, sorted, and it names every public class and
    function the module itself defines (not the ones it imports)."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)

    assert exported is not None, f"{name} has no __all__"
    assert [n for n in exported if not hasattr(module, n)] == []
    assert list(exported) == sorted(exported, key=_ruff_order)
    defined = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    }
    assert defined - set(exported) == set()


def _ruff_order(name: str) -> tuple[int, str]:
    """ruff's `__all__` order: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name
