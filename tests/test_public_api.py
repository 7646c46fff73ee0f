"""The public API: what `gdc_worker` exports, as anyio checks its facade."""

import gdc_worker
from gdc_worker import GDCWorkerError


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
