"""One progress display for long work (BC steps, rollouts, evaluation): a live bar on a terminal; off a terminal
(a log file, CI, a batch job) a plain line per task at most once a minute and when it ends, so a log of hours of
LIBERO evaluation still says where the work is."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: a long message stays one line (a terminal wraps it whole) instead of being cut into fragments at
# 80 columns, which is also the width rich assumes when the output is a file or a pipe.
console = Console(stderr=True, soft_wrap=True)
LOG_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LoggedProgress(Progress):
    """rich's Progress; when its live display is off (output not a terminal), it logs plain lines instead."""

    def __init__(self, *columns, log_every_s: float = LOG_EVERY_S, **kwargs):
        super().__init__(*columns, **kwargs)
        self.log_every_s = log_every_s
        self._logged: dict[TaskID, float] = {}
        self._finished: set[TaskID] = set()

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._logged[task_id] = time.monotonic()
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if not self.disable or task_id in self._finished:
            return
        task = self._tasks[task_id]
        done = task.total is not None and task.completed >= task.total
        now = time.monotonic()
        if not done and now - self._logged[task_id] < self.log_every_s:
            return
        self._logged[task_id] = now
        status = task.fields.get("status") or ""
        line = f"{task.description}: {task.completed:g}/{task.total:g} after {_duration(task.elapsed or 0.0)}"
        if done:
            self._finished.add(task_id)
        elif task.time_remaining is not None:
            line += f", about {_duration(task.time_remaining)} left"
        console.print(line + (f" ({status})" if status else ""), highlight=False, markup=False)


def progress() -> Progress:
    return LoggedProgress(
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
