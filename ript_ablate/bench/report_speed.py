"""Report generation time on a large synthetic study (100 cells by default) logged to a real MLflow store.

    python -m ript_ablate.bench.report_speed [--seeds 5]

The study: 2 x 2 x 5 configurations x seeds (100 cells with 5 seeds), 15 iterations each, 18 metrics per
iteration, logged to a temporary sqlite store exactly as the study runner logs them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from ript_ablate.bench import run_main
from ript_ablate.report.render import write_report
from ript_ablate.report.synthetic import log_synthetic_study
from ript_ablate.study.spec import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="report-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    (tmp / "base.yaml").write_text(yaml.safe_dump({"suite": {"tasks": ["reach-v3", "push-v3"]}}))
    spec_path = tmp / "big.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "big", "config": "base.yaml", "mode": "grid", "seeds": list(range(args.seeds)),
        "factors": {"algo.use_laplace_sampling": [False, True], "algo.fix_scale_head": [True, False],
                    "algo.ppo_clip_high": [0.1, 0.2, 0.28, 0.35, 0.4]}}, sort_keys=False))
    spec = load_study(spec_path)
    n = len(spec.grid_configs()) * args.seeds
    t0 = time.perf_counter()
    log_synthetic_study(spec, lambda v: 0.2 * v["algo.use_laplace_sampling"] - 0.3 * (v["algo.ppo_clip_high"] - 0.1))
    print(f"logged {n} synthetic cells in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    report = write_report(spec, tmp / "reports")
    print(f"report on {n} cells: {time.perf_counter() - t0:.1f}s ({report})")


if __name__ == "__main__":
    run_main(main)
