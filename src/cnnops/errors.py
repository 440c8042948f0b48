"""The errors cnnops raises for things a user can fix.

Every message names the file, key or value at fault and says what to do; the CLI prints it
without a traceback and exits 1.
"""


class CnnopsError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""


class ConfigError(CnnopsError):
    """params.yaml (or an override) has an unknown key, a wrong type or an out-of-range value."""


class DataError(CnnopsError):
    """The images under data/ break the data contract (unreadable, empty class, one class, ...)."""


class ValidationFailed(DataError):
    """An error-level data expectation failed; the report names the offending files."""


class WeightsNotFoundError(CnnopsError):
    """Pretrained weights are not in TORCH_HOME (cnnops never downloads at run time), or the cached
    file there is not the published one (its sha256 or its contents are wrong)."""


class ExportError(CnnopsError):
    """The ONNX export or its parity check against PyTorch failed."""


class StageInputError(CnnopsError):
    """A stage's input (checkpoint, prepared split, report) is missing or from another run."""


# `cnnops` exits with TRANSIENT_EXIT (EX_TEMPFAIL of sysexits.h) when it failed for a reason of the
# moment, a server or database that did not answer; the flows retry a stage only for that exit status.
TRANSIENT_EXIT = 75
# Exceptions that say a server or database did not answer, told by class, never by their text (which
# can hold a user's file name). requests is MLflow's, named so that it need not be imported here.
_UNANSWERED = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_UNANSWERED_NAMES = frozenset(
    {"requests.exceptions.ConnectionError", "requests.exceptions.Timeout", "requests.exceptions.RetryError"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, says a server or database
    did not answer: MLflow wraps the requests error it got, SQLAlchemy the sqlite3 one."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _unanswered(current):
            return True
        todo += [linked for linked in (current.__cause__, current.__context__) if linked is not None]
    return False


def _unanswered(exc: BaseException) -> bool:
    import sqlite3

    if isinstance(exc, _UNANSWERED):
        return True
    if isinstance(exc, sqlite3.OperationalError) and str(exc) == "database is locked":  # SQLite's words
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" in _UNANSWERED_NAMES for cls in type(exc).__mro__)
