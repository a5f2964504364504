"""MLflow -> one tidy pandas frame: a row per (cell, iteration, metric), with the cell's configuration beside it.

The study's parent run names its child runs; per cell the run that holds the result is taken (the finished one,
or the diverged one; killed and failed attempts are left out but counted). Cells the spec defines without such a
run are listed as missing, so a partial study reports what it has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ript_ablate.study.spec import CONTROL, StudySpec, cell_id_for, config_id_for, describe
from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.runs import child_runs, find_parent_run, metric_histories

# What the report reads, besides the spec's success metric (and <success metric>/<task> per task found) and its
# objective metric.
REPORT_METRICS = ("eval/success_rate", "train/success_rate", "ppo/approx_kl", "ppo/clip_fraction",
                  "grad_norm/backbone", "grad_norm/header", "health/nonfinite_events", "scale/log_b_mean",
                  "sampling/contexts_tried", "sampling/accepted_groups", "sampling/equal_reward_fraction")
SAMPLED_PREFIX = "train/success_rate/"  # per task: the sampled behaviour's success (the health table)
CONTROL_COLUMN = tag.FACTOR_PREFIX + CONTROL  # the runs of a control configuration (outside every effect)
STATES_PREFIX = "eval/states/"  # evaluation states per task: the binomial noise of a rate
METRICS_COLUMNS = ("cell_id", "config_id", "config", "seed", "run_id", "status", "iteration", "metric", "value")


@dataclass
class StudyData:
    spec: StudySpec
    parent_run_id: str | None
    frame: pd.DataFrame  # long: cell_id, config_id, config, seed, factor columns, run_id, status, iteration, metric, value
    cells: pd.DataFrame  # one row per cell with a result: cell_id, config_id, config, seed, factors, run_id, status
    missing: list[str] = field(default_factory=list)  # cell ids (with their configuration) without a result
    pruned: list[str] = field(default_factory=list)  # cell ids (with their configuration) stopped by the pruner
    failed_attempts: int = 0
    tasks: list[str] = field(default_factory=list)
    # cell id -> {iteration: {task: "0110..."}}: each state's success at the run's full evaluations (its tags)
    outcomes: dict[str, dict[int, dict[str, str]]] = field(default_factory=dict)

    @property
    def success_metric(self) -> str:
        return self.spec.success_metric

    @property
    def factors(self) -> list[str]:
        """The factor columns (a control's name is not a factor)."""
        return [c for c in self.cells.columns if c.startswith(tag.FACTOR_PREFIX) and c != CONTROL_COLUMN]


def expected_cells(spec: StudySpec, configs: list[dict] | None = None) -> dict[str, str]:
    """cell id -> configuration description, for every cell the spec defines (optuna: the configs so far)."""
    if configs is None:
        configs = spec.grid_configs() if spec.mode == "grid" else []
    return {cell_id_for(config_id_for(v), s): describe(v) for v in configs for s in spec.seeds}


def collect(spec: StudySpec, tracking_uri: str | None = None, expected: dict[str, str] | None = None) -> StudyData:
    parent = find_parent_run(tracking_uri, spec.experiment_name)
    runs = child_runs(tracking_uri, spec.experiment_name, parent) if parent else []
    chosen: dict[str, object] = {}
    pruned_ids: set[str] = set()
    failed = 0
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        if tags.get(tag.STATUS) == "pruned":
            pruned_ids.add(tags[tag.CELL_ID])
            continue
        usable = run.info.status == "FINISHED" or tags.get(tag.STATUS) == "diverged"
        if not usable:
            failed += 1
            continue
        chosen[tags[tag.CELL_ID]] = run  # the latest usable run of a cell wins
    rows, cell_rows, tasks = [], [], set()
    outcomes: dict[str, dict[int, dict[str, str]]] = {}
    for cell_id, run in chosen.items():
        tags = run.data.tags
        outcomes[cell_id] = state_outcomes(tags)
        order = [tag.FACTOR_PREFIX + k for k in spec.factors] or [tag.FACTOR_PREFIX + p.key for p in spec.search_space]
        found = [k for k in tags if k.startswith(tag.FACTOR_PREFIX)]
        factors = {k: _parse(tags[k]) for k in [*[o for o in order if o in tags], *sorted(set(found) - set(order))]}
        label = describe({tag.factor_key(k): v for k, v in factors.items()})
        if spec.mode == "optuna":  # sampled values can round alike: the configuration id keeps them apart
            label = f"{tags.get(tag.CONFIG_ID, '')}: {label}"
        info = {"cell_id": cell_id, "config_id": tags.get(tag.CONFIG_ID, ""), "config": label,
                "seed": int(tags.get(tag.SEED, 0)), **factors, "run_id": run.info.run_id,
                "status": tags.get(tag.STATUS, "finished")}
        cell_rows.append(info)
        wanted = {*REPORT_METRICS, spec.success_metric, spec.objective.metric}
        per_task = spec.success_metric + "/"
        names = [m for m in run.data.metrics if m in wanted or m.startswith((per_task, SAMPLED_PREFIX, STATES_PREFIX))]
        tasks.update(m[len(per_task):] for m in names if m.startswith(per_task))
        for name, points in metric_histories(tracking_uri, run.info.run_id, names).items():
            rows.extend({**info, "iteration": step, "metric": name, "value": value} for step, value in points.items())
    frame = pd.DataFrame(rows)
    cells = pd.DataFrame(cell_rows)
    if not cells.empty:
        cells = cells.sort_values(["config", "seed"]).reset_index(drop=True)
    want = expected if expected is not None else expected_cells(spec)
    missing = [f"{cid} ({desc})" for cid, desc in want.items() if cid not in chosen and cid not in pruned_ids]
    pruned = [f"{cid} ({want.get(cid, '?')})" for cid in sorted(pruned_ids) if cid not in chosen]
    return StudyData(spec, parent, frame, cells, missing, pruned, failed, sorted(tasks), outcomes)


def state_outcomes(tags: dict[str, str]) -> dict[int, dict[str, str]]:
    """{iteration: {task: "0110..."}} from a run's `ript.outcomes.<iteration>.<task>` tags."""
    found: dict[int, dict[str, str]] = {}
    for key, bits in tags.items():
        if key.startswith(tag.OUTCOMES_PREFIX):
            iteration, _, task = key[len(tag.OUTCOMES_PREFIX):].partition(".")
            if iteration.isdigit() and task and set(bits) <= {"0", "1"}:
                found.setdefault(int(iteration), {})[task] = bits
    return found


def from_metrics_csv(spec: StudySpec, path: str | Path) -> StudyData:
    """A study's data from the `metrics.csv` a report wrote (no MLflow needed): a committed report can be rebuilt
    and checked from its own numbers. Failed attempts are not in the file and count as none."""
    from ript_ablate.errors import RiptAblateError

    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RiptAblateError(f"cannot read the study metrics {path}: {exc}") from None
    missing_columns = [c for c in METRICS_COLUMNS if c not in frame.columns]
    if missing_columns:
        raise RiptAblateError(f"{path} is not a report's metrics.csv: it lacks the column(s) {missing_columns} "
                              f"(expected {', '.join(METRICS_COLUMNS)} and the factor columns)")
    ours = {config_id_for(v) for v in spec.grid_configs()}
    if not ours & set(frame["config_id"]):
        raise RiptAblateError(f"{path} holds no configuration of study {spec.name!r} ({spec.path}): it is another "
                              "study's metrics, or the spec's factors changed since")
    per_cell = [c for c in frame.columns if c not in ("iteration", "metric", "value")]
    cells = frame[per_cell].drop_duplicates("cell_id").sort_values(["config", "seed"]).reset_index(drop=True)
    cells = cells.astype(object).where(cells.notna(), None)
    per_task = spec.success_metric + "/"
    tasks = sorted({m[len(per_task):] for m in frame["metric"].unique() if m.startswith(per_task)})
    done = set(cells["cell_id"])
    missing = [f"{cid} ({desc})" for cid, desc in expected_cells(spec).items() if cid not in done]
    return StudyData(spec, None, frame, cells, missing, [], 0, tasks)


def _parse(text: str):
    """Tag values are strings; give factors back their type (True, 0.2, ...)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads '1e-05' (how Python writes 1e-5) as text
        return float(text) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text) else text
    return value if isinstance(value, (bool, int, float)) else text


def series(data: StudyData, metric: str) -> pd.DataFrame:
    """Wide per run: index (cell_id), columns iteration, values of one metric."""
    part = data.frame[data.frame["metric"] == metric] if not data.frame.empty else data.frame
    if part.empty:
        return pd.DataFrame()
    return part.pivot_table(index="cell_id", columns="iteration", values="value", aggfunc="last")
