"""Cells per hour of the study runner with 1 and with 2 workers, and its overhead per cell.

    python -m ript_ablate.bench.study_throughput [--cells 8] [--iterations 3]

Runs the same small grid (one Meta-World task, a tiny policy) twice, as two studies in a temporary directory:
once with --workers 1, once with --workers 2, side by side in one process. Prints cells/hour of each, their
ratio, and the runner's overhead per cell (a cell's wall time from claim to recorded result, minus the training
time measured inside the cell process: process start, imports, MLflow run, storage updates).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from ript_ablate.bench import run_main
from ript_ablate.cli import main as cli
from ript_ablate.study.spec import load_study
from ript_ablate.study.store import StudyStore


def small_config(cache: str, iterations: int) -> dict:
    return {
        "suite": {"tasks": ["reach-v3"], "demos_per_task": 2, "contexts_per_task": 4, "eval_states_per_task": 4,
                  "num_workers": 2, "envs_per_worker": 8},
        "policy": {"d_model": 32, "n_layers": 1, "n_heads": 2, "chunk_size": 4},
        "sft": {"steps": 300, "scale_steps": 50, "batch_size": 64, "cache_dir": cache},
        "algo": {"max_episode_length": 60, "rloo_batch_size": 4, "scale_factor": 5.0, "lora_rank": 4,
                 "max_step_batch_size": 64},
        "training": {"n_iterations": iterations, "contexts_per_iteration": 2, "eval_interval": iterations,
                     "save_interval": iterations},
        "tracking": {"log_checkpoint": False},
    }


def run(tmp: Path, name: str, workers: int, n_cells: int) -> tuple[float, list[float], list[float]]:
    clips = [round(0.1 + 0.05 * i, 2) for i in range(n_cells // 2)]
    spec_path = tmp / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({"name": name, "config": "small.yaml", "mode": "grid",
                                         "factors": {"algo.ppo_clip_high": clips}, "seeds": [0, 1],
                                         "output_dir": str(tmp / "studies")}))
    start = time.perf_counter()
    code = cli(["study", "run", str(spec_path), "--workers", str(workers)])
    wall = time.perf_counter() - start
    assert code == 0, f"study {name} ended with exit code {code}"
    spec = load_study(spec_path)
    trials = StudyStore(spec, spec.storage_url(), create=False).cells.get_trials()
    overhead = [float(t.user_attrs["overhead_s"]) for t in trials if "overhead_s" in t.user_attrs]
    train = [float(t.user_attrs["train_s"]) for t in trials if "train_s" in t.user_attrs]
    return wall, overhead, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="study-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    (tmp / "small.yaml").write_text(yaml.safe_dump(small_config(str(tmp / "cache"), args.iterations)))
    os.chdir(tmp)
    results = {}
    for workers in (1, 2):
        wall, overhead, train = run(tmp, f"bench{workers}", workers, args.cells)
        results[workers] = args.cells / wall * 3600
        print(f"{workers} worker(s): {args.cells} cells in {wall:.1f}s = {results[workers]:.0f} cells/hour; "
              f"training {statistics.fmean(train):.1f}s per cell, runner overhead per cell "
              f"{statistics.fmean(overhead):.2f}s (min {min(overhead):.2f}, max {max(overhead):.2f})", flush=True)
    print(f"2 workers / 1 worker: {results[2] / results[1]:.2f}x cells per hour")


if __name__ == "__main__":
    run_main(main)
