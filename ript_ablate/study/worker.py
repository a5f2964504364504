"""A study worker: claim a cell, run it in its own process, record the outcome, repeat until nothing is left.

`study run` starts N of these on this machine; `study worker` starts one here to join a study from another
machine. While a cell runs, a thread renews the trial's lease (heartbeat). Outcomes:
finished or diverged -> COMPLETE with the objective (diverged is a result, never retried); pruned -> PRUNED;
an exception, a crash of the cell process or a timeout -> FAIL with the reason, and a retry while `retries` allow
(the retry resumes from the cell's last checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from ript_ablate.progress import console
from ript_ablate.study.cell import RESULT_FILE, RUN_FILE, write_json
from ript_ablate.study.resources import Slot
from ript_ablate.study.runs import mark_run
from ript_ablate.study.spec import StudySpec, describe
from ript_ablate.study.store import Claim, StudyStore

POLL_S = 2.0  # how often an idle worker looks for work (a failed cell's retry, a dead worker's cell)


@dataclass
class CellOutcome:
    state: TrialState
    value: float | None
    attrs: dict[str, Any]


class Heartbeat:
    """Renews a running trial's lease every `interval` seconds from a background thread."""

    def __init__(self, store: StudyStore, trial_id: int, interval: float):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(store, trial_id, interval), daemon=True)

    def _beat(self, store: StudyStore, trial_id: int, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                store.heartbeat(trial_id)
            except Exception:  # a lost lease or a storage hiccup: the next beat or the finish decides
                pass

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class Worker:
    def __init__(self, spec: StudySpec, store: StudyStore, slot: Slot, tracking_uri: str | None = None,
                 log=None):
        self.spec = spec
        self.store = store
        self.slot = slot
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or spec.tracking_uri
        self.log = log or (lambda msg: console.print(f"worker {slot.index}: {msg}"))
        self.stopping = False

    def run(self) -> int:
        """Work until the study has nothing left; returns the number of cells this worker ran."""
        ran = 0
        signal.signal(signal.SIGTERM, self._on_term)
        while not self.stopping:
            for trial, why in self.store.recover_stale():
                self.log(f"recovered {trial.user_attrs.get('cell_id')} ({why})")
                self._mark_lost(trial.number, why)
            self.store.settle_configs()
            claim = self.store.claim()
            if claim is None:
                if self.spec.mode == "optuna" and self.store.ask_config():
                    continue
                if self.store.done():
                    break
                time.sleep(POLL_S)
                continue
            self.run_cell(claim)
            ran += 1
        self.store.settle_configs()
        return ran

    def _mark_lost(self, trial_number: int, why: str) -> None:
        """The dead worker's cell run in MLflow (found by its trial number tag) is marked KILLED."""
        from ript_ablate.study.runs import child_runs

        parent = self.store.parent_run_id
        if not parent:
            return
        for run in child_runs(self.tracking_uri, self.spec.experiment_name, parent):
            if run.info.status == "RUNNING" and run.data.tags.get("ript.trial_number") == str(trial_number):
                mark_run(self.tracking_uri, run.info.run_id, "KILLED", {"ript.status": "lost", "ript.reason": why})

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True
        raise KeyboardInterrupt

    # --- one cell ---------------------------------------------------------------------------------------------
    def run_cell(self, claim: Claim) -> CellOutcome:
        started = time.time()
        values = json.loads(claim.attrs.get("values", "{}"))
        label = f"{claim.cell_id} ({describe(values)}, seed {claim.attrs['seed']}, attempt {claim.attempt})"
        if self.spec.mode == "optuna" and self.store.config_pruned(claim.attrs["config_id"]):
            outcome = CellOutcome(TrialState.PRUNED, None, {"status": "pruned",
                                                            "reason": "another seed of this configuration was pruned"})
            self.store.finish(claim, outcome.state, None, outcome.attrs)
            return outcome
        self.log(f"start {label}")
        with Heartbeat(self.store, claim.trial_id, self.spec.heartbeat_s):
            outcome = self._execute(claim, values)
        outcome.attrs["wall_s"] = round(time.time() - started, 2)
        if "train_s" in outcome.attrs:
            outcome.attrs["overhead_s"] = round(outcome.attrs["wall_s"] - outcome.attrs["train_s"], 2)
        final = outcome.state == TrialState.FAIL and self.store.is_last_attempt(claim.attrs)
        outcome.attrs["final"] = final
        if not self.store.finish(claim, outcome.state, outcome.value, outcome.attrs):
            self.log(f"[yellow]lost the lease of {claim.cell_id}[/]: another worker declared this one dead; "
                     "its result is discarded (the retry counts)")
            mark_run(self.tracking_uri, outcome.attrs.get("mlflow_run_id"), "KILLED",
                            {"ript.status": "lease-lost"})
            return outcome
        if outcome.state == TrialState.FAIL and not final:
            self.store.enqueue_retry(claim.attrs, outcome.attrs.get("reason", ""))
        value = f"{outcome.value:.3f}" if outcome.value is not None else "-"
        self.log(f"end {claim.cell_id}: {outcome.attrs.get('status')} objective {value} "
                 f"in {outcome.attrs['wall_s']:.0f}s" + (f" ({outcome.attrs.get('reason')})"
                                                         if outcome.state == TrialState.FAIL else ""))
        return outcome

    def job(self, claim: Claim, values: dict[str, Any]) -> dict[str, Any]:
        from ript_ablate.study.spec import SEED_KEY, with_values

        cfg = self.spec.cell_config(values, int(claim.attrs["seed"]))
        placement = self.slot.overrides(cfg.suite.num_workers)
        data = with_values(self.spec.base, {**values, SEED_KEY: int(claim.attrs["seed"]), **placement})
        tags = {"ript.study": self.spec.name, "ript.cell_id": claim.cell_id,
                "ript.config_id": claim.attrs["config_id"], "ript.seed": str(claim.attrs["seed"]),
                "ript.trial_number": str(claim.number), "ript.worker": f"{self.store.host}:{os.getpid()}",
                **{f"factor.{k}": str(v) for k, v in values.items()}}
        job: dict[str, Any] = {
            "cell_id": claim.cell_id, "attempt": claim.attempt, "config": data, "threads": self.slot.threads,
            "output_dir": str(self.spec.study_dir / "cells" / claim.cell_id), "parent_pid": os.getpid(),
            "objective": dict(self.spec.objective.__dict__), "tags": tags,
            "tracking": {"enabled": cfg.tracking.enabled, "uri": self.tracking_uri,
                         "experiment": self.spec.experiment_name, "parent_run_id": self.store.parent_run_id,
                         "run_name": claim.cell_id + (f"-a{claim.attempt}" if claim.attempt > 1 else "")},
        }
        if self.spec.mode == "optuna" and self.spec.pruner != "none":
            job["pruning"] = {"spec": str(self.spec.path), "output_dir": str(self.spec.output_dir),
                              "storage": self.store.url, "trial_id": claim.trial_id}
        return job

    def _execute(self, claim: Claim, values: dict[str, Any]) -> CellOutcome:
        attempt_dir = self.spec.study_dir / "cells" / claim.cell_id / f"attempt-{claim.attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        for stale in (attempt_dir / RESULT_FILE, attempt_dir.parent / RUN_FILE):
            stale.unlink(missing_ok=True)
        job = self.job(claim, values)
        write_json(attempt_dir / "job.json", job)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.slot.threads), "MKL_NUM_THREADS": str(self.slot.threads)}
        with (attempt_dir / "output.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.study.cell", str(attempt_dir / "job.json")],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            self.store.set_attrs(claim.trial_id, {"cell_pid": proc.pid, "log": str(attempt_dir / "output.log")})
            try:
                code = proc.wait(timeout=self.spec.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                timed_out = True
            except KeyboardInterrupt:  # this worker is asked to stop: stop the cell too, leave the lease to expire
                proc.kill()
                proc.wait()
                raise
        run_id = self._run_id(attempt_dir.parent)
        result_path = attempt_dir / RESULT_FILE
        if timed_out or not result_path.is_file():
            why = (f"timeout after {self.spec.timeout_s:g}s" if timed_out
                   else f"cell process exited with code {code}" + (" (killed by a signal)" if code < 0 else "")
                   + f"; see {attempt_dir / 'output.log'}")
            mark_run(self.tracking_uri, run_id, "KILLED" if code < 0 or timed_out else "FAILED",
                            {"ript.status": "failed", "ript.reason": why})
            return CellOutcome(TrialState.FAIL, None, {"status": "timeout" if timed_out else "crashed",
                                                       "reason": why, "mlflow_run_id": run_id or ""})
        result = json.loads(result_path.read_text())
        attrs = {"status": result["status"], "mlflow_run_id": result.get("mlflow_run_id") or run_id or "",
                 "train_s": round(float(result.get("train_s", 0.0)), 2)}
        if result.get("resumed_from"):
            attrs["resumed_from"] = result["resumed_from"]
        if result["status"] in ("finished", "diverged"):
            if result.get("value") is None:
                return CellOutcome(TrialState.FAIL, None, {
                    **attrs, "status": "failed",
                    "reason": f"the run logged no {self.spec.objective.metric} (the objective metric)"})
            return CellOutcome(TrialState.COMPLETE, float(result["value"]), attrs)
        if result["status"] == "pruned":
            return CellOutcome(TrialState.PRUNED, None, {**attrs, "reason": result.get("reason", "")})
        return CellOutcome(TrialState.FAIL, None, {**attrs, "reason": result.get("reason", "unknown error")[:2000]})

    @staticmethod
    def _run_id(cell_dir: Path) -> str | None:
        try:
            return json.loads((cell_dir / RUN_FILE).read_text()).get("mlflow_run_id")
        except (OSError, json.JSONDecodeError):
            return None

