"""Benchmarks: scripts that print measured figures (run by hand or `make bench`), never timed unit tests."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's main; a user mistake (bad config, missing file) is one clear line, not a traceback."""
    from ript_ablate.errors import RiptAblateError

    try:
        main()
    except RiptAblateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
