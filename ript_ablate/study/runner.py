"""`study run`, `study worker` and `study status`: set a study up, run its workers, show where it stands.

`study run` is safe to repeat: it re-attaches to the study in its storage, skips finished cells, recovers cells
whose worker died (their retries resume from the last checkpoint) and finishes the study's MLflow parent run once
every cell has ended.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ript_ablate.progress import console
from ript_ablate.study.resources import Slot, plan_slots
from ript_ablate.study.runs import ensure_parent_run, finish_parent, sweep_orphans
from ript_ablate.study.spec import StudySpec, describe
from ript_ablate.study.store import CellRecord, StudyStore, redact
from ript_ablate.study.worker import Worker

EXIT_CELLS_FAILED = 4  # the study ended, but some cells failed after all their retries


def open_store(spec: StudySpec, storage: str | None, create: bool) -> StudyStore:
    return StudyStore(spec, spec.storage_url(storage), create=create)


def summary_counts(records: list[CellRecord], spec: StudySpec) -> dict[str, int]:
    counts = {"done": 0, "running": 0, "waiting": 0, "failed": 0, "pruned": 0, "retrying": 0, "not started": 0}
    for rec in records:
        counts[rec.state] = counts.get(rec.state, 0) + 1
    total = len(records)
    if spec.mode == "optuna":
        total = spec.n_configs * len(spec.seeds)
        counts["not started"] += total - len(records)
    counts["total"] = total
    return counts


def status_table(records: list[CellRecord], spec: StudySpec) -> Table:
    table = Table(title=f"study {spec.name} ({spec.mode}, objective {spec.objective.reduction} "
                        f"{spec.objective.metric})", title_justify="left")
    for col in ("cell", "configuration", "seed", "state", "objective", "attempts", "result", "reason"):
        table.add_column(col, overflow="fold")
    style = {"done": "green", "failed": "red", "running": "cyan", "pruned": "yellow", "retrying": "magenta"}
    for rec in records:
        value = f"{rec.value:.3f}" if rec.value is not None else "-"
        table.add_row(rec.cell_id, describe(rec.values), str(rec.seed),
                      f"[{style.get(rec.state, 'white')}]{rec.state}[/]", value, str(rec.attempts), rec.status,
                      rec.reason[:160])
    return table


def progress_line(counts: dict[str, int], eta_s: float | None, started: float) -> str:
    ended = counts["done"] + counts["failed"] + counts["pruned"]
    eta = f"ETA {eta_s / 60:.1f} min" if eta_s is not None else "ETA -"
    return (f"[bold]{ended}/{counts['total']}[/] ended: [green]{counts['done']} done[/], "
            f"[cyan]{counts['running']} running[/], {counts['waiting'] + counts['retrying']} waiting, "
            f"[red]{counts['failed']} failed[/]" + (f", [yellow]{counts['pruned']} pruned[/]" if counts['pruned']
                                                    else "")
            + f" | {(time.time() - started) / 60:.1f} min elapsed | {eta}")


def eta_seconds(records: list[CellRecord], counts: dict[str, int], workers: int) -> float | None:
    walls = [float(t.user_attrs["wall_s"]) for r in records for t in r.trials if "wall_s" in t.user_attrs]
    remaining = counts["total"] - counts["done"] - counts["failed"] - counts["pruned"]
    if not walls:
        return None
    return sum(walls) / len(walls) * remaining / max(1, workers)


def prepare_bases(spec: StudySpec) -> None:
    """Build (or find in the cache) each behaviour-cloning base the cells need, once, before workers start:
    concurrent cells then only read the cache."""
    from ript_ablate.sft import get_base, sft_key
    from ript_ablate.suites import build_suite
    from ript_ablate.suites.rollouts import RolloutPool

    configs = [spec.cell_config(v, spec.seeds[0]) for v in (spec.grid_configs() if spec.mode == "grid" else [{}])]
    seen = set()
    for cfg in configs:
        if cfg.algo.checkpoint_path:
            continue  # the cells start from a given model, not from a cached base
        suite = build_suite(cfg)
        key = (sft_key(cfg, suite.demo_key()), cfg.sft.cache_dir)
        if key in seen:
            continue
        seen.add(key)
        with RolloutPool(cfg.suite.num_workers, cfg.suite.envs_per_worker, cfg.algo.max_episode_length) as pool:
            get_base(cfg, suite, pool)


def worker_command(spec_path: Path, url: str, slot: Slot, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ript_ablate.cli", "study", "worker", str(spec_path), "--storage", url,
            "--output-dir", str(output_dir), "--slot", json.dumps(asdict(slot))]


def run_study(spec: StudySpec, workers: int | None, devices: str, storage: str | None,
              retry_failed: bool = False) -> int:
    slots = plan_slots(workers, devices)
    store = open_store(spec, storage, create=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking_uri
    params = {"study.name": spec.name, "study.mode": spec.mode, "study.seeds": spec.seeds,
              "study.objective": json.dumps(spec.objective.__dict__), "study.spec": str(spec.path),
              "study.storage": redact(store.url),
              **({f"factor.{k}": v for k, v in spec.factors.items()} if spec.mode == "grid" else
                 {f"space.{p.key}": p.__dict__ for p in spec.search_space})}
    parent = ensure_parent_run(tracking_uri, spec.experiment_name, spec.name, store.parent_run_id, params)
    store.set_parent_run_id(parent)
    if spec.mode == "grid":
        added = store.enqueue_grid()
        console.print(f"study {spec.name}: {len(spec.grid_configs())} configurations x {len(spec.seeds)} seeds = "
                      f"{len(spec.grid_configs()) * len(spec.seeds)} cells ({added} newly enqueued); storage "
                      f"{redact(store.url)}; MLflow experiment {spec.experiment_name!r}, parent run {parent}")
    else:
        console.print(f"study {spec.name}: Optuna search ({spec.sampler}, pruner {spec.pruner}), {spec.n_configs} "
                      f"configurations x {len(spec.seeds)} seeds; storage {redact(store.url)}; parent run {parent}")
    if retry_failed:
        requeued = [r for r in store.records() if r.state == "failed"]
        for rec in requeued:
            last = rec.trials[-1].user_attrs
            store.cells.enqueue_trial({}, user_attrs={**{k: last[k] for k in ("cell_id", "config_id", "seed",
                                                                                "values") if k in last},
                                                      **({"config_trial": last["config_trial"]}
                                                         if "config_trial" in last else {}),
                                                      "attempt": int(last.get("attempt", 1)) + 1})
        console.print(f"re-enqueued {len(requeued)} failed cell(s)")
    prepare_bases(spec)
    logs = spec.study_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for slot in slots:
        log = (logs / f"worker-{slot.index}.log").open("a")
        procs.append(subprocess.Popen(worker_command(spec.path, store.url, slot, spec.output_dir), stdout=log,
                                      stderr=subprocess.STDOUT))
    console.print(f"{len(slots)} worker(s): " + ", ".join(f"{s.device} x{s.threads} threads, "
                                                          f"{s.rollout_workers} rollout proc" for s in slots)
                  + f"; logs in {logs}")
    started = time.time()
    try:
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while any(p.poll() is None for p in procs):
                records = store.records()
                counts = summary_counts(records, spec)
                live.update(progress_line(counts, eta_seconds(records, counts, len(slots)), started))
                time.sleep(2.0)
            records = store.records()
            counts = summary_counts(records, spec)
            live.update(progress_line(counts, 0.0, started))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        console.print("[red]interrupted[/]: run the same command again to resume")
        raise
    return finalize(spec, store, tracking_uri)


def finalize(spec: StudySpec, store: StudyStore, tracking_uri: str | None) -> int:
    """Close what a dead process left open and, once every cell has ended, finish the parent run."""
    records = store.records()
    counts = summary_counts(records, spec)
    parent = store.parent_run_id
    live = {str(t.number) for r in records for t in r.trials if t.state.name == "RUNNING"}
    if parent:
        sweep_orphans(tracking_uri, spec.experiment_name, parent, live, "its worker ended without closing it")
    console.print(status_table(records, spec))
    ended = counts["done"] + counts["failed"] + counts["pruned"]
    if ended < counts["total"]:
        console.print(f"{counts['total'] - ended} cell(s) not ended; run `ript-ablate study run {spec.path}` again "
                      "to go on")
        return 1
    csv_path = write_cells_csv(spec, records)
    if parent:
        values = [r.value for r in records if r.value is not None]
        best = (max(values) if spec.objective.direction == "maximize" else min(values)) if values else float("nan")
        walls = [float(t.user_attrs["overhead_s"]) for r in records for t in r.trials if "overhead_s" in t.user_attrs]
        metrics = {"study/cells_done": counts["done"], "study/cells_failed": counts["failed"],
                   "study/cells_pruned": counts["pruned"], "study/best_objective": best}
        if walls:
            metrics["study/runner_overhead_s_mean"] = sum(walls) / len(walls)
        finish_parent(tracking_uri, parent, "FAILED" if counts["failed"] else "FINISHED", metrics,
                      {"ript.status": "complete" if not counts["failed"] else "complete-with-failures"},
                      [str(csv_path)])
    console.print(f"study {spec.name}: {counts['done']} done, {counts['failed']} failed, {counts['pruned']} pruned; "
                  f"cells table {csv_path}")
    return EXIT_CELLS_FAILED if counts["failed"] else 0


def write_cells_csv(spec: StudySpec, records: list[CellRecord]) -> Path:
    path = spec.study_dir / "cells.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in records for k in r.values})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell_id", "config_id", "seed", *keys, "state", "objective", "attempts", "status",
                         "reason", "mlflow_run_id"])
        for r in records:
            final = r.trials[-1].user_attrs if r.trials else {}
            done = next((t.user_attrs for t in r.trials if t.state.name == "COMPLETE"), final)
            writer.writerow([r.cell_id, r.config_id, r.seed, *(r.values.get(k) for k in keys), r.state,
                             r.value, r.attempts, r.status, r.reason, done.get("mlflow_run_id", "")])
    return path


def run_worker(spec: StudySpec, storage: str | None, devices: str, slot_json: str | None) -> int:
    """One worker in this process: `study run` starts these; on another machine it joins the study."""
    slot = Slot(**json.loads(slot_json)) if slot_json else plan_slots(1, devices)[0]
    store = open_store(spec, storage, create=False)
    if not store.parent_run_id:
        console.print("[yellow]warning:[/] the study has no MLflow parent run yet (start it with `study run`)")
    if spec.mode == "grid" and not store.cells.get_trials(deepcopy=False):
        console.print("[yellow]warning:[/] no cells enqueued yet; `ript-ablate study run` enqueues them")
    if not slot_json:
        console.print(f"joined study {spec.name} at {redact(store.url)} on {slot.device} "
                      f"({slot.threads} threads, {slot.rollout_workers} rollout processes)")
    ran = Worker(spec, store, slot).run()
    console.print(f"worker {slot.index}: ran {ran} cell(s); nothing left to claim")
    return 0


def show_status(spec: StudySpec, storage: str | None) -> int:
    store = open_store(spec, storage, create=False)
    records = store.records()
    counts = summary_counts(records, spec)
    out = Console(width=max(120, console.width))  # the table is this command's output: stdout
    out.print(status_table(records, spec))
    out.print(progress_line(counts, eta_seconds(records, counts, 1), time.time()).split(" | ")[0])
    return 0
