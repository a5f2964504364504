"""One cell of a study: a full training run in its own process (`python -m ript_ablate.study.cell JOB.json`).

The worker writes the job file, starts this process and reads `result.json` when it exits. This process creates
the cell's MLflow child run (explicit parent run id, so it nests from any process), writes the run id to the
attempt's `run.json` at once (so a worker can mark the run killed if this process dies), reports evaluations to
the pruner, and exits on its own if its worker dies (no orphaned trainings).

RIPT_ABLATE_INJECT_FAULT="<cell_id>@<attempt>[:infra][,...]" (attempt `*` = every attempt) makes the named
attempts raise after their first evaluation: a way to check that a study set-up retries and reports failures as
expected. `:infra` raises a connection error instead (once per attempt), as a tracking store that went away would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ript_ablate.tracking import tags as tag

FAULT_ENV = "RIPT_ABLATE_INJECT_FAULT"
RESULT_FILE = "result.json"
RUN_FILE = "run.json"


class InjectedFault(RuntimeError):
    """Raised on purpose by RIPT_ABLATE_INJECT_FAULT."""


class Pruned(Exception):
    """The study's pruner stopped this run after an evaluation."""


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


def fault_planned(cell_id: str, attempt: int, spec: str | None = None) -> str | None:
    """The kind of fault planned for this attempt: None, "error", "infra" or "stall"."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, when = item.partition("@")
        when, _, kind = when.partition(":")
        if name == cell_id and when in ("*", str(attempt)):
            return kind or "error"
    return None


def exit_with_parent(parent_pid: int) -> None:
    """A watchdog: when the worker that started this cell dies, stop (its lease will be recovered)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def resume_point(out: Path) -> tuple[str | None, list[dict[str, float]]]:
    """The latest complete checkpoint of an earlier attempt in this cell's directory and the history up to it."""
    from ript_ablate import checkpoints

    ckpts = sorted((out / "checkpoints").glob("iter_*")) if (out / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / checkpoints.META_FILE).is_file()]
    if not ckpts:
        return None, []
    latest = ckpts[-1]
    iteration = int(checkpoints.read_meta(latest).get("iteration", 0))
    return str(latest), [e for e in _read_history(out) if int(e["iteration"]) <= iteration]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ript_ablate.bc import ensure_base
    from ript_ablate.errors import is_infrastructure_error, readable_error
    from ript_ablate.plugins import checked_config_from_dict
    from ript_ablate.ript.trainer import Trainer
    from ript_ablate.study.objective import metric_points, reduce_points
    from ript_ablate.tracking import MlflowTracker, Tracker

    torch.set_num_threads(int(job["threads"]))
    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, prior = resume_point(out) if job.get("resume", True) else (None, [])
    data = job["config"]
    if checkpoint:
        data = {**data, "algo": {**data.get("algo", {}), "lora_adaptor_ckpt": checkpoint}}
    cfg = checked_config_from_dict(data, f"cell {job['cell_id']}")
    tags = {**job["tags"], tag.ATTEMPT: str(job["attempt"])}
    if checkpoint:
        tags[tag.RESUMED_FROM] = checkpoint
    track = job.get("tracking", {})

    if track.get("enabled", True):
        class CellTracker(MlflowTracker):
            def start(self, params: dict[str, Any], run_tags: dict[str, str]) -> None:
                super().start(params, {**run_tags, **tags})
                write_json(Path(job["attempt_dir"]) / RUN_FILE, {"mlflow_run_id": self.run_id})

        tracker: Tracker = CellTracker(track.get("uri"), track["experiment"], track.get("run_name"),
                                       parent_run_id=track.get("parent_run_id"))
    else:
        tracker = Tracker()

    objective = job["objective"]
    pruning = _pruning_trial(job)
    guard = lease_guard(job)

    inject = fault_planned(job["cell_id"], int(job["attempt"]))
    if inject in ("infra", "stall") and int(job.get("infra_failures", 0)) > 0:
        inject = None  # an injected outage or stop happens once; the attempt's next run goes through

    def on_eval(iteration: int, metrics: dict[str, float]) -> None:
        while inject == "stall":  # a cell that is surely still running when the user stops the study
            time.sleep(0.5)
        if inject == "infra":
            raise ConnectionRefusedError(f"injected outage ({FAULT_ENV}): connection refused by the tracking store")
        if inject:  # after the first evaluation, so the run exists in MLflow as a real failure's would
            raise InjectedFault(f"injected fault ({FAULT_ENV}) in {job['cell_id']} attempt {job['attempt']}")
        if pruning is None or objective["metric"] not in metrics:
            return
        trial, store = pruning
        trial.report(float(metrics[objective["metric"]]), iteration)
        why = prune_decision(trial, store, job["tags"][tag.CONFIG_ID], iteration, cfg.training.n_iterations)
        if why:
            raise Pruned(why)

    start = time.perf_counter()
    result: dict[str, Any] = {"resumed_from": checkpoint}
    try:
        ensure_base(cfg)  # normally a cache hit: the runner builds the bases before its workers start
        trained = Trainer(cfg, tracker, on_eval=on_eval, prior_history=prior, guard=guard).run(out)
        history = trained.history
        result["status"] = trained.status
    except Pruned as exc:
        history = _read_history(out)
        result.update(status="pruned", reason=str(exc))
    except LeaseLost as exc:  # write nothing more: the cell's next attempt owns its directory and its result
        _end_lease_lost(tracker, exc)
        return {**result, "status": "lease_lost", "reason": str(exc), "train_s": time.perf_counter() - start,
                "mlflow_run_id": getattr(tracker, "run_id", None)}
    except Exception as exc:  # the worker decides about retries; the reason is kept for `study status`
        history = _read_history(out)
        result.update(failure(exc))
    result["train_s"] = time.perf_counter() - start
    points = metric_points(history, objective["metric"])
    result["value"] = reduce_points(points, objective["reduction"], objective["direction"]) if points else None
    result["points"] = points
    result["mlflow_run_id"] = getattr(tracker, "run_id", None)
    if result["mlflow_run_id"]:
        try:
            if guard is not None:
                guard()
            status_tag = {"error": "failed", "infra": "infrastructure"}.get(result["status"], result["status"])
            tracker.set_tags(tag.outcome_tags(status_tag, result.get("reason")))  # type: ignore[attr-defined]
            if result["value"] is not None and result["status"] != "infra":
                tracker.record({"study/objective": result["value"]}, points[-1][0])
            tracker.end({"finished": "FINISHED", "pruned": "KILLED"}.get(result["status"], "FAILED"))
        except LeaseLost as exc:  # the next attempt owns the cell: this run ends KILLED and says why
            _end_lease_lost(tracker, exc)
            return {**result, "status": "lease_lost", "reason": str(exc)}
        except Exception as exc:  # the store went away at the end: the worker (or the next sweep) closes the run
            if not is_infrastructure_error(exc):
                raise
            result.update(status="infra", reason=readable_error(exc))
    return result


def failure(exc: BaseException) -> dict[str, str]:
    """A failed cell's result: "infra" when a store or server was away (retried without charging the cell),
    "error" otherwise, with a one-line reason and the traceback."""
    from ript_ablate.errors import is_infrastructure_error, readable_error

    return {"status": "infra" if is_infrastructure_error(exc) else "error", "reason": readable_error(exc),
            "traceback": traceback.format_exc()}


def _end_lease_lost(tracker: Any, exc: LeaseLost) -> None:
    """End this attempt's MLflow run KILLED, saying why, without writing the metrics it still buffered."""
    if getattr(tracker, "run_id", None):
        tracker.buffer.clear()
        tracker.set_tags(tag.outcome_tags("lease-lost", str(exc)))
        tracker.end("KILLED")


def _read_history(out: Path) -> list[dict[str, float]]:
    from ript_ablate.ript.trainer import HISTORY_LOG

    path = out / HISTORY_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash
    return entries


def _pruning_trial(job: dict[str, Any]):
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


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job_path = Path(args[0])
    job = json.loads(job_path.read_text())
    exit_with_parent(int(job["parent_pid"]))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        result = run_job(job)
    except Exception as exc:  # a failure outside the training itself (MLflow unreachable, bad job)
        result = failure(exc)
    write_json(job_path.parent / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
