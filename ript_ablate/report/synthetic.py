"""Synthetic studies with planted effects, logged to a real MLflow store exactly as the study runner logs them:
for testing that the report finds what is there (and nothing else), and for timing it on large studies."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ript_ablate.study.runs import client, ensure_parent_run
from ript_ablate.study.spec import StudySpec, cell_id_for, config_id_for

# final success of a cell = base + sum of planted effects(values) + seed noise; curves rise towards it
EffectFn = Callable[[dict], float]


def log_synthetic_study(spec: StudySpec, effect: EffectFn, tracking_uri: str | None = None, base: float = 0.4,
                        noise: float = 0.05, n_iterations: int = 15, eval_interval: int = 5,
                        collapse: set[str] | None = None, skip: set[str] | None = None, seed: int = 0,
                        kl_spikes: dict[str, list[int]] | None = None, pruned: set[str] | None = None) -> str:
    """Log one FINISHED child run per grid cell (except `skip`); cells in `collapse` rise then fall to 0.05; cells
    in `kl_spikes` get an approx-KL of 0.5 at the listed iterations; cells in `pruned` end KILLED as pruned."""
    rng = np.random.default_rng(seed)
    from mlflow.entities import Metric

    mlflow = client(tracking_uri)
    parent = ensure_parent_run(tracking_uri, spec.experiment_name, spec.name, None, {"study.name": spec.name})
    mlflow.set_tag(parent, "ript.role", "study")
    exp = mlflow.get_experiment_by_name(spec.experiment_name).experiment_id
    now = int(time.time() * 1000)
    for values in spec.grid_configs():
        config_id = config_id_for(values)
        for s in spec.seeds:
            cell = cell_id_for(config_id, s)
            if skip and cell in skip:
                continue
            final = float(np.clip(base + effect(values) + rng.normal(0, noise), 0, 1))
            tags = {"mlflow.parentRunId": parent, "ript.study": spec.name, "ript.cell_id": cell,
                    "ript.config_id": config_id, "ript.seed": str(s), "ript.status": "finished",
                    **{f"factor.{k}": str(v) for k, v in values.items()}}
            run = mlflow.create_run(exp, run_name=cell, tags=tags)
            metrics = []
            start = max(0.0, base - 0.1)
            for it in range(n_iterations + 1):
                frac = it / n_iterations
                if collapse and cell in collapse:
                    value = final * min(1.0, 2 * frac) if frac <= 0.6 else 0.05
                else:
                    value = start + (final - start) * frac
                if it % eval_interval == 0 or it == n_iterations:
                    metrics.append(Metric("eval/success_rate", value, now, it))
                    for task, offset in (("reach-v3", -0.05), ("push-v3", 0.05)):
                        metrics.append(Metric(f"eval/success_rate/{task}", float(np.clip(value + offset, 0, 1)),
                                              now, it))
                if it > 0:
                    kl = 0.5 if kl_spikes and it in kl_spikes.get(cell, []) else float(abs(rng.normal(0.01, 0.002)))
                    metrics += [Metric("ppo/approx_kl", kl, now, it),
                                Metric("ppo/clip_fraction", float(abs(rng.normal(0.2, 0.02))), now, it),
                                Metric("grad_norm/backbone", float(abs(rng.normal(1.0, 0.1))), now, it),
                                Metric("health/nonfinite_events", 0.0, now, it),
                                Metric("scale/log_b_mean", -3.0 + 0.01 * it, now, it),
                                Metric("sampling/contexts_tried", 12.0, now, it),
                                Metric("sampling/accepted_groups", 8.0, now, it)]
            for i in range(0, len(metrics), 1000):
                mlflow.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
            if pruned and cell in pruned:
                mlflow.set_tag(run.info.run_id, "ript.status", "pruned")
                mlflow.set_terminated(run.info.run_id, "KILLED")
            else:
                mlflow.set_terminated(run.info.run_id, "FINISHED")
    return parent
