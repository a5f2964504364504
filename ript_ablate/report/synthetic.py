"""Synthetic studies with planted effects, logged to a real MLflow store exactly as the study runner logs them:
for testing that the report finds what is there (and nothing else), and for timing it on large studies."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ript_ablate.study.spec import StudySpec, cell_id_for, config_id_for
from ript_ablate.tracking import tags as tag
from ript_ablate.tracking.runs import client, create_run, ensure_parent_run, experiment_id, log_metrics, mark_run

# final success of a cell = base + sum of planted effects(values) + seed noise; curves rise towards it
EffectFn = Callable[[dict], float]


def log_synthetic_study(spec: StudySpec, effect: EffectFn, tracking_uri: str | None = None, base: float = 0.4,
                        noise: float = 0.05, n_iterations: int = 15, eval_interval: int = 5,
                        collapse: set[str] | None = None, skip: set[str] | None = None, seed: int = 0,
                        kl_spikes: dict[str, list[int]] | None = None, pruned: set[str] | None = None,
                        eval_states: int | None = None) -> str:
    """Log one FINISHED child run per grid cell (except `skip`); cells in `collapse` rise then fall to 0.05; cells
    in `kl_spikes` get an approx-KL of 0.5 at the listed iterations; cells in `pruned` end KILLED as pruned. With
    `eval_states`, each evaluation also logs its states per task (`eval/states/<task>`), as the trainer does."""
    rng = np.random.default_rng(seed)
    mlflow = client(tracking_uri)
    parent = ensure_parent_run(tracking_uri, spec.experiment_name, spec.name, None, {"study.name": spec.name})
    exp = experiment_id(mlflow, spec.experiment_name)
    for values in spec.grid_configs():
        config_id = config_id_for(values)
        for s in spec.seeds:
            cell = cell_id_for(config_id, s)
            if skip and cell in skip:
                continue
            final = float(np.clip(base + effect(values) + rng.normal(0, noise), 0, 1))
            tags = {tag.PARENT_RUN: parent, tag.STUDY: spec.name, tag.CELL_ID: cell, tag.CONFIG_ID: config_id,
                    tag.SEED: str(s), **tag.outcome_tags("finished"), **tag.factor_tags(values)}
            run_id = create_run(mlflow, exp, cell, tags, {})
            metrics = []
            start = max(0.0, base - 0.1)
            for it in range(n_iterations + 1):
                frac = it / n_iterations
                if collapse and cell in collapse:
                    value = final * min(1.0, 2 * frac) if frac <= 0.6 else 0.05
                else:
                    value = start + (final - start) * frac
                if it % eval_interval == 0 or it == n_iterations:
                    metrics.append(("eval/success_rate", value, it))
                    for task, offset in (("reach-v3", -0.05), ("push-v3", 0.05)):
                        metrics.append((f"eval/success_rate/{task}", float(np.clip(value + offset, 0, 1)), it))
                        if eval_states:
                            metrics.append((f"eval/states/{task}", float(eval_states), it))
                if it > 0:
                    kl = 0.5 if kl_spikes and it in kl_spikes.get(cell, []) else float(abs(rng.normal(0.01, 0.002)))
                    metrics += [("ppo/approx_kl", kl, it),
                                ("ppo/clip_fraction", float(abs(rng.normal(0.2, 0.02))), it),
                                ("grad_norm/backbone", float(abs(rng.normal(1.0, 0.1))), it),
                                ("health/nonfinite_events", 0.0, it),
                                ("scale/log_b_mean", -3.0 + 0.01 * it, it),
                                ("sampling/contexts_tried", 12.0, it),
                                ("sampling/accepted_groups", 8.0, it)]
            log_metrics(mlflow, run_id, metrics)
            if pruned and cell in pruned:
                mark_run(tracking_uri, run_id, "KILLED", tag.outcome_tags("pruned"))
            else:
                mlflow.set_terminated(run_id, "FINISHED")
    return parent
