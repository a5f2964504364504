"""Per-cell machinery of the study runner with cold cells (a new interpreter per cell) and warm ones (forked by the
worker's zygote), side by side in one run on the same study specs.

    python -m ript_ablate.bench.cell_start [SPEC ...] [--workers 2]

SPEC defaults to the example plug-in's study and the own-trainer study. Each spec runs twice into a temporary
directory, first with RIPT_ABLATE_COLD_CELLS=1, then warm. Per cell, machinery is the wall time from claim to the
recorded result minus the training time measured inside the cell (process start, imports, MLflow run, storage
updates); the table gives its mean, min and max, the mean training time and the study's wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ript_ablate.bench import run_main
from ript_ablate.cli import main as cli
from ript_ablate.study.spec import load_study
from ript_ablate.study.store import StudyStore
from ript_ablate.study.zygote import COLD_CELLS_ENV

DEFAULT_SPECS = ("examples/pointmass/study.yaml", "examples/own_trainer/study.yaml")


def run(spec_path: str, out: Path, workers: int, cold: bool) -> dict[str, float]:
    os.environ[COLD_CELLS_ENV] = "1" if cold else "0"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    out.mkdir(parents=True)
    start = time.perf_counter()
    code = cli(["study", "run", spec_path, "--workers", str(workers), "--output-dir", str(out)])
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{spec_path} ({'cold' if cold else 'warm'}) ended with exit code {code}")
    spec = load_study(spec_path, out)
    trials = StudyStore(spec, spec.storage_url(), create=False).cells.get_trials()
    overhead = [float(t.user_attrs["overhead_s"]) for t in trials if "overhead_s" in t.user_attrs]
    train = [float(t.user_attrs["train_s"]) for t in trials if "train_s" in t.user_attrs]
    return {"cells": len(overhead), "mean": statistics.fmean(overhead), "min": min(overhead), "max": max(overhead),
            "train": statistics.fmean(train) if train else float("nan"), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", default=list(DEFAULT_SPECS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cell-start-") as tmp:
        for i, spec in enumerate(args.specs):
            for cold in (True, False):
                result = run(spec, Path(tmp) / f"{i}-{'cold' if cold else 'warm'}", args.workers, cold)
                rows.append((spec, "cold" if cold else "warm", result))
                print(f"{spec} {rows[-1][1]}: done", flush=True)
    os.environ.pop(COLD_CELLS_ENV, None)
    print(f"{'study':<36} {'cells':>6} {'machinery s/cell':>17} {'min':>6} {'max':>6} {'training s/cell':>16} "
          f"{'study wall s':>13}")
    for spec, kind, r in rows:
        print(f"{spec + ' ' + kind:<36} {r['cells']:>6} {r['mean']:>17.2f} {r['min']:>6.2f} {r['max']:>6.2f} "
              f"{r['train']:>16.2f} {r['wall']:>13.1f}")


if __name__ == "__main__":
    run_main(main)
