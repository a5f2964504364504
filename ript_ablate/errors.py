"""User-facing errors: the CLI prints these as one clear message, never a traceback."""

from __future__ import annotations


class RiptAblateError(Exception):
    """Base class for mistakes a user can fix (bad config, missing file, ...)."""


class ConfigError(RiptAblateError):
    """One or more configuration problems; `problems` holds every message, not only the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} configuration error(s){where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class CheckpointError(RiptAblateError):
    """A checkpoint file is missing, unreadable or does not fit the policy."""


class TrackingUnavailable(RiptAblateError):
    """The MLflow tracking store cannot be reached (a server down, a wrong host or port, a missing directory)."""


# Exceptions that say "the infrastructure is away", not "this cell is broken": matched by class name along the
# exception's chain, so this module imports neither MLflow, requests nor SQLAlchemy.
_INFRA_CLASS_NAMES = {"ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
                      "TimeoutError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NewConnectionError",
                      "OperationalError", "InterfaceError", "DisconnectionError", "TrackingUnavailable",
                      "RemoteDisconnected", "BrokenPipeError"}
_INFRA_PHRASES = ("connection refused", "max retries exceeded", "failed to establish a new connection",
                  "could not connect to server", "server closed the connection", "connection timed out",
                  "name or service not known", "temporary failure in name resolution", "database is locked",
                  "api request to endpoint")


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when `exc` (or one it was raised from) means a store or server is unreachable: such a failure is
    waited out and retried, never charged to the cell that happened to be running."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(c.__name__ in _INFRA_CLASS_NAMES for c in type(current).__mro__):
            return True
        text = str(current).lower()
        if any(phrase in text for phrase in _INFRA_PHRASES):
            return True
        current = current.__cause__ or current.__context__
    return False


def readable_error(exc: BaseException, limit: int = 300) -> str:
    """One line a user can read: the exception's class and the first line of its message, without the SQL
    statement, parameters or documentation links that database drivers append."""
    import re

    text = str(exc).strip()
    text = re.split(r"\n|\[SQL:|\[parameters:|\(Background on this error", text, maxsplit=1)[0].strip()
    wrapped = re.match(r"^\((?:[\w.]+\.)?(\w+)\)\s*(.*)$", text)  # "(psycopg2.OperationalError) x": the driver's
    line = (f"{wrapped.group(1)}: {wrapped.group(2)}" if wrapped
            else f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."
