"""Long work says where it is: a live bar on a terminal, plain lines in a log (CI, a batch job)."""

from __future__ import annotations

from ript_ablate import progress as progress_module


def test_off_a_terminal_progress_is_logged_at_most_once_a_period_and_at_the_end(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    with progress_module.progress() as bar:
        assert bar.disable  # pytest's captured stderr is not a terminal
        task = bar.add_task("evaluation", total=10, status="")
        bar.advance(task, 3)  # within the first minute: nothing yet
        clock[0] = 61.0
        bar.advance(task, 2)  # a minute on: one line
        clock[0] = 70.0
        bar.update(task, completed=7, status="loss 0.5")  # within the minute again: nothing
        bar.advance(task, 3)  # the end: always a line, and only one
        bar.advance(task, 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("evaluation: 5/10 after ")
    assert lines[1].startswith("evaluation: 10/10 after ") and lines[1].endswith("(loss 0.5)")
