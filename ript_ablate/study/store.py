"""Study state in Optuna's own storages, with exactly-once cells.

Every cell (configuration x seed) is an Optuna trial of the study `<name>`, enqueued once. A worker claims a
waiting trial with the storage's atomic WAITING -> RUNNING transition (the journal's lock on the embedded default,
a row lock on PostgreSQL), so two workers never run the same trial. A running trial carries a lease (host, pid and
a heartbeat time in its user attributes); a trial whose worker died is failed by whoever first wins its
RUNNING -> FAIL transition, and only that process enqueues the retry. In optuna mode the sampler lives in a second
study `<name>:search` whose trials are configurations; a configuration is told the aggregate over its seeds.

sqlite is refused as study storage: it has no row locks, and concurrent workers ran cells twice on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ript_ablate.errors import RiptAblateError
from ript_ablate.study.objective import aggregate
from ript_ablate.study.spec import StudySpec, cell_id_for, config_id_for, describe

STATE_LABELS = {TrialState.WAITING: "waiting", TrialState.RUNNING: "running", TrialState.COMPLETE: "done",
                TrialState.FAIL: "failed", TrialState.PRUNED: "pruned"}
RDB_PREFIXES = ("postgresql", "mysql")
SEARCH_SUFFIX = ":search"
MIN_CONFIGS_BEFORE_PRUNING = 3  # the median pruner's warm-up, in configurations (x seeds = trials)
REQUEUE_GRACE_S = 30.0  # a failed trial without its retry for this long lost the process that was to enqueue it


class StorageError(RiptAblateError):
    """The study storage cannot be opened or does not match the spec."""


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """PostgreSQL (or MySQL) URLs open Optuna's RDB storage; anything else is a journal file path."""
    if url.startswith("sqlite"):
        raise StorageError(f"study storage {url}: sqlite has no row locks, so concurrent workers can run a cell "
                           "twice; use a journal file path (the default) or postgresql://...")
    if url.startswith(RDB_PREFIXES):
        from ript_ablate.errors import readable_error

        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(with_driver(url), engine_kwargs={"pool_pre_ping": True})
            except Exception as exc:  # sqlalchemy raises many kinds; all mean the same to the user
                text = str(exc).lower()
                if attempt < 4 and ("duplicate key" in text or "already exists" in text):
                    time.sleep(0.5 + attempt)  # another worker is creating Optuna's tables right now: use theirs
                    continue
                raise StorageError(f"cannot open study storage {redact(url)}: {readable_error(exc)}") from None
    if "://" in url:
        raise StorageError(f"study storage {url}: expected a journal file path or postgresql://user@host/db")
    from optuna.storages.journal import JournalFileBackend

    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def load_search(spec: StudySpec, url: str) -> optuna.Study | None:
    """An optuna-mode study's search (Optuna's own Study: sampled configurations, objective, importances), for
    readers such as the report; None when the study has not started."""
    try:
        return optuna.load_study(study_name=spec.name + SEARCH_SUFFIX, storage=open_storage(url))
    except KeyError:  # Optuna's answer for a study name it does not hold
        return None


def with_driver(url: str) -> str:
    """postgresql:// with the psycopg2 driver this package installs (SQLAlchemy 2.1 defaults to psycopg 3)."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def process_start_ticks(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (None if it does not exist): with the pid, a
    unique identity, so a recycled pid is not mistaken for a live worker."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Claim:
    trial_id: int
    number: int
    attrs: dict[str, Any]

    @property
    def cell_id(self) -> str:
        return self.attrs["cell_id"]

    @property
    def attempt(self) -> int:
        return int(self.attrs.get("attempt", 1))


@dataclass
class CellRecord:
    """A cell as `study status` shows it: its latest attempt decides the state, unless one completed."""

    cell_id: str
    config_id: str
    seed: int
    values: dict[str, Any]
    state: str = "not started"
    attempts: int = 0
    value: float | None = None
    status: str = ""
    reason: str = ""
    trials: list[FrozenTrial] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in ("done", "failed", "pruned")


class StudyStore:
    def __init__(self, spec: StudySpec, url: str, create: bool = True):
        self.spec = spec
        self.url = url
        self.storage = open_storage(url)
        self.host = socket.gethostname()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        direction = spec.objective.direction
        try:
            if create:
                self.cells = optuna.create_study(study_name=spec.name, storage=self.storage, direction=direction,
                                                 pruner=self._pruner(), load_if_exists=True)
            else:
                self.cells = optuna.load_study(study_name=spec.name, storage=self.storage, pruner=self._pruner())
        except KeyError:
            raise StorageError(f"study {spec.name!r} not found in {redact(url)}; start it with "
                               f"`ript-ablate study run {spec.path}` (with the same --storage)") from None
        self.search: optuna.Study | None = None
        if spec.mode == "optuna":
            self.search = optuna.create_study(study_name=spec.name + SEARCH_SUFFIX, storage=self.storage,
                                              direction=direction, sampler=self._sampler(), load_if_exists=True)
        self._check_fingerprint(create)
        self._refresh_seeds()

    # --- set-up -----------------------------------------------------------------------------------------------
    def _pruner(self) -> optuna.pruners.BasePruner:
        if self.spec.pruner == "median":
            # compare only once MIN_CONFIGS_BEFORE_PRUNING configurations have all their seeds done, and never on
            # the first third of a run (early evaluations of RL runs rank poorly)
            n = self.spec.n_iterations or 15
            return optuna.pruners.MedianPruner(n_startup_trials=MIN_CONFIGS_BEFORE_PRUNING * len(self.spec.seeds),
                                               n_warmup_steps=max(1, n // 3))
        if self.spec.pruner == "hyperband":
            n = self.spec.n_iterations or 15
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, n))
        return optuna.pruners.NopPruner()

    def _sampler(self) -> optuna.samplers.BaseSampler:
        seed = self.spec.sampler_seed
        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.spec.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def _check_fingerprint(self, create: bool) -> None:
        attrs = self.cells.user_attrs
        mine = self.spec.fingerprint()
        if "fingerprint" not in attrs:
            if create:
                self.cells.set_user_attr("fingerprint", mine)
                self.cells.set_user_attr("spec", str(self.spec.path))
            return
        if attrs["fingerprint"] != mine:
            raise StorageError(
                f"study {self.spec.name!r} in {redact(self.url)} was started from a different spec (factors, seeds, "
                f"base config or objective changed); give the study a new name, or remove its storage to start over")

    @contextmanager
    def setup_lock(self) -> Iterator[None]:
        """Serialise setting the study up (parent run, grid cells) across processes and machines: an advisory lock
        on PostgreSQL, a file lock beside a journal file."""
        if isinstance(self.storage, optuna.storages.RDBStorage) and self.url.startswith("postgresql"):
            from sqlalchemy import text

            key = int(hashlib.sha1(f"ript-ablate:{self.spec.name}".encode()).hexdigest()[:15], 16)
            with self.storage.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        if "://" in self.url:  # another RDB: no portable advisory lock; set-up is left to `study run`
            yield
            return
        import fcntl

        with open(f"{self.url}.setup.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def parent_run_id(self) -> str | None:
        return self.cells.user_attrs.get("mlflow_parent_run_id")

    def set_parent_run_id(self, run_id: str) -> None:
        self.cells.set_user_attr("mlflow_parent_run_id", run_id)

    # --- adaptive seeds ---------------------------------------------------------------------------------------
    def seeds_run(self) -> int:
        """Adaptive seeds: how many seeds (0..n-1) are enqueued so far (the study storage keeps the count)."""
        plan = self.spec.seed_plan
        return int(self.cells.user_attrs.get("seeds_run", plan.initial)) if plan else len(self.spec.seeds)

    def _refresh_seeds(self) -> None:
        if self.spec.seed_plan:
            self.spec.seeds = list(range(self.seeds_run()))

    def extend(self) -> bool:
        """The look after every cell so far has ended: adaptive seeds (grids) or the race (Optuna); True when it
        enqueued cells (or another worker just did)."""
        if self.spec.seed_plan is not None:
            return self.extend_seeds()
        if self.spec.race is not None:
            return self.extend_race()
        return False

    def race_state(self) -> dict[str, Any]:
        """{"entrants": [config ids], "seeds": {config id: seeds run}} once the race has started, else {}."""
        return dict(self.cells.user_attrs.get("race") or {})

    def extend_race(self) -> bool:
        """After the search: enqueue the next seed for the race's leader and every configuration still undecided
        against it, until each is dropped, settled within min_effect or at race.max_seeds."""
        from ript_ablate.study.adaptive import race, race_entrants

        assert self.spec.race is not None
        with self.setup_lock():
            if self.has_active():
                return True
            scores: dict[str, dict[int, float]] = {}
            for rec in self.records():
                if rec.value is not None:
                    scores.setdefault(rec.config_id, {})[rec.seed] = float(rec.value)
            state = self.race_state()
            if not state:
                entrants = race_entrants(self.spec, scores)
                if len(entrants) < 2:
                    return False
                state = {"entrants": entrants, "seeds": {c: len(self.spec.seeds) for c in entrants}}
            current = max(state["seeds"].values())
            result = race(self.spec, scores, state["entrants"], current)
            if current >= self.spec.race.plan.max or not result.racing:
                self.cells.set_user_attr("race", state)
                return False
            seed = self.spec.race_seeds(current + 1)[-1]
            by_config = {t.user_attrs.get("config_id"): t for t in self.search_trials()}
            for config_id in result.racing:
                trial = by_config[config_id]
                state["seeds"][config_id] = current + 1
                self.cells.enqueue_trial({}, user_attrs=self.cell_attrs(dict(trial.params), seed, config_id,
                                                                        config_trial=trial.number))
            self.cells.set_user_attr("race", state)
            return True

    def extend_seeds(self) -> bool:
        """Adaptive seeds, the look after the last cell of a seed ended: enqueue the next seed for every
        configuration while a comparison is undecided and seeds < max. Once, whichever worker or machine gets
        here first (under the set-up lock); True when there are cells to run now."""
        from ript_ablate.study.adaptive import needs_another_seed

        if self.spec.seed_plan is None:
            return False
        with self.setup_lock():
            self._refresh_seeds()
            if self.has_active():  # another worker took this look already
                return True
            values = {r.cell_id: r.value for r in self.records() if r.value is not None}
            n = len(self.spec.seeds)
            if not needs_another_seed(self.spec, values, n):
                return False
            self.cells.set_user_attr("seeds_run", n + 1)
            self.spec.seeds = list(range(n + 1))
            return self.enqueue_grid() > 0

    # --- cells ------------------------------------------------------------------------------------------------
    def cell_attrs(self, values: dict[str, Any], seed: int, config_id: str, **extra: Any) -> dict[str, Any]:
        return {"cell_id": cell_id_for(config_id, seed), "config_id": config_id, "seed": seed,
                "values": json.dumps(values), "attempt": 1, **extra}

    def enqueue_grid(self) -> int:
        """Enqueue every grid cell that has no trial yet; returns how many were added."""
        have = {t.user_attrs.get("cell_id") for t in self.cells.get_trials(deepcopy=False)}
        added = 0
        for values in self.spec.grid_configs():
            config_id = config_id_for(values)
            for seed in self.spec.seeds:
                attrs = self.cell_attrs(values, seed, config_id)
                if attrs["cell_id"] not in have:
                    self.cells.enqueue_trial({}, user_attrs=attrs)
                    added += 1
        return added

    def expected_cells(self) -> list[tuple[str, str, int, dict[str, Any]]]:
        """(cell_id, config_id, seed, values) of every cell the spec defines so far."""
        self._refresh_seeds()
        if self.spec.mode == "grid":
            configs = [(config_id_for(v), v) for v in self.spec.grid_configs()]
        else:
            configs = [(t.user_attrs["config_id"], dict(t.params)) for t in self.search_trials()
                       if "config_id" in t.user_attrs]
            raced = self.race_state().get("seeds", {}) if self.spec.race else {}
            return [(cell_id_for(c, s), c, s, v) for c, v in configs
                    for s in self.spec.race_seeds(raced.get(c, len(self.spec.seeds)))]
        return [(cell_id_for(c, s), c, s, v) for c, v in configs for s in self.spec.seeds]

    def claim(self) -> Claim | None:
        """Atomically take one waiting cell (oldest first) and stamp it with this worker's lease."""
        waiting = self.cells.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: t.number):
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                    continue
            except UpdateFinishedTrialError:
                continue
            lease = {"host": self.host, "pid": os.getpid(), "pid_start": process_start_ticks(os.getpid()),
                     "heartbeat": time.time()}
            for key, value in lease.items():
                self.storage.set_trial_user_attr(trial._trial_id, key, value)
            return Claim(trial._trial_id, trial.number, {**trial.user_attrs, **lease})
        return None

    def heartbeat(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    def set_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def finish(self, claim: Claim, state: TrialState, value: float | None, attrs: dict[str, Any]) -> bool:
        """Record the outcome; False when the lease was lost (another worker declared this one dead)."""
        try:
            self.set_attrs(claim.trial_id, attrs)
            return self.storage.set_trial_state_values(
                claim.trial_id, state, [value] if state == TrialState.COMPLETE and value is not None else None)
        except UpdateFinishedTrialError:
            return False

    def is_last_attempt(self, attrs: dict[str, Any]) -> bool:
        return int(attrs.get("attempt", 1)) > self.spec.retries

    def enqueue_retry(self, attrs: dict[str, Any], reason: str) -> bool:
        """Enqueue the next attempt of a cell if its retries allow; False when exhausted."""
        attempt = int(attrs.get("attempt", 1))
        if self.is_last_attempt(attrs):
            return False
        keep = ("cell_id", "config_id", "seed", "values", "config_trial")
        nxt = {k: attrs[k] for k in keep if k in attrs}
        self.cells.enqueue_trial({}, user_attrs={**nxt, "attempt": attempt + 1, "previous_reason": reason})
        return True

    def enqueue_again(self, attrs: dict[str, Any], reason: str) -> None:
        """Enqueue the same attempt once more after a failure that was not the cell's own (the tracking store or
        the study storage was away, or the user stopped the study): counted in `infra_failures`, not in retries."""
        keep = ("cell_id", "config_id", "seed", "values", "config_trial", "attempt")
        nxt = {k: attrs[k] for k in keep if k in attrs}
        self.cells.enqueue_trial({}, user_attrs={**nxt, "infra_failures": int(attrs.get("infra_failures", 0)) + 1,
                                                 "previous_reason": reason})

    def is_stale(self, trial: FrozenTrial, now: float) -> str | None:
        """Why a RUNNING trial's worker is gone, or None while its lease holds."""
        attrs = trial.user_attrs
        if attrs.get("host") == self.host and attrs.get("pid") is not None:
            ticks = process_start_ticks(int(attrs["pid"]))
            if ticks is None or (attrs.get("pid_start") is not None and ticks != attrs["pid_start"]):
                return f"worker process {attrs['pid']} on {self.host} is gone"
        beat = attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        grace = self.spec.lease_timeout
        if beat is not None and now - float(beat) > grace:
            return f"no heartbeat from {attrs.get('host', '?')}:{attrs.get('pid', '?')} for {now - float(beat):.0f}s"
        return None

    def recover_stale(self) -> list[tuple[FrozenTrial, str]]:
        """Fail the trials whose worker died and enqueue their retries; returns what this process recovered."""
        now = time.time()
        recovered = []
        trials = self.cells.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            why = self.is_stale(trial, now)
            if why is None:
                continue
            final = self.is_last_attempt(trial.user_attrs)
            try:
                self.set_attrs(trial._trial_id, {"status": "lost", "reason": why, "final": final})
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:
                continue  # another process recovered it first
            if not final:
                self.enqueue_retry(trial.user_attrs, why)
            recovered.append((trial, why))
        recovered.extend(self._requeue_orphaned_failures(trials, now))
        return recovered

    def _requeue_orphaned_failures(self, trials: list[FrozenTrial], now: float) -> list[tuple[FrozenTrial, str]]:
        """A failed attempt whose process died before enqueueing its retry (a narrow window): enqueue it now."""
        latest: dict[str, FrozenTrial] = {}
        for t in trials:
            cid = t.user_attrs.get("cell_id")
            if cid and (cid not in latest or t.number > latest[cid].number):
                latest[cid] = t
        done = {t.user_attrs.get("cell_id") for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        out = []
        for cid, t in latest.items():
            if (t.state == TrialState.FAIL and cid not in done and not t.user_attrs.get("final")
                    and t.datetime_complete is not None
                    and now - t.datetime_complete.timestamp() > REQUEUE_GRACE_S
                    and int(t.user_attrs.get("attempt", 1)) <= self.spec.retries):
                if self.enqueue_retry(t.user_attrs, t.user_attrs.get("reason", "unknown")):
                    out.append((t, "retry enqueued late"))
        return out

    def has_active(self) -> bool:
        return bool(self.cells.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))

    def records(self) -> list[CellRecord]:
        """Every cell the spec defines, with its trials (the study storage is the only source of truth)."""
        trials = self.cells.get_trials(deepcopy=False)
        by_cell: dict[str, list[FrozenTrial]] = {}
        for t in trials:
            if "cell_id" in t.user_attrs:
                by_cell.setdefault(t.user_attrs["cell_id"], []).append(t)
        out = []
        for cell_id, config_id, seed, values in self.expected_cells():
            rec = CellRecord(cell_id, config_id, seed, values)
            cell_trials = sorted(by_cell.get(cell_id, []), key=lambda t: t.number)
            rec.trials = cell_trials
            rec.attempts = sum(t.state != TrialState.WAITING for t in cell_trials)
            if cell_trials:
                final = next((t for t in cell_trials if t.state == TrialState.COMPLETE), None)
                final = final or next((t for t in cell_trials if t.state == TrialState.PRUNED), None)
                final = final or cell_trials[-1]
                rec.state = STATE_LABELS.get(final.state, str(final.state))
                if final.state == TrialState.FAIL and not final.user_attrs.get("final"):
                    rec.state = "retrying"  # its next attempt is being enqueued
                rec.value = final.value if final.state == TrialState.COMPLETE else None
                rec.status = final.user_attrs.get("status", "")
                failures = [t.user_attrs.get("reason", "") for t in cell_trials if t.state == TrialState.FAIL]
                rec.reason = final.user_attrs.get("reason", "") or (failures[-1] if failures else "")
            out.append(rec)
        return out

    # --- optuna mode: configurations ----------------------------------------------------------------------------
    def search_trials(self) -> list[FrozenTrial]:
        return self.search.get_trials(deepcopy=False) if self.search else []

    def ask_config(self) -> bool:
        """Sample one more configuration and enqueue its seeds; False when n_configs are already out. One worker
        asks at a time (under the set-up lock): two asking at once would sample a configuration too many."""
        with self.setup_lock():
            return self._ask_config()

    def _ask_config(self) -> bool:
        assert self.search is not None
        if len(self.search_trials()) >= self.spec.n_configs:
            return False
        trial = self.search.ask()
        if trial.number >= self.spec.n_configs:  # a worker without the lock (another RDB) took the last slot
            trial.set_user_attr("reason", "n_configs already reached by a concurrent worker")
            self.search.tell(trial, state=TrialState.FAIL)
            return False
        values = {}
        for p in self.spec.search_space:
            if p.type == "categorical":
                values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
            elif p.type == "int":
                values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            else:
                values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
        config_id = f"cfg-{trial.number:03d}"
        trial.set_user_attr("config_id", config_id)
        trial.set_user_attr("description", describe(values))
        for seed in self.spec.seeds:
            self.cells.enqueue_trial({}, user_attrs=self.cell_attrs(values, seed, config_id,
                                                                    config_trial=trial.number))
        return True

    def seed_states(self, config_id: str, exclude_trial: int | None = None) -> set[str]:
        """The states (COMPLETE, PRUNED, ...) of the other trials of one configuration."""
        return {t.state.name for t in self.cells.get_trials(deepcopy=False)
                if t.user_attrs.get("config_id") == config_id and t._trial_id != exclude_trial}

    def config_pruned(self, config_id: str) -> bool:
        return any(t.state == TrialState.PRUNED and t.user_attrs.get("config_id") == config_id
                   for t in self.cells.get_trials(deepcopy=False))

    def settle_configs(self) -> None:
        """Tell the sampler each configuration whose seeds have all ended: the aggregate, PRUNED or FAIL."""
        if self.search is None:
            return
        records = self.records()
        by_config: dict[str, list[CellRecord]] = {}
        for rec in records:
            by_config.setdefault(rec.config_id, []).append(rec)
        for trial in self.search.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            cells = by_config.get(trial.user_attrs.get("config_id", ""), [])
            if not cells or not all(c.terminal for c in cells) or any(c.attempts == 0 for c in cells):
                continue
            try:
                if any(c.state == "failed" for c in cells):
                    self.storage.set_trial_user_attr(trial._trial_id, "reason", "a seed failed")
                    self.search.tell(trial.number, state=TrialState.FAIL)
                elif any(c.state == "pruned" for c in cells):
                    self.search.tell(trial.number, state=TrialState.PRUNED)
                else:
                    value = aggregate([c.value for c in cells if c.value is not None],
                                      self.spec.objective.aggregation)
                    self.search.tell(trial.number, value)
            except (UpdateFinishedTrialError, RuntimeError, ValueError):
                continue  # told by a concurrent worker

    def done(self) -> bool:
        if self.has_active():
            return False
        if self.spec.mode == "optuna":
            return len(self.search_trials()) >= self.spec.n_configs
        return True
