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
