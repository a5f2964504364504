"""A stand-alone RIPT-style trainer, the kind a team already has: it knows nothing of ript-ablate.

    python train.py --config_path config.yaml --output_dir out [--resume_from out/ckpt_0010.npz]
                    [--metrics_file out/metrics.jsonl]

The task is a contextual bandit that behaves like one step of a manipulation policy: a context x (an initial
state) has a target action a*(x), and an episode succeeds when the sampled action lands within
`task.success_radius` of it in every dimension: a sparse 0/1 reward. The policy's mean is linear in features of
x, fitted first by behaviour cloning on a few noisy demonstrations; its scale head is a per-dimension log scale.
RL then follows RIPT: K rollouts per context, leave-one-out (RLOO) advantages, PPO-clipped steps with an
asymmetric clip (`ppo_clip_range` below, `ppo_clip_high` above), Laplace or Gaussian sampling widened by
`scale_factor`, the scale head fixed or trained at its own `header_lr`.

Metrics go to MLflow the plain way (`mlflow.start_run()`, `mlflow.log_metrics(..., step=)`), or, with
--metrics_file, one JSON line per step. Checkpoints (`ckpt_<iteration>.npz`) make a stopped run resumable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ACTION_DIM = 2


def features(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, x[:, :1] * x[:, 1:], x ** 2, np.ones((len(x), 1))], axis=1)


def target(x: np.ndarray) -> np.ndarray:
    """a*(x): smooth but not linear in the features, so cloning a few demonstrations leaves an error to fix."""
    return np.tanh(np.stack([1.2 * x[:, 0] - 0.7 * x[:, 1] + 0.3 * np.sin(3 * x[:, 1]),
                             0.5 * x[:, 0] + 0.9 * x[:, 1] - 0.4 * np.cos(2 * x[:, 0])], axis=1))


def log_prob(a: np.ndarray, mu: np.ndarray, log_scale: np.ndarray, laplace: bool) -> np.ndarray:
    """Per sample (summed over action dims), and the gradients with respect to mu and log_scale."""
    scale = np.exp(log_scale)
    diff = a - mu
    if laplace:
        lp = -np.abs(diff) / scale - np.log(2 * scale)
        d_mu, d_log = np.sign(diff) / scale, np.abs(diff) / scale - 1.0
    else:
        lp = -0.5 * (diff / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
        d_mu, d_log = diff / scale ** 2, (diff / scale) ** 2 - 1.0
    return lp.sum(axis=-1), d_mu, d_log


class Logger:
    """MLflow the plain way, or JSON lines."""

    def __init__(self, metrics_file: str | None, params: dict):
        self.file = Path(metrics_file) if metrics_file else None
        if self.file is None:
            import mlflow

            self.mlflow = mlflow
            mlflow.start_run()  # MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_ID from the environment, when set
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.file is None:
            self.mlflow.log_metrics(metrics, step=step)
        else:
            with self.file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if self.file is None:
            self.mlflow.end_run()


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--metrics_file", default=None)
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config_path).read_text())
    algo, train, task = cfg["algo"], cfg["training"], cfg["task"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(train["seed"])
    laplace, factor = bool(algo["use_laplace_sampling"]), float(algo["scale_factor"])
    clip_low, clip_high = float(algo["ppo_clip_range"]), float(algo["ppo_clip_high"])
    radius = float(task["success_radius"])

    world = np.random.default_rng(1234)  # the task itself is the same for every seed
    train_x = world.uniform(-1, 1, (int(task["n_train_contexts"]), 2))
    eval_x = world.uniform(-1, 1, (int(task["n_eval_contexts"]), 2))
    rng = np.random.default_rng(seed)
    demo_x = train_x[rng.choice(len(train_x), int(task["demos"]), replace=False)]
    demo_a = target(demo_x) + rng.normal(0, float(task["demo_noise"]), (len(demo_x), ACTION_DIM))
    weights = np.linalg.lstsq(features(demo_x), demo_a, rcond=None)[0]  # behaviour cloning
    residual = demo_a - features(demo_x) @ weights
    log_scale = np.log(np.maximum(np.abs(residual).mean(axis=0), 1e-3))  # the scale head's start
    start = 1
    if args.resume_from:
        ckpt = np.load(args.resume_from)
        weights, log_scale, start = ckpt["weights"], ckpt["log_scale"], int(ckpt["iteration"]) + 1
        print(f"resumed from {args.resume_from} at iteration {start}", flush=True)

    def success(x: np.ndarray, a: np.ndarray) -> np.ndarray:
        return (np.abs(a - target(x)) < radius).all(axis=-1).astype(float)

    def evaluate() -> float:
        return float(success(eval_x, features(eval_x) @ weights).mean())

    logger = Logger(args.metrics_file, flatten(cfg))
    n_iter, k = int(train["n_iterations"]), int(algo["rloo_k"])
    if start == 1:
        logger.log({"eval/success_rate": evaluate()}, 0)
    for it in range(start, n_iter + 1):
        step_rng = np.random.default_rng([seed, it])  # per iteration: a resumed run repeats it exactly
        x = train_x[step_rng.choice(len(train_x), int(train["contexts_per_iteration"]), replace=False)]
        phi = np.repeat(features(x), k, axis=0)
        mu = phi @ weights
        sample_log_scale = log_scale + np.log(factor)
        noise = (step_rng.laplace(0, 1, mu.shape) if laplace else step_rng.normal(0, 1, mu.shape))
        actions = mu + np.exp(sample_log_scale) * noise
        reward = success(np.repeat(x, k, axis=0), actions).reshape(-1, k)
        if algo.get("rloo_over_all_rollouts"):
            others = (reward.sum() - reward) / (reward.size - 1)
        else:
            others = (reward.sum(axis=1, keepdims=True) - reward) / (k - 1)
        advantage = (reward - others).ravel()
        old_lp, _, _ = log_prob(actions, mu, sample_log_scale, laplace)
        kl = clipped = 0.0
        for _ in range(int(algo["ppo_epochs"])):
            new_mu = phi @ weights
            lp, d_mu, d_log = log_prob(actions, new_mu, log_scale + np.log(factor), laplace)
            ratio = np.exp(lp - old_lp)
            active = np.where(advantage >= 0, ratio <= 1 + clip_high, ratio >= 1 - clip_low)
            coef = (advantage * ratio * active)[:, None] / len(advantage)
            weights = weights + float(algo["lr"]) * phi.T @ (coef * d_mu)
            if not algo["fix_scale_head"]:
                log_scale = np.clip(log_scale + float(algo["header_lr"]) * (coef * d_log).sum(axis=0), -6.0, 1.0)
            kl, clipped = float(np.mean(old_lp - lp)), float(1 - active.mean())
        metrics = {"train/success_rate": float(reward.mean()), "ppo/approx_kl": abs(kl), "ppo/clip_fraction": clipped,
                   "scale/log_b_mean": float(log_scale.mean())}
        if it % int(train["eval_interval"]) == 0 or it == n_iter:
            metrics["eval/success_rate"] = evaluate()
        logger.log(metrics, it)
        if it % int(train["save_interval"]) == 0 or it == n_iter:
            np.savez(out / f"ckpt_{it:04d}.npz", weights=weights, log_scale=log_scale, iteration=it)
        if float(train.get("step_delay_s", 0)):
            time.sleep(float(train["step_delay_s"]))  # to watch it, or to stop it mid-run
    final = evaluate()
    logger.close()
    print(f"final eval success {final:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
