"""One cell of a study: a full training run in its own process (`python -m ript_ablate.study.cell JOB.json`).

The worker writes the job file, starts this process and reads `result.json` when it exits. This process creates
the cell's MLflow child run (explicit parent run id, so it nests from any process), writes the run id to
`run.json` at once (so a worker can mark the run killed if this process dies), reports evaluations to the pruner,
and exits on its own if its worker dies (no orphaned trainings).

RIPT_ABLATE_INJECT_FAULT="<cell_id>@<attempt>[,...]" (attempt `*` = every attempt) makes the named attempts
raise after their first evaluation: a way to check that a study set-up retries and reports failures as expected.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

FAULT_ENV = "RIPT_ABLATE_INJECT_FAULT"
RESULT_FILE = "result.json"
RUN_FILE = "run.json"


class InjectedFault(RuntimeError):
    """Raised on purpose by RIPT_ABLATE_INJECT_FAULT."""


class Pruned(Exception):
    """The study's pruner stopped this run after an evaluation."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def fault_planned(cell_id: str, attempt: int, spec: str | None = None) -> bool:
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, when = item.partition("@")
        if name == cell_id and when in ("*", str(attempt)):
            return True
    return False


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

    from ript_ablate.config import config_from_dict
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
    cfg = config_from_dict(data, f"cell {job['cell_id']}")
    tags = {**job["tags"], "ript.attempt": str(job["attempt"])}
    if checkpoint:
        tags["ript.resumed_from"] = checkpoint
    track = job.get("tracking", {})

    if track.get("enabled", True):
        class CellTracker(MlflowTracker):
            def start(self, params: dict[str, Any], run_tags: dict[str, str]) -> None:
                super().start(params, {**run_tags, **tags})
                write_json(out / RUN_FILE, {"mlflow_run_id": self.run_id})

        tracker: Tracker = CellTracker(track.get("uri"), track["experiment"], track.get("run_name"),
                                       parent_run_id=track.get("parent_run_id"))
    else:
        tracker = Tracker()

    objective = job["objective"]
    pruning_trial = _pruning_trial(job)

    inject = fault_planned(job["cell_id"], int(job["attempt"]))

    def on_eval(iteration: int, metrics: dict[str, float]) -> None:
        if inject:  # after the first evaluation, so the run exists in MLflow as a real failure's would
            raise InjectedFault(f"injected fault ({FAULT_ENV}) in {job['cell_id']} attempt {job['attempt']}")
        if pruning_trial is None or objective["metric"] not in metrics:
            return
        pruning_trial.report(float(metrics[objective["metric"]]), iteration)
        if pruning_trial.should_prune():
            raise Pruned(f"pruned at iteration {iteration}")

    start = time.perf_counter()
    result: dict[str, Any] = {"resumed_from": checkpoint}
    try:
        trained = Trainer(cfg, tracker, on_eval=on_eval, prior_history=prior).run(out)
        history = trained.history
        result["status"] = trained.status
    except Pruned as exc:
        history = _read_history(out)
        result.update(status="pruned", reason=str(exc))
    except Exception as exc:  # the worker decides about retries; the reason is kept for `study status`
        history = _read_history(out)
        result.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    result["train_s"] = time.perf_counter() - start
    points = metric_points(history, objective["metric"])
    result["value"] = reduce_points(points, objective["reduction"], objective["direction"]) if points else None
    result["points"] = points
    result["mlflow_run_id"] = getattr(tracker, "run_id", None)
    if result["mlflow_run_id"]:
        status_tag = result["status"] if result["status"] != "error" else "failed"
        try:
            tracker.set_tags({"ript.status": status_tag,  # type: ignore[attr-defined]
                              **({"ript.reason": result["reason"][:5000]} if "reason" in result else {})})
            if result["value"] is not None:
                tracker.record({"study/objective": result["value"]}, points[-1][0])
        finally:
            mlflow_status = {"finished": "FINISHED", "pruned": "KILLED"}.get(result["status"], "FAILED")
            tracker.end(mlflow_status)
    return result


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
    """The cell's Optuna trial, for report/should_prune; None when the study has no pruner."""
    pruning = job.get("pruning")
    if not pruning:
        return None
    import optuna

    from ript_ablate.study.spec import load_study
    from ript_ablate.study.store import StudyStore

    store = StudyStore(load_study(pruning["spec"], pruning.get("output_dir")), pruning["storage"], create=False)
    return optuna.trial.Trial(store.cells, int(pruning["trial_id"]))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job_path = Path(args[0])
    job = json.loads(job_path.read_text())
    exit_with_parent(int(job["parent_pid"]))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        result = run_job(job)
    except Exception as exc:  # a failure outside the training itself (MLflow unreachable, bad job)
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    write_json(job_path.parent / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
