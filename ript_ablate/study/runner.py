"""`study run`, `study worker` and `study status`: set a study up, run its workers, show where it stands.

`study run` is safe to repeat: it re-attaches to the study in its storage, skips finished cells, recovers cells
whose worker died (their retries resume from the last checkpoint) and finishes the study's MLflow parent run once
every cell has ended.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ript_ablate.errors import is_infrastructure_error, readable_error
from ript_ablate.progress import console
from ript_ablate.study.resources import Slot, plan_slots
from ript_ablate.study.spec import StudySpec, describe, with_values
from ript_ablate.study.store import CellRecord, StudyStore, redact
from ript_ablate.study.worker import Worker, plugin_names
from ript_ablate.study.zygote import COLD_CELLS_ENV, Zygote
from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.runs import ensure_parent_run, finish_parent, sweep_orphans

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


def status_table(records: list[CellRecord], spec: StudySpec, width: int | None = None):
    """Every cell, one row each, readable at `width` columns (80 included): ids never break, one factor value per
    line; failure reasons fill the width that is left, and any reason cut there follows the table whole."""
    from rich.console import Group
    from rich.text import Text

    style = {"done": "green", "failed": "red", "running": "cyan", "pruned": "yellow", "retrying": "magenta"}
    rows = []
    for rec in records:
        value = f"{rec.value:.3f}" if rec.value is not None else "-"
        config = "\n".join(describe({k: v}) for k, v in rec.values.items()) or "base"
        rows.append((rec.cell_id, config, str(rec.seed), rec.state, value, str(rec.attempts), rec.reason))
    natural = [max([len(h), *(max(len(part) for part in row[i].split("\n")) for row in rows)])
               for i, h in enumerate(("cell", "configuration", "seed", "state", "objective", "tries"))]
    room = (width or 10_000) - sum(natural) - 2 * len(natural) - 2
    inline = room >= 16  # else reasons (if any) follow the table
    table = Table(title=f"study {spec.name} ({spec.mode}, objective {spec.objective.reduction} "
                        f"{spec.objective.metric})", title_justify="left", pad_edge=False, box=None)
    for header, justify in (("cell", "left"), ("configuration", "left"), ("seed", "right"), ("state", "left"),
                            ("objective", "right"), ("tries", "right")):
        table.add_column(header, no_wrap=True, justify=justify)  # type: ignore[arg-type]
    if inline:
        table.add_column("reason", no_wrap=True, overflow="ellipsis", max_width=max(room, 16))
    for cell, config, seed, state, value, tries, reason in rows:
        cells = [cell, config, seed, f"[{style.get(state, 'white')}]{state}[/]", value, tries]
        table.add_row(*cells, *([reason] if inline else []))
    # a reason the table had to cut is given whole below it
    notes = [Text(f"{row[0]}: {row[6]}", overflow="fold") for row in rows
             if row[6] and (not inline or len(row[6]) > max(room, 16))]
    if not notes:
        return table
    return Group(table, Text("reasons in full:" if inline else "reasons:"), *notes)


def progress_line(counts: dict[str, int], eta_s: float | None, started: float) -> str:
    """One status line of at most about 75 characters, so an 80-column terminal shows it whole."""
    ended = counts["done"] + counts["failed"] + counts["pruned"]
    eta = f"ETA {eta_s / 60:.1f} min" if eta_s is not None else "ETA -"
    return (f"[bold]{ended}/{counts['total']}[/] ended: [green]{counts['done']} done[/], "
            f"[cyan]{counts['running']} run[/], {counts['waiting'] + counts['retrying']} wait, "
            f"[red]{counts['failed']} failed[/]" + (f", [yellow]{counts['pruned']} pruned[/]" if counts['pruned']
                                                    else "")
            + f" | {(time.time() - started) / 60:.1f} min | {eta}")


def eta_seconds(records: list[CellRecord], counts: dict[str, int], workers: int) -> float | None:
    walls = [float(t.user_attrs["wall_s"]) for r in records for t in r.trials if "wall_s" in t.user_attrs]
    remaining = counts["total"] - counts["done"] - counts["failed"] - counts["pruned"]
    if not walls:
        return None
    return sum(walls) / len(walls) * remaining / max(1, workers)


def prepare_bases(spec: StudySpec, slot: Slot | None = None) -> None:
    """Build (or find in the cache) each behaviour-cloning base the cells need, once, before workers start:
    concurrent cells then only read the cache. With `slot` (where the cells will run), each distinct start is
    also evaluated once (`Trainer.warm_start`), so that no cell repeats its iteration-0 evaluation."""
    import torch

    from ript_ablate.bc import base_key, ensure_base
    from ript_ablate.config import to_dict
    from ript_ablate.plugins import build_world, checked_config_from_dict
    from ript_ablate.ript.trainer import Trainer

    if spec.command:
        return  # your own trainer builds what it needs
    configs = [spec.cell_config(v, spec.seeds[0]) for v in (spec.grid_configs() if spec.mode == "grid" else [{}])]
    bases, starts = set(), set()
    for cfg in configs:
        world = build_world(cfg)
        key = base_key(cfg, world) if not cfg.algo.checkpoint_path else cfg.algo.checkpoint_path
        if not cfg.algo.checkpoint_path and (key, cfg.sft.cache_dir) not in bases:
            bases.add((key, cfg.sft.cache_dir))
            ensure_base(cfg, world)
        if slot is None or spec.processes_per_cell > 1:
            continue
        placed = checked_config_from_dict(with_values(to_dict(cfg), slot.overrides(cfg.suite.num_workers)))
        start = json.dumps([key, to_dict(placed.suite), placed.algo.header_checkpoint, placed.algo.lora_adaptor_ckpt,
                            placed.algo.max_episode_length, placed.training.precision, placed.training.device,
                            cfg.sft.cache_dir], sort_keys=True, default=str)
        if start in starts:
            continue
        starts.add(start)
        threads = torch.get_num_threads()
        torch.set_num_threads(slot.threads)  # as the cells will run: the evaluation is then theirs to the bit
        try:
            Trainer(placed).warm_start()
        finally:
            torch.set_num_threads(threads)


def worker_command(spec_path: Path, url: str, slot: Slot, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ript_ablate.cli", "study", "worker", str(spec_path), "--storage", url,
            "--output-dir", str(output_dir), "--slot", json.dumps(asdict(slot))]


STATUS_REFRESH_S = 2.0  # how often `study run` reads the store for its status line
END_POLL_S = 0.1  # how often it looks whether its workers have ended
EXIT_INTERRUPTED = 130  # stopped by SIGINT or SIGTERM: what was running is marked killed and resumes next time
WORKER_STOP_S = 60.0  # how long stopped workers get to stop their cells and record them


def study_params(spec: StudySpec, store: StudyStore) -> dict:
    return {"study.name": spec.name, "study.mode": spec.mode, "study.seeds": spec.seeds,
            "study.objective": json.dumps(spec.objective.__dict__), "study.spec": str(spec.path),
            "study.storage": redact(store.url),
            **({tag.FACTOR_PREFIX + k: v for k, v in spec.factors.items()} if spec.mode == "grid" else
               {f"space.{p.key}": p.__dict__ for p in spec.search_space})}


def set_up(spec: StudySpec, store: StudyStore, tracking_uri: str | None) -> tuple[str, int]:
    """The study's MLflow parent run and, for a grid, every cell enqueued: once, even when several processes
    (a `study run` and `study worker`s on other machines) set the same study up at the same moment."""
    with store.setup_lock():
        parent = ensure_parent_run(tracking_uri, spec.experiment_name, spec.name, store.parent_run_id,
                                   study_params(spec, store))
        store.set_parent_run_id(parent)
        added = store.enqueue_grid() if spec.mode == "grid" else 0
    return parent, added


def run_study(spec: StudySpec, workers: int | None, devices: str, storage: str | None,
              retry_failed: bool = False) -> int:
    from ript_ablate.tracking import check_tracking_store, resolve_tracking_uri

    slots = plan_slots(workers, devices, processes=spec.processes_per_cell)
    tracking_uri = resolve_tracking_uri(spec.tracking_uri)
    check_tracking_store(tracking_uri)  # one line now, not minutes of retries in every cell
    return _run_study(spec, slots, tracking_uri, storage, retry_failed)


def nothing_left(store: StudyStore) -> bool:
    """No cell waits or runs, the search has all its configurations, and the look that adds seeds (adaptive seeds,
    the race) adds none: a `study run` of a finished study closes it without starting a process."""
    return store.done() and not store.extend()


def start_zygote(spec: StudySpec, slots: list[Slot]) -> Zygote | None:
    """Workers are forked by a zygote that imports what workers and cells need once, while the study's bases are
    prepared; each worker then forks its own cell zygote from itself (study/zygote.py)."""
    if os.environ.get(COLD_CELLS_ENV) == "1" or spec.processes_per_cell != 1:
        return None
    zygote = Zygote(*plugin_names(spec), {**os.environ, "OMP_NUM_THREADS": str(slots[0].threads),
                                          "MKL_NUM_THREADS": str(slots[0].threads)}, None)
    zygote.ensure()
    return zygote


def _run_study(spec: StudySpec, slots: list[Slot], tracking_uri: str | None, storage: str | None,
               retry_failed: bool) -> int:
    store = open_store(spec, storage, create=True)
    parent, added = set_up(spec, store, tracking_uri)
    if spec.mode == "grid":
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
    if nothing_left(store):
        store.settle_configs()
        console.print("nothing left to run: every cell has ended")
        return finalize(spec, store, tracking_uri)
    zygote = start_zygote(spec, slots)
    try:
        return _run_workers(spec, slots, tracking_uri, store, zygote)
    finally:
        if zygote is not None:
            zygote.close()


def _run_workers(spec: StudySpec, slots: list[Slot], tracking_uri: str | None, store: StudyStore,
                 zygote: Zygote | None) -> int:
    """Prepare the bases, start one worker a slot, show progress until they end, then finalize."""
    # SIGINT explicitly too: a runner started from a background job inherits SIGINT ignored, and would miss Ctrl-C
    # or a `kill -INT` to its process group while its workers (which set their own handlers) stop
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    procs: list = []
    try:
        prepare_bases(spec, slots[0])
        logs = spec.study_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for slot in slots:
            command = worker_command(spec.path, store.url, slot, spec.output_dir)
            log_path = logs / f"worker-{slot.index}.log"
            proc = None
            if zygote is not None:
                try:
                    proc = zygote.spawn_worker(command[3:], dict(os.environ), log_path, os.getcwd(),
                                               *plugin_names(spec))
                except (OSError, RuntimeError):
                    zygote = None  # it could not fork (see the worker log): workers start as new interpreters
            procs.append(proc or subprocess.Popen(command, stdout=log_path.open("a"), stderr=subprocess.STDOUT))
        console.print(f"{len(slots)} worker(s): " + ", ".join(f"{s.device} x{s.threads} threads, "
                                                              f"{s.rollout_workers} rollout proc" for s in slots)
                      + f"; logs in {logs}")
        started = time.time()
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while any(p.poll() is None for p in procs):
                records = store.records()
                counts = summary_counts(records, spec)
                live.update(progress_line(counts, eta_seconds(records, counts, len(slots)), started))
                refresh = time.monotonic() + STATUS_REFRESH_S  # the status every 2 s; the end as soon as it comes
                while time.monotonic() < refresh and any(p.poll() is None for p in procs):
                    time.sleep(END_POLL_S)
            records = store.records()
            counts = summary_counts(records, spec)
            live.update(progress_line(counts, 0.0, started))
        if not console.is_terminal:
            console.print()  # the last status line ends its line in a log file too
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return interrupt(spec, store, tracking_uri, procs)
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is _raise_interrupt:
                signal.signal(signum, handler)
    return finalize(spec, store, tracking_uri)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt(spec: StudySpec, store: StudyStore, tracking_uri: str | None, procs: list[subprocess.Popen]) -> int:
    """Stop every worker (each stops its cell's process group and records the cell killed, to run again), close
    the parent run KILLED, and say so in one line."""
    started = time.time()
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + WORKER_STOP_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    killed = 0
    try:
        records = store.records()
        killed = sum(1 for r in records for t in r.trials if t.user_attrs.get("status") == "killed"
                     and t.datetime_complete is not None and t.datetime_complete.timestamp() >= started - 5)
        _close_parent(spec, store, tracking_uri, "KILLED", tag.outcome_tags("interrupted"))
    except Exception as exc:  # the store is away too: the next `study run` cleans up
        console.print(f"[yellow]warning:[/] could not record the interruption ({readable_error(exc)})")
    console.print(f"[red]interrupted[/]: workers stopped, {killed} running cell(s) marked killed; run "
                  f"`ript-ablate study run {spec.path}` again to resume")
    return EXIT_INTERRUPTED


def _close_parent(spec: StudySpec, store: StudyStore, tracking_uri: str | None, status: str,
                  tags: dict[str, str]) -> None:
    """Sweep child runs left RUNNING by dead processes and end the parent run with `status`."""
    parent = store.parent_run_id
    if not parent:
        return
    live = {str(t.number) for t in store.cells.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    sweep_orphans(tracking_uri, spec.experiment_name, parent, live, "its worker ended without closing it")
    finish_parent(tracking_uri, parent, status, {}, tags, [])


def finalize(spec: StudySpec, store: StudyStore, tracking_uri: str | None) -> int:
    """Close what a dead process left open and, once every cell has ended, finish the parent run."""
    records = store.records()
    counts = summary_counts(records, spec)
    parent = store.parent_run_id
    live = {str(t.number) for r in records for t in r.trials if t.state.name == "RUNNING"}
    if parent:
        try:
            sweep_orphans(tracking_uri, spec.experiment_name, parent, live, "its worker ended without closing it")
        except Exception as exc:  # the tracking store is away: report, and let the next `study run` sweep
            if not is_infrastructure_error(exc):
                raise
            console.print(f"[yellow]warning:[/] could not close runs left open ({readable_error(exc)}); run "
                          "`study run` again once the tracking store is back")
    console.print(status_table(records, spec, console.width))
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
        try:
            finish_parent(tracking_uri, parent, "FAILED" if counts["failed"] else "FINISHED", metrics,
                          tag.outcome_tags("complete" if not counts["failed"] else "complete-with-failures"),
                          [str(csv_path)])
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            console.print(f"[yellow]warning:[/] could not finish the study's MLflow run ({readable_error(exc)}); "
                          "run `study run` again once the tracking store is back")
            return 1
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
    """One worker in this process: `study run` starts these; on another machine it joins the study. On
    PostgreSQL a worker may be the first to arrive: it then sets the study up from its spec (the same
    fingerprint rule as `study run`), so machines can start in any order."""
    from ript_ablate.study.store import RDB_PREFIXES
    from ript_ablate.tracking import check_tracking_store, resolve_tracking_uri

    slot = Slot(**json.loads(slot_json)) if slot_json else plan_slots(1, devices, processes=spec.processes_per_cell)[0]
    tracking_uri = resolve_tracking_uri(spec.tracking_uri)
    url = spec.storage_url(storage)
    independent = slot_json is None
    if independent:
        check_tracking_store(tracking_uri)
    store = open_store(spec, storage, create=independent and url.startswith(RDB_PREFIXES))
    if independent:
        parent, added = set_up(spec, store, tracking_uri)
        prepare_bases(spec, slot)
        console.print(f"joined study {spec.name} at {redact(store.url)} on {slot.device} "
                      f"({slot.threads} threads, {slot.rollout_workers} rollout processes); parent run {parent}"
                      + (f"; enqueued {added} cell(s)" if added else ""))
    worker = Worker(spec, store, slot, tracking_uri)
    ran = worker.run()
    if worker.stopping:
        console.print(f"worker {slot.index}: stopped by {worker.signal_name or 'a signal'} after {ran} cell(s); the "
                      "cell it was running is marked killed and runs again on the next `study run`")
        return EXIT_INTERRUPTED
    console.print(f"worker {slot.index}: ran {ran} cell(s); nothing left to claim")
    return 0


def show_status(spec: StudySpec, storage: str | None) -> int:
    store = open_store(spec, storage, create=False)
    records = store.records()
    counts = summary_counts(records, spec)
    out = Console(width=max(120, console.width))  # the table is this command's output: stdout
    out.print(status_table(records, spec, out.width))
    out.print(progress_line(counts, eta_seconds(records, counts, 1), time.time()).split(" | ")[0])
    return 0
