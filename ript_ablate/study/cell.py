"""One cell of a study: a full training run in its own process (`python -m ript_ablate.study.cell JOB.json`).

The worker writes the job file, starts this process and reads `result.json` when it exits. This process creates
the cell's MLflow child run (explicit parent run id, so it nests from any process), writes the run id to the
attempt's `run.json` at once (so a worker can mark the run killed if this process dies), reports evaluations to
the pruner, and exits on its own if its worker dies (no orphaned trainings: it takes its process group along).
A job with a `command` runs the user's own trainer instead (study/command_cell.py). A job with `processes` > 1 is
started under torchrun: every rank runs this module, rank 0 does all of the above (and writes the result), the
others train quietly; a rank that dies fails the attempt, and the next attempt resumes from the last checkpoint.

RIPT_ABLATE_INJECT_FAULT="<cell_id>@<attempt>[:infra][,...]" (attempt `*` = every attempt) makes the named
attempts raise after their first evaluation: a way to check that a study set-up retries and reports failures as
expected. `:infra` raises a connection error instead (once per attempt), as a tracking store that went away would;
`:stall` hangs after the first evaluation; `:rank-exit` kills the last rank of a multi-process cell as iteration 2
starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ript_ablate.study.attempt import (
    RESULT_FILE,
    RUN_FILE,
    LeaseLost,
    lease_guard,
    prune_decision,
    pruning_trial,
    write_json,
)
from ript_ablate.tracking import tags as tag

FAULT_ENV = "RIPT_ABLATE_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """Raised on purpose by RIPT_ABLATE_INJECT_FAULT."""


class Pruned(Exception):
    """The study's pruner stopped this run after an evaluation."""




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
    # a rank is torchrun's child and a forked cell the zygote's (study/zygote.py): those watch the worker's pid
    not_the_workers_child = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RIPT_ABLATE_ZYGOTE"))

    def worker_alive() -> bool:
        if not not_the_workers_child:
            return os.getppid() == parent_pid
        try:
            os.kill(parent_pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def watch() -> None:
        while True:
            if not worker_alive():
                with contextlib.suppress(OSError):  # the cell (or torchrun) leads its process group: take it along
                    if os.getpgrp() in (os.getpid(), os.getppid()):
                        os.killpg(os.getpgrp(), signal.SIGKILL)
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


def cell_config(job: dict[str, Any]) -> tuple[Any, str | None, list[dict[str, float]]]:
    """(the cell's checked config, resuming from the latest checkpoint of an earlier attempt if any; that
    checkpoint; the history up to it): the same on every rank of a multi-process cell."""
    from ript_ablate.plugins import checked_config_from_dict

    checkpoint, prior = resume_point(Path(job["output_dir"])) if job.get("resume", True) else (None, [])
    data = job["config"]
    if checkpoint:
        data = {**data, "algo": {**data.get("algo", {}), "lora_adaptor_ckpt": checkpoint}}
    return checked_config_from_dict(data, f"cell {job['cell_id']}"), checkpoint, prior


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ript_ablate.distributed import init_ranks

    torch.set_num_threads(int(job["threads"]))
    if int(job.get("processes", 1)) <= 1:
        return run_job_on(job, None)
    data = job["config"]
    training = data.get("training", {})
    ranks = init_ranks(str(training.get("device", "auto")), float(training.get("collective_timeout_s", 1800.0)))
    finished = False
    try:
        result = run_job_on(job, ranks)
        finished = True
        return result
    finally:
        ranks.close(finished)  # meet the other ranks before tearing down, unless this rank is failing


def run_job_on(job: dict[str, Any], ranks: Any) -> dict[str, Any]:
    """The cell on one process, or on one rank of a multi-process cell (`ranks`): rank 0 tracks, reports to the
    pruner, checks the lease and returns the result; the other ranks train with it and return None."""
    from ript_ablate.bc import ensure_base
    from ript_ablate.distributed import Ranks
    from ript_ablate.errors import is_infrastructure_error, readable_error
    from ript_ablate.ript.trainer import Trainer
    from ript_ablate.study.objective import metric_points, reduce_points
    from ript_ablate.tracking import MlflowTracker, Tracker

    ranks = ranks or Ranks()
    if not ranks.is_main:
        run_other_rank(job, ranks)
        return None
    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cfg, checkpoint, prior = cell_config(job)
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
    pruning = pruning_trial(job)
    guard = lease_guard(job)

    inject = fault_planned(job["cell_id"], int(job["attempt"]))
    if inject in ("infra", "stall") and int(job.get("infra_failures", 0)) > 0:
        inject = None  # an injected outage or stop happens once; the attempt's next run goes through
    if inject == "rank-exit":
        inject = None  # the last rank acts on it (run_other_rank)

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
        ensure_base(cfg, check_cached=False)  # normally a cache hit: the runner built and checked the bases
        ranks.barrier()
        trained = Trainer(cfg, tracker, on_eval=on_eval, prior_history=prior, guard=guard, ranks=ranks).run(out)
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


def run_other_rank(job: dict[str, Any], ranks: Any) -> None:
    """A rank > 0 of a multi-process cell: the same config and resume point as rank 0, no tracking, no result (rank 0
    writes it); a stop of rank 0's (pruned, lease lost) ends it with a RankFailure, which is expected."""
    from ript_ablate.distributed import RANK_EXIT_ENV, RankFailure
    from ript_ablate.ript.trainer import Trainer

    cfg, _, prior = cell_config(job)
    if fault_planned(job["cell_id"], int(job["attempt"])) == "rank-exit" and ranks.rank == ranks.size - 1:
        os.environ[RANK_EXIT_ENV] = f"{ranks.rank}@2"
    ranks.barrier()  # rank 0 has the base
    with contextlib.suppress(RankFailure):
        Trainer(cfg, prior_history=prior, ranks=ranks).run(job["output_dir"])


def failure(exc: BaseException) -> dict[str, str]:
    """A failed cell's result: "infra" when a store or server was away (retried without charging the cell),
    "error" otherwise, with a one-line reason and the traceback."""
    from ript_ablate.errors import is_infrastructure_error, readable_error

    trace = traceback.format_exc()
    print(trace, file=sys.stderr, flush=True)  # into the attempt's output.log, where the worker's reason points
    return {"status": "infra" if is_infrastructure_error(exc) else "error", "reason": readable_error(exc),
            "traceback": trace}


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


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job_path = Path(args[0])
    job = json.loads(job_path.read_text())
    exit_with_parent(int(job["parent_pid"]))
    main_rank = os.environ.get("RANK", "0") == "0"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        if "command" in job:  # your own trainer (study/command.py)
            from ript_ablate.study.command_cell import run_command_job

            result = run_command_job(job)
        else:
            result = run_job(job)
    except Exception as exc:  # a failure outside the training itself (MLflow unreachable, bad job)
        if not main_rank:
            raise  # exits non-zero: torchrun stops the cell's other ranks, and the attempt fails
        result = failure(exc)
    if main_rank:  # a rank > 0 of a multi-process cell returns None: rank 0 writes the result
        write_json(job_path.parent / RESULT_FILE, result)
    if int(job.get("processes", 1)) > 1 and "command" not in job:
        from ript_ablate.distributed import leave

        leave(0)  # a finished rank skips the interpreter's teardown (see `leave`)
    return 0


if __name__ == "__main__":
    sys.exit(main())
