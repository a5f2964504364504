"""Running one cell of a study over your own trainer (see `command.py`): write the cell's YAML, create its MLflow
child run, start the command with the run's coordinates in its environment, and until it exits stream its
metrics file into the run (the `jsonl` route), report the objective to the pruner, and check the lease.

The command runs in the cell's process group, so the worker's SIGTERM-then-SIGKILL of the group (timeout, signal)
reaches it, and so does the cell's own stop when the worker dies. A failure's reason is the exit code and the last
lines of the command's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ript_ablate.study.command import CONFIG_FILE, flatten_dotted, format_args
from ript_ablate.tracking import tags as tag

POLL_S = 0.1  # how often the metrics file and the process are looked at (the cell ends when your command does)
MLFLOW_POLL_S = 2.0  # how often the objective is read back from MLflow for the pruner (mlflow route)
TAIL_LINES = 15  # lines of the command's output kept as a failure's reason


class JsonlStream:
    """New complete lines of a metrics file the command appends to: (step, {metric: value}) each. A line cut short
    (still being written) waits for its end; a line that is not a JSON object with a numeric step is counted and
    skipped."""

    def __init__(self, path: Path, step_key: str):
        self.path, self.step_key = path, step_key
        self.offset = 0
        self.skipped = 0

    def read(self) -> list[tuple[int, dict[str, float]]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for raw in data[:end].splitlines():
            try:
                entry = json.loads(raw)
                step = int(entry[self.step_key])
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
                continue
            metrics = {k: float(v) for k, v in entry.items()
                       if k != self.step_key and isinstance(v, (int, float)) and not isinstance(v, bool)}
            out.append((step, metrics))
        return out


def cuda_visible_devices(device: str) -> str:
    """The worker's device(s) as the command sees them: cuda:1 -> "1" (its only GPU, as cuda:0); a multi-process
    cell's cuda:2,cuda:3 -> "2,3"; cpu -> "" (none)."""
    return ",".join(d.split(":", 1)[1] for d in device.split(",") if d.startswith("cuda:"))


def latest_checkpoint(out: Path, pattern: str | None) -> Path | None:
    """The newest file (by modification time) matching the spec's checkpoint glob in the cell's directory."""
    if not pattern:
        return None
    found = [p for p in out.glob(pattern) if p.exists()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def output_tail(log: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_command_job(job: dict[str, Any]) -> dict[str, Any]:
    from ript_ablate.study.attempt import (
        RUN_FILE,
        LeaseLost,
        lease_guard,
        prune_decision,
        pruning_trial,
        stop_process,
        write_json,
    )
    from ript_ablate.study.objective import reduce_points
    from ript_ablate.tracking.runs import client, create_run, experiment_id, log_metrics, metric_histories
    from ript_ablate.tracking.uri import absolute_tracking_uri

    command, objective = job["command"], job["objective"]
    out, attempt_dir = Path(job["output_dir"]).resolve(), Path(job["attempt_dir"])
    out.mkdir(parents=True, exist_ok=True)
    seed = int(job["tags"][tag.SEED])
    config_path = out / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(job["config"], sort_keys=False))
    values = {"python": sys.executable, "config": str(config_path), "output_dir": str(out), "seed": seed,
              "cell_id": job["cell_id"], "nproc": int(job.get("processes", 1))}
    args = format_args(command["run"], values)
    checkpoint = latest_checkpoint(out, command.get("resume_checkpoint"))
    metrics_path = out / command["metrics_file"]
    tags = {**job["tags"], tag.ATTEMPT: str(job["attempt"])}
    if checkpoint:
        args += format_args(command["resume_args"], {**values, "resume_from": str(checkpoint)})
        tags[tag.RESUMED_FROM] = str(checkpoint)
    else:
        if command.get("resume_checkpoint"):
            tags[tag.RESUMED_FROM] = f"none: no {command['resume_checkpoint']} in {out}, started from scratch"
        if command["metrics"] == "jsonl":
            metrics_path.unlink(missing_ok=True)  # a fresh start: an earlier attempt's lines are not this run's

    track = job["tracking"]
    uri = absolute_tracking_uri(track.get("uri"))
    mlflow = client(uri)
    experiment = experiment_id(mlflow, track["experiment"])
    run_tags = {**tags, **({tag.PARENT_RUN: track["parent_run_id"]} if track.get("parent_run_id") else {})}
    params = {"command": " ".join(args), **flatten_dotted(job["config"])}
    run_id = create_run(mlflow, experiment, track.get("run_name"), run_tags, params)
    write_json(attempt_dir / RUN_FILE, {"mlflow_run_id": run_id})

    env = {**os.environ, **command.get("env", {}), "RIPT_ABLATE_CELL_ID": job["cell_id"],
           "RIPT_ABLATE_SEED": str(seed), "RIPT_ABLATE_CONFIG": str(config_path), "RIPT_ABLATE_OUTPUT_DIR": str(out)}
    if command["metrics"] == "mlflow":
        env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=experiment, MLFLOW_RUN_ID=run_id)
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(job.get("device", "cpu"))

    guard = lease_guard(job)
    pruning = pruning_trial(job)
    stream = JsonlStream(metrics_path, command.get("step_key", "step")) if command["metrics"] == "jsonl" else None
    points: dict[int, float] = {}
    reported: set[int] = set()
    result: dict[str, Any] = {"mlflow_run_id": run_id, **({"resumed_from": str(checkpoint)} if checkpoint else {})}
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(args, cwd=command["cwd"], env=env)
    except OSError as exc:
        return _end(mlflow, run_id, {**result, "status": "error", "train_s": 0.0,
                                     "reason": f"could not start {args[0]!r} in {command['cwd']}: {exc}"})
    last_lease = last_poll = time.monotonic()
    try:
        while True:
            code = proc.poll()
            if stream is not None:
                rows = stream.read()
                if rows:
                    if guard is not None:
                        guard()
                    log_metrics(mlflow, run_id, [(k, v, step) for step, m in rows for k, v in m.items()])
                    points.update({step: m[objective["metric"]] for step, m in rows if objective["metric"] in m})
            elif pruning is not None and (time.monotonic() - last_poll >= MLFLOW_POLL_S or code is not None):
                last_poll = time.monotonic()
                points.update(metric_histories(uri, run_id, [objective["metric"]])[objective["metric"]])
            why = _prune(pruning, points, reported, job, prune_decision) if code is None else None
            if why:
                stop_process(proc)
                return _end(mlflow, run_id, {**result, "status": "pruned", "reason": why,
                                             "train_s": time.perf_counter() - start}, "KILLED")
            if guard is not None and time.monotonic() - last_lease >= float(job.get("heartbeat_s", 10.0)):
                last_lease = time.monotonic()
                guard()
            if code is not None:
                break
            time.sleep(POLL_S)
    except LeaseLost as exc:  # the cell's next attempt owns it: stop, and close this run as lease-lost
        stop_process(proc)
        mlflow.set_tag(run_id, tag.STATUS, "lease-lost")
        mlflow.set_terminated(run_id, "KILLED")
        return {**result, "status": "lease_lost", "reason": str(exc), "train_s": time.perf_counter() - start}
    result["train_s"] = time.perf_counter() - start
    if stream is None:
        points = metric_histories(uri, run_id, [objective["metric"]])[objective["metric"]]
    ordered = sorted(points.items())
    result["points"] = ordered
    result["value"] = reduce_points(ordered, objective["reduction"], objective["direction"]) if ordered else None
    if code != 0:
        tail = output_tail(attempt_dir / "output.log")
        return _end(mlflow, run_id, {**result, "status": "error", "reason": f"command exited with code {code}"
                                     + (f"; its last output:\n{tail}" if tail else " (no output)")})
    if stream is not None and stream.skipped:
        mlflow.set_tag(run_id, tag.METRICS_LINES_SKIPPED, str(stream.skipped))
    return _end(mlflow, run_id, {**result, "status": "finished"})


def _prune(pruning: Any, points: dict[int, float], reported: set[int], job: dict[str, Any], decide: Any) -> str | None:
    """Report each new objective point to the study's pruner; why to stop, or None."""
    if pruning is None:
        return None
    trial, store = pruning
    for step in sorted(set(points) - reported):
        reported.add(step)
        trial.report(points[step], step)
        why = decide(trial, store, job["tags"][tag.CONFIG_ID], step, int(job.get("n_iterations") or 0))
        if why:
            return why
    return None


def _end(mlflow: Any, run_id: str, result: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """Close the cell's run with the outcome (whatever status the command's own end_run() left) and return it."""
    from ript_ablate.tracking.runs import log_metrics

    status_tag = {"error": "failed"}.get(result["status"], result["status"])
    for key, value in tag.outcome_tags(status_tag, result.get("reason")).items():
        mlflow.set_tag(run_id, key, value)
    if result.get("value") is not None and result.get("points"):
        log_metrics(mlflow, run_id, [("study/objective", result["value"], result["points"][-1][0])])
    mlflow.set_terminated(run_id, status or ("FINISHED" if result["status"] == "finished" else "FAILED"))
    return result
