"""One progress display for long work (BC steps, rollouts, evaluation), quiet when output is not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: a long message stays one line (a terminal wraps it whole) instead of being cut into fragments at
# 80 columns, which is also the width rich assumes when the output is a file or a pipe.
console = Console(stderr=True, soft_wrap=True)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
