"""What every attempt of a cell shares, whichever trainer it runs: its files (`run.json` written as soon as its
MLflow run exists, `result.json` at the end), its lease (the fencing check before every write that matters) and
its pruning (the Optuna trial it reports to, and the rule that stops a seed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
RUN_FILE = "run.json"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S, group: bool = False) -> int:
    """SIGTERM to the process (or its whole process group), SIGKILL after `grace` seconds; its exit code."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # it (or its group) has already gone
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class LeaseLost(Exception):
    """This attempt's trial is no longer RUNNING in the study storage: another worker declared this one dead
    (e.g. it was paused past its lease) and the cell's next attempt owns the cell directory now."""


def prune_decision(trial: Any, store: Any, config_id: str, iteration: int, n_iterations: int) -> str | None:
    """Why to stop this seed now, or None. Never at the run's last evaluation (the result is complete: pruning would
    only discard it); one configuration ends in one state: a seed stops when another seed of its configuration was
    pruned, and is never pruned once another seed of it finished; otherwise the study's pruner decides."""
    if iteration >= n_iterations:
        return None
    siblings = store.seed_states(config_id, exclude_trial=trial._trial_id)
    if "PRUNED" in siblings:
        return f"pruned at iteration {iteration} with its configuration (another seed was pruned)"
    if "COMPLETE" in siblings:
        return None
    if trial.should_prune():
        return f"pruned at iteration {iteration}"
    return None


def lease_guard(job: dict[str, Any]) -> Callable[[], None] | None:
    """A fencing check run before every write that matters (history line, checkpoint, MLflow update): the
    attempt's trial (its lease generation) must still be RUNNING. None when the job carries no lease."""
    lease = job.get("lease")
    if not lease:
        return None
    from optuna.trial import TrialState

    from ript_ablate.errors import is_infrastructure_error
    from ript_ablate.study.store import open_storage

    storage = open_storage(lease["storage"])
    trial_id = int(lease["trial_id"])

    def check() -> None:
        try:
            state = storage.get_trial(trial_id).state
        except Exception as exc:  # the storage is away: nobody can take the lease meanwhile; the finish decides
            if is_infrastructure_error(exc):
                return
            raise
        if state != TrialState.RUNNING:
            raise LeaseLost(f"trial {trial_id} is {state.name}: this attempt lost its lease")

    return check


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def pruning_trial(job: dict[str, Any]):
    """(the cell's Optuna trial, the study store), for report/should_prune and the configuration's other seeds;
    None when the study has no pruner."""
    pruning = job.get("pruning")
    if not pruning:
        return None
    import optuna

    from ript_ablate.study.spec import load_study
    from ript_ablate.study.store import StudyStore

    store = StudyStore(load_study(pruning["spec"], pruning.get("output_dir")), pruning["storage"], create=False)
    return optuna.trial.Trial(store.cells, int(pruning["trial_id"])), store
