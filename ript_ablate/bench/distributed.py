"""One trial on 1 and on N processes, side by side in one run: iteration time split into rollout, update and
evaluation, env steps/s, the all-reduce's share of the update, GPU memory, and the scaling ratio.

    python -m ript_ablate.bench.distributed [CONFIG] [--nproc 1 2] [--splits tasks contexts] [--iterations 3]
                                            [--set KEY=VALUE ...]

Each process count trains the same config for `--iterations` iterations (`train --nproc N`: torchrun, NCCL on
CUDA with one GPU per process, gloo on CPU with cores / N threads each), untracked, after the behaviour-cloning
base is built once. Rollouts run in each training process (`suite.num_workers: 0` unless `--rollout-workers`) and
every process gets the same torch threads (cores / the largest N), so N processes roll out on N cores and the ratio
measures the trial's own scaling, not one process's use of idle cores. Per-iteration figures are
medians over the iterations after the first (iteration 1 pays for warm-up); evaluation over the evaluations run.
Each process count above 1 runs once per `training.rank_split` in `--splits` (the original's whole tasks per rank,
and every task's contexts dealt over the ranks). On a machine with GPUs run it there as is: the device is CUDA when
one is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ript_ablate.bc import ensure_base
from ript_ablate.bench import run_main
from ript_ablate.plugins import load_checked_config
from ript_ablate.study.resources import available_cores

FIGURES = (("perf/iteration_s", "iteration s"), ("perf/rollout_s", "rollout s"), ("perf/update_s", "update s"),
           ("perf/allreduce_s", "all-reduce s"), ("perf/rank_wait_s", "rank wait s"),
           ("perf/rank_rollout_imbalance", "rollout max/min"), ("perf/eval_s", "eval s"), ("perf/env_steps_per_s", "env steps/s"),
           ("perf/gpu_max_memory_gib", "GPU GiB"))


def median_of(history: list[dict], key: str) -> float | None:
    """Median over the iterations after the first (evaluations: all of them); an iteration's time without the
    evaluation it ended with, so that the split adds up."""
    if key == "perf/eval_s":
        values = [h[key] for h in history if key in h]
    elif key == "perf/iteration_s":
        values = [h[key] - h.get("perf/eval_s", 0.0) for h in history if key in h and h["iteration"] > 1]
    else:
        values = [h[key] for h in history if key in h and h["iteration"] > 1]
    return statistics.median(values) if values else None


def run(config: str, nproc: int, iterations: int, overrides: list[str], out: Path,
        threads: int) -> tuple[list[dict], float]:
    argv = [sys.executable, "-m", "ript_ablate", "train", config, "--no-track", "--nproc", str(nproc),
            "--output", str(out), f"--set=training.n_iterations={iterations}", *[f"--set={s}" for s in overrides]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{nproc} process(es): train exited {done.returncode}")
    return json.loads((out / "history.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/metaworld_quick.yaml")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--splits", nargs="+", default=["tasks", "contexts"], choices=["tasks", "contexts"],
                        help="training.rank_split values to compare for each process count above 1")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rollout-workers", type=int, default=0, help="suite.num_workers of each process")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    overrides = [f"suite.num_workers={args.rollout_workers}", "training.eval_interval=1000",
                 "training.save_interval=1000", *args.set]
    cfg = load_checked_config(args.config, overrides)
    ensure_base(cfg)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    rows: dict[tuple[int, str], dict[str, float | None]] = {}
    threads = max(1, available_cores() // max(args.nproc))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            for split in (args.splits if n > 1 else args.splits[:1]):
                history, wall = run(args.config, n, args.iterations, [*overrides, f"training.rank_split={split}"],
                                    Path(tmp) / f"n{n}-{split}", threads)
                rows[n, split] = {key: median_of(history, key) for key, _ in FIGURES}
                rows[n, split]["wall"] = wall
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{args.config}: {args.iterations} iterations, contexts_per_iteration {cfg.training.contexts_per_iteration}"
          f", K={cfg.algo.rloo_batch_size}, GA={cfg.algo.gradient_accumulation_steps} per process, "
          f"{args.rollout_workers} rollout worker(s) and {threads} thread(s) per process; {device}; medians over "
          "iterations 2..")
    print(f"  {'processes':>9} {'split':>8} " + " ".join(f"{label:>13}" for _, label in FIGURES) + f" {'wall s':>8}")
    for (n, split), row in rows.items():
        cells = [f"{row[key]:13.3f}" if row[key] is not None else f"{'-':>13}" for key, _ in FIGURES]
        print(f"  {n:>9} {split if n > 1 else '-':>8} " + " ".join(cells) + f" {row['wall']:8.1f}")
    first = rows[args.nproc[0], args.splits[0]]
    for (n, split), row in rows.items():
        if n == args.nproc[0]:
            continue
        rate, base = row["perf/env_steps_per_s"], first["perf/env_steps_per_s"]
        it, it0 = row["perf/iteration_s"], first["perf/iteration_s"]
        update = max(row["perf/update_s"] or 1e-9, 1e-9)
        share = (row["perf/allreduce_s"] or 0.0) / update
        wait = (row["perf/rank_wait_s"] or 0.0) / update
        print(f"  {n} ({split}) vs {args.nproc[0]}: env steps/s x{rate / base:.2f}, iteration time x{it / it0:.2f}; "
              f"rollout max/min {row['perf/rank_rollout_imbalance'] or 1.0:.2f}; of the update: all-reduce "
              f"{100 * share:.1f}%, waiting for the slowest rank {100 * wait:.1f}%")


if __name__ == "__main__":
    run_main(main)
