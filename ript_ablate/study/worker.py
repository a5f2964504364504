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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from rich.markup import escape

from ript_ablate.errors import is_infrastructure_error, readable_error
from ript_ablate.progress import console
from ript_ablate.study.attempt import RESULT_FILE, RUN_FILE, STOP_GRACE_S, stop_process, write_json
from ript_ablate.study.command_cell import cuda_visible_devices
from ript_ablate.study.resources import Slot
from ript_ablate.study.spec import StudySpec, describe
from ript_ablate.study.store import Claim, StudyStore
from ript_ablate.study.zygote import COLD_CELLS_ENV, Zygote, attached
from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.runs import mark_lost, mark_run

POLL_S = 0.5  # how often an idle worker looks for work (a failed cell's retry, a dead worker's cell, a new seed)
INFRA_FIRST_WAIT_S = 5.0  # back-off after a store or server failure: 5 s, doubling, at most INFRA_MAX_WAIT_S
INFRA_MAX_WAIT_S = 120.0
MAX_INFRA_FAILURES = 20  # a cell whose attempts failed this often on the infrastructure fails for real


class CellInterrupted(Exception):
    """The worker was asked to stop (SIGTERM or SIGINT) while a cell ran; the cell has been stopped."""


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


def plugin_names(spec: StudySpec) -> tuple[str | None, str | None]:
    """The world and policy a spec's cells build (for a zygote to import beforehand); none for your own trainer."""
    if spec.command:
        return None, None
    return spec.base.get("suite", {}).get("name", "metaworld"), spec.base.get("policy", {}).get("name", "reference")


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> int:
    """SIGTERM to the cell's whole process group, SIGKILL after `grace` seconds; its exit code."""
    return stop_process(proc, grace, group=True)


class Worker:
    def __init__(self, spec: StudySpec, store: StudyStore, slot: Slot, tracking_uri: str | None = None,
                 log=None):
        from ript_ablate.tracking import resolve_tracking_uri

        self.spec = spec
        self.store = store
        self.slot = slot
        self.tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
        self.log = log or (lambda msg: console.print(f"worker {slot.index}: {msg}"))
        self.stopping = False
        self.signal_name = ""
        self.stop_after_cell = False  # a signal came as the cell finished: its result is recorded, then we stop
        self.infra_streak = 0  # consecutive infrastructure failures: sets the back-off
        self.zygote: Zygote | None = None  # forks this worker's cells (study/zygote.py)
        self.cold = False  # the zygote could not fork cells: start each as a new interpreter

    def run(self) -> int:
        """Work until the study has nothing left or a signal stops it; returns the number of cells this worker
        ran. A store or server that fails is waited out with a growing back-off, never charged to a cell."""
        ran = 0
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping:
                try:
                    claim = self._next_claim()
                except Exception as exc:
                    if not is_infrastructure_error(exc):
                        raise
                    self._back_off(readable_error(exc))
                    continue
                if claim is None:
                    break
                outcome = self.run_cell(claim)
                ran += 1
                if outcome.attrs.get("status") == "infra":
                    self._back_off(outcome.attrs.get("reason", "infrastructure failure"))
                else:
                    self.infra_streak = 0
            self._persist(self.store.settle_configs)
        except KeyboardInterrupt:
            self.stopping = True
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.zygote is not None:
                self.zygote.close()
        return ran

    def _next_claim(self) -> Claim | None:
        """Recover dead workers' cells, settle finished configurations, then claim; None when nothing is left."""
        while not self.stopping:
            for trial, why in self.store.recover_stale():
                self.log(f"recovered {trial.user_attrs.get('cell_id')} ({escape(why)})")
                self._mark_lost(trial.number, why)
            self.store.settle_configs()
            claim = self.store.claim()
            if claim is not None:
                return claim
            if self.spec.mode == "optuna" and self.store.ask_config():
                continue
            if self.store.done():
                if self.store.extend():  # adaptive seeds or the race: the look asked for another seed
                    continue
                return None
            time.sleep(POLL_S)
        return None

    def _back_off(self, reason: str) -> None:
        wait = min(INFRA_MAX_WAIT_S, INFRA_FIRST_WAIT_S * 2 ** self.infra_streak)
        self.infra_streak += 1
        self.log(f"[yellow]infrastructure unavailable[/] ({escape(reason)}); waiting {wait:.0f}s before going on "
                 "(not counted against any cell's retries)")
        deadline = time.time() + wait
        while not self.stopping and time.time() < deadline:
            time.sleep(0.5)

    def _persist(self, write: Callable[[], Any]) -> Any:
        """A storage write that must not be lost (an outcome, a retry): retried with back-off while the storage
        is unreachable, for as long as the worker is not asked to stop."""
        while True:
            try:
                return write()
            except Exception as exc:
                if not is_infrastructure_error(exc) or self.stopping:
                    raise
                self._back_off(readable_error(exc))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping:  # a second signal while stopping: let the clean-up finish
            return
        self.stopping = True
        self.signal_name = signal.Signals(signum).name
        raise KeyboardInterrupt

    def _mark_lost(self, trial_number: int, why: str) -> None:
        """The dead worker's cell run in MLflow (found by its trial number tag) is marked KILLED."""
        parent = self.store.parent_run_id
        if parent:
            mark_lost(self.tracking_uri, self.spec.experiment_name, parent,
                      lambda number: number == str(trial_number), why)

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
        interrupted = False
        with Heartbeat(self.store, claim.trial_id, self.spec.heartbeat_s):
            try:
                outcome = self._execute(claim, values)
            except CellInterrupted as exc:
                interrupted = True
                outcome = CellOutcome(TrialState.FAIL, None, {"status": "killed", "reason": str(exc)})
        outcome.attrs["wall_s"] = round(time.time() - started, 2)
        if "train_s" in outcome.attrs:
            outcome.attrs["overhead_s"] = round(outcome.attrs["wall_s"] - outcome.attrs["train_s"], 2)
        # a cell stopped by the infrastructure or by the user runs again at the same attempt: not its own failure
        again = (outcome.attrs.get("status") in ("infra", "killed")
                 and int(claim.attrs.get("infra_failures", 0)) < MAX_INFRA_FAILURES)
        final = outcome.state == TrialState.FAIL and not again and self.store.is_last_attempt(claim.attrs)
        outcome.attrs["final"] = final
        if not self._persist(lambda: self.store.finish(claim, outcome.state, outcome.value, outcome.attrs)):
            self.log(f"[yellow]lost the lease of {claim.cell_id}[/]: another worker declared this one dead; "
                     "its result is discarded (the retry counts)")
            self._mark_run(outcome.attrs.get("mlflow_run_id"), "KILLED", tag.outcome_tags("lease-lost"))
            return outcome
        if outcome.state == TrialState.FAIL and not final:
            reason = outcome.attrs.get("reason", "")
            if again:
                self._persist(lambda: self.store.enqueue_again(claim.attrs, reason))
            else:
                self._persist(lambda: self.store.enqueue_retry(claim.attrs, reason))
        value = f"{outcome.value:.3f}" if outcome.value is not None else "-"
        self.log(f"end {claim.cell_id}: {outcome.attrs.get('status')} objective {value} "
                 f"in {outcome.attrs['wall_s']:.0f}s" + (f" ({escape(str(outcome.attrs.get('reason')))})"
                                                         if outcome.state == TrialState.FAIL else ""))
        if interrupted or self.stop_after_cell:
            raise KeyboardInterrupt
        return outcome

    def _mark_run(self, run_id: str | None, status: str, tags: dict[str, str]) -> None:
        """Close a cell's MLflow run on its behalf; with the tracking store away, the next sweep closes it."""
        try:
            mark_run(self.tracking_uri, run_id, status, tags)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            self.log(f"[yellow]could not mark MLflow run {run_id} {status}[/] ({escape(readable_error(exc))})")

    def job(self, claim: Claim, values: dict[str, Any]) -> dict[str, Any]:
        from ript_ablate.study.spec import SEED_KEY, with_values

        seed = int(claim.attrs["seed"])
        if self.spec.command:  # your own trainer: its YAML as given, placed by CUDA_VISIBLE_DEVICES
            data, tracked = self.spec.cell_data(values, seed), True
        else:
            cfg = self.spec.cell_config(values, seed)
            placement = self.slot.overrides(cfg.suite.num_workers)
            data = with_values(self.spec.base, {**self.spec.expand(values), SEED_KEY: seed, **placement})
            tracked = cfg.tracking.enabled
        tags = {tag.STUDY: self.spec.name, tag.CELL_ID: claim.cell_id, tag.CONFIG_ID: claim.attrs["config_id"],
                tag.SEED: str(claim.attrs["seed"]), tag.TRIAL_NUMBER: str(claim.number),
                tag.WORKER: f"{self.store.host}:{os.getpid()}", **tag.factor_tags(values)}
        job: dict[str, Any] = {
            "cell_id": claim.cell_id, "attempt": claim.attempt,
            "infra_failures": int(claim.attrs.get("infra_failures", 0)), "config": data, "threads": self.slot.threads,
            "output_dir": str(self.spec.study_dir / "cells" / claim.cell_id), "parent_pid": os.getpid(),
            "objective": dict(self.spec.objective.__dict__), "tags": tags,
            "tracking": {"enabled": tracked, "uri": self.tracking_uri,
                         "experiment": self.spec.experiment_name, "parent_run_id": self.store.parent_run_id,
                         "run_name": claim.cell_id + (f"-a{claim.attempt}" if claim.attempt > 1 else "")},
        }
        job["lease"] = {"storage": self.store.url, "trial_id": claim.trial_id}
        job["processes"] = self.slot.processes
        if self.spec.command:
            job["command"] = self.spec.command.to_json()
            job["device"] = self.slot.device
            job["heartbeat_s"] = self.spec.heartbeat_s
            job["n_iterations"] = self.spec.n_iterations
        if self.spec.mode == "optuna" and self.spec.pruner != "none":
            job["pruning"] = {"spec": str(self.spec.path), "output_dir": str(self.spec.output_dir),
                              "storage": self.store.url, "trial_id": claim.trial_id}
        return job

    def _execute(self, claim: Claim, values: dict[str, Any]) -> CellOutcome:
        attempt_dir = self.spec.study_dir / "cells" / claim.cell_id / f"attempt-{claim.attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        for stale in (attempt_dir / RESULT_FILE, attempt_dir / RUN_FILE):
            stale.unlink(missing_ok=True)
        job = {**self.job(claim, values), "attempt_dir": str(attempt_dir)}
        write_json(attempt_dir / "job.json", job)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.slot.threads), "MKL_NUM_THREADS": str(self.slot.threads)}
        job_file = str(attempt_dir / "job.json")
        cell = [sys.executable, "-m", "ript_ablate.study.cell", job_file]
        torchrun = self.slot.processes > 1 and not self.spec.command  # one torchrun trial (a command launches its own)
        if torchrun:
            from ript_ablate.distributed import torchrun_args  # imports torch: only where a cell needs it

            cell = torchrun_args(self.slot.processes, [job_file], module="ript_ablate.study.cell")
            if self.slot.device.startswith("cuda"):
                env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(self.slot.device)
        with (attempt_dir / "output.log").open("w") as log:
            # its own process group, so that stopping it stops its rollout processes (and its ranks) too
            proc = None
            if not (torchrun or self.cold or os.environ.get(COLD_CELLS_ENV) == "1"):
                try:  # forked by this worker's zygote: the same fresh process, without the imports (study/zygote.py)
                    proc = self._zygote(env).spawn(job_file, env, attempt_dir / "output.log", os.getcwd())
                except (OSError, RuntimeError) as exc:
                    self.cold = True
                    self.log(f"[yellow]cells start as new interpreters from now on[/]: {escape(str(exc))}")
            if proc is None:
                proc = subprocess.Popen(cell, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            self._persist(lambda: self.store.set_attrs(claim.trial_id, {"cell_pid": proc.pid,
                                                                        "log": str(attempt_dir / "output.log")}))
            try:
                code = proc.wait(timeout=self.spec.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                code = stop_process_group(proc)
                timed_out = True
            except KeyboardInterrupt:  # this worker is asked to stop: stop the cell, mark its run killed
                code = stop_process_group(proc)
                timed_out = False
                if not (attempt_dir / RESULT_FILE).is_file():
                    why = f"stopped by {self.signal_name or 'a signal'} to the worker; resumes on the next `study run`"
                    self._mark_run(self._run_id(attempt_dir), "KILLED", tag.outcome_tags("killed", why))
                    raise CellInterrupted(why) from None
                # the cell had written its result (and ended its run) when the signal came: keep it, then stop
                self.stop_after_cell = True
        run_id = self._run_id(attempt_dir)
        result_path = attempt_dir / RESULT_FILE
        if timed_out or not result_path.is_file():
            why = (f"timeout after {self.spec.timeout_s:g}s" if timed_out
                   else f"cell process exited with code {code}" + (" (killed by a signal)" if code < 0 else "")
                   + f"; see {attempt_dir / 'output.log'}")
            self._mark_run(run_id, "KILLED" if code < 0 or timed_out else "FAILED",
                           tag.outcome_tags("failed", why))
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
        if result["status"] == "infra":
            self._mark_run(attrs["mlflow_run_id"], "FAILED", tag.outcome_tags("infrastructure", result.get("reason")))
        reason = result.get("reason", "unknown error")[:2000]
        if result.get("traceback"):
            reason += f" (traceback in {attempt_dir / 'output.log'})"
        return CellOutcome(TrialState.FAIL, None, {**attrs, "reason": reason})

    def _zygote(self, env: dict[str, str]) -> Zygote:
        """This worker's zygote: the one it forked at its start when the runner's zygote forked it, else one
        started at its first cell (with the cells' thread settings); started again if it died."""
        if self.zygote is None:
            self.zygote = attached() or Zygote(*plugin_names(self.spec), env, None)
        return self.zygote

    @staticmethod
    def _run_id(attempt_dir: Path) -> str | None:
        try:
            return json.loads((attempt_dir / RUN_FILE).read_text()).get("mlflow_run_id")
        except (OSError, json.JSONDecodeError):
            return None

