"""The RIPT iteration: contexts -> K rollouts -> dynamic sampling -> RLOO -> PPO passes -> eval -> checkpoint.

Evaluation runs before the first update (iteration 0), every `training.eval_interval` iterations and at the end;
checkpoints every `training.save_interval` and at the end, in the layout `algo.lora_adaptor_ckpt` reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ript_ablate import checkpoints
from ript_ablate.config import Config, flatten, to_yaml
from ript_ablate.device import resolve_device
from ript_ablate.errors import CheckpointError
from ript_ablate.evaluation import evaluate
from ript_ablate.policy import ReferencePolicy, inject_lora, merged_state_dict, tokenize
from ript_ablate.progress import console
from ript_ablate.ript.advantages import advantages as rloo_advantages
from ript_ablate.ript.rollouts import collect
from ript_ablate.ript.update import PPOUpdater, build_trajectories
from ript_ablate.sft import get_base, load_base
from ript_ablate.suites import build_suite
from ript_ablate.suites.metaworld_tasks import stream_seed
from ript_ablate.suites.rollouts import RolloutPool
from ript_ablate.tracking import Tracker, git_commit

HISTORY_LOG = "history.jsonl"  # one line per logged iteration, appended as the run goes (read when resuming)


@dataclass
class TrainResult:
    status: str  # finished | diverged
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None
    final_checkpoint: Path | None = None
    run_id: str | None = None


def load_start_policy(cfg: Config, suite, pool: RolloutPool) -> tuple[ReferencePolicy, str, dict]:
    """Base weights (checkpoint_path or the cached BC base), header_checkpoint, LoRA, then lora_adaptor_ckpt."""
    algo = cfg.algo
    if algo.checkpoint_path:
        policy = load_base(algo.checkpoint_path, cfg, suite.obs_dim, suite.action_dim)
        base = algo.checkpoint_path
    else:
        policy, path, _ = get_base(cfg, suite, pool)
        base = str(path)
    if algo.header_checkpoint:
        tensors = checkpoints.load_tensors(algo.header_checkpoint, "header checkpoint")
        checkpoints.load_into(policy, tensors, algo.header_checkpoint, "header checkpoint", strict=False)
    inject_lora(policy, algo.lora_rank, cfg.policy.lora_alpha, algo.lora_dropout, cfg.policy.lora_targets,
                cfg.policy.lora_init)
    meta: dict = {}
    if algo.lora_adaptor_ckpt:
        directory = Path(algo.lora_adaptor_ckpt)
        if not directory.is_dir():
            raise CheckpointError(f"algo.lora_adaptor_ckpt: adapter directory not found: {directory}")
        path = directory / checkpoints.ADAPTER_FILE
        checkpoints.load_into(policy, checkpoints.load_tensors(path, "adapter checkpoint"), path,
                              "adapter checkpoint", strict=False)
        meta = checkpoints.read_meta(directory)
    return policy, base, meta


EvalCallback = Callable[[int, dict[str, float]], None]


class Trainer:
    """One RIPT run. `on_eval(iteration, metrics)` is called after every evaluation (a study's pruner raises
    from it to stop the run); `prior_history` holds the metrics of the iterations before a resume point, so a
    resumed run's history (and MLflow run) is complete; `guard()` is called before every write that matters
    (history line, MLflow batch, checkpoint) and raises to stop a run that must not write any more (a study cell
    whose lease was taken over)."""

    def __init__(self, cfg: Config, tracker: Tracker | None = None, on_eval: EvalCallback | None = None,
                 prior_history: list[dict[str, float]] | None = None, guard: Callable[[], None] | None = None):
        self.cfg = cfg
        self.tracker = tracker or Tracker()
        self.device = resolve_device(cfg.training.device)
        self.on_eval = on_eval
        self.prior_history = prior_history or []
        self.history_file: Path | None = None
        self.guard = guard or (lambda: None)

    def run(self, output_dir: str | Path | None = None) -> TrainResult:
        cfg, algo = self.cfg, self.cfg.algo
        torch.manual_seed(algo.model_seed)
        out = Path(output_dir or Path(cfg.training.output_dir) / time.strftime("run-%Y%m%d-%H%M%S"))
        out.mkdir(parents=True, exist_ok=True)
        self.guard()
        (out / "config.yaml").write_text(to_yaml(cfg))
        self.history_file = out / HISTORY_LOG
        self.history_file.write_text("")
        suite = build_suite(cfg)
        tasks = algo.rollout_training_task_names or suite.tasks
        with RolloutPool(cfg.suite.num_workers, cfg.suite.envs_per_worker, algo.max_episode_length) as pool:
            policy, base, meta = load_start_policy(cfg, suite, pool)
            policy.to(self.device)
            updater = PPOUpdater(policy, algo, self.device, cfg.training.precision)
            start_iteration = int(meta.get("iteration", 0))
            if algo.lora_adaptor_ckpt:
                opt_file = Path(algo.lora_adaptor_ckpt) / checkpoints.OPTIMIZER_FILE
                if opt_file.is_file():
                    checkpoints.load_optimizer_tensors(
                        updater.optimizer, checkpoints.load_tensors(opt_file, "optimizer checkpoint"))
            self.tracker.start(flatten(cfg), {
                "git_commit": git_commit(), "device": str(self.device), "torch_version": torch.__version__,
                "base_checkpoint": base,
            })
            if algo.use_val_init:
                contexts = [s for t in tasks for s in suite.eval_states(t)]
            else:
                demos = suite.demonstrations(pool, cfg.sft.cache_dir)
                contexts = suite.training_contexts(demos, tasks)
            eval_states = {t: suite.eval_states(t) for t in tasks}
            instr_of = {t: torch.tensor(tokenize(suite.instruction(t), cfg.policy.vocab_size,
                                                 cfg.policy.max_instruction_tokens)) for t in suite.tasks}
            result = TrainResult("finished", output_dir=out, run_id=getattr(self.tracker, "run_id", None))
            self._replay_prior(start_iteration, result)
            if not any(h["iteration"] == start_iteration and "eval/success_rate" in h for h in result.history):
                self._evaluate(policy, suite, pool, start_iteration, result)  # one point per iteration, also on resume
            if algo.eval_only:
                self._finish(policy, updater, out, start_iteration, result, base)
                return result
            done = start_iteration
            for iteration in range(start_iteration + 1, cfg.training.n_iterations + 1):
                done = iteration
                t_iter = time.perf_counter()
                pool.set_policy(policy)
                rollouts = collect(pool, contexts, algo, cfg.training.contexts_per_iteration, iteration, eval_states)
                metrics = rollouts.metrics(tasks)
                t_update = time.perf_counter()
                if rollouts.accepted:
                    rewards = np.stack([g.rewards for g in rollouts.accepted])
                    adv = rloo_advantages(rewards, algo.rloo_over_all_rollouts)
                    metrics["rloo/advantage_mean"] = float(adv.mean())
                    metrics["rloo/nonzero_adv_fraction"] = float((np.abs(adv) > 1e-12).mean())
                    metrics["rloo/reward_mean"] = float(rewards.mean())
                    trajectories = build_trajectories(rollouts.accepted, adv, instr_of, algo, self.device)
                    rng = np.random.default_rng(stream_seed(algo.model_seed, "shuffle", iteration))
                    update = updater.update(trajectories, rng, cfg.training.max_nonfinite)
                    metrics.update(update["metrics"])
                    if update["diverged"]:
                        result.status = "diverged"
                metrics["perf/update_s"] = time.perf_counter() - t_update
                metrics["lr/backbone"] = algo.lr
                metrics["lr/header"] = algo.header_lr
                last = iteration == cfg.training.n_iterations or result.status == "diverged"
                if iteration % cfg.training.eval_interval == 0 or last:
                    self._evaluate(policy, suite, pool, iteration, result, metrics)
                metrics["perf/iteration_s"] = time.perf_counter() - t_iter
                self._log(iteration, metrics, result)
                if result.status == "diverged":
                    console.print(f"[red]diverged[/] at iteration {iteration}: more than "
                                  f"{cfg.training.max_nonfinite} non-finite updates in a row")
                    break
                if iteration % cfg.training.save_interval == 0 and not last:
                    self._save(policy, updater, out / "checkpoints" / f"iter_{iteration:04d}", iteration, base)
            self._finish(policy, updater, out, done, result, base)
        return result

    def _replay_prior(self, start_iteration: int, result: TrainResult) -> None:
        """Log the iterations before the resume point again, so the resumed run carries the whole curve."""
        prior = [h for h in self.prior_history if int(h["iteration"]) <= start_iteration]
        for entry in prior:
            step = int(entry["iteration"])
            metrics = {k: v for k, v in entry.items() if k != "iteration"}
            result.history.append({"iteration": step, **metrics})
            self.tracker.record(metrics, step)
            self._append_history(result.history[-1])
        self.tracker.flush()

    def _evaluate(self, policy, suite, pool, iteration: int, result: TrainResult,
                  metrics: dict[str, float] | None = None) -> None:
        t0 = time.perf_counter()
        res = evaluate(policy, suite, pool)
        values = {**res.metrics(), "perf/eval_s": time.perf_counter() - t0}
        if metrics is None:
            self._log(iteration, values, result)
        else:
            metrics.update(values)

    def _append_history(self, entry: dict[str, float]) -> None:
        if self.history_file is not None:
            with self.history_file.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _log(self, iteration: int, metrics: dict[str, float], result: TrainResult) -> None:
        self.guard()
        result.history.append({"iteration": iteration, **metrics})
        self._append_history(result.history[-1])
        self.tracker.record(metrics, iteration)
        self.tracker.flush()
        self._print(iteration, metrics)
        if self.on_eval is not None and "eval/success_rate" in metrics:
            self.on_eval(iteration, metrics)  # after logging, so a pruned run keeps this iteration

    def _print(self, iteration: int, metrics: dict[str, float]) -> None:
        parts = [f"iter {iteration}"]
        for key, label in (("eval/success_rate", "eval"), ("train/success_rate", "train"),
                           ("sampling/contexts_tried", "tried"), ("ppo/clip_fraction", "clip"),
                           ("perf/iteration_s", "s")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3g}")
        console.print(" | ".join(parts))

    def _save(self, policy, updater, directory: Path, iteration: int, base: str) -> Path:
        self.guard()
        meta = {"iteration": iteration, "base_checkpoint": base}
        return checkpoints.save_run_checkpoint(directory, policy, merged_state_dict(policy), updater.optimizer, meta)

    def _finish(self, policy, updater, out: Path, iteration: int, result: TrainResult, base: str) -> None:
        final = self._save(policy, updater, out / "checkpoints" / "final", iteration, base)
        result.final_checkpoint = final
        self.guard()
        (out / "history.json").write_text(json.dumps(result.history, indent=1))
        self.tracker.log_artifact(out / "config.yaml")
        if self.cfg.tracking.log_checkpoint:
            self.tracker.log_artifact(final, "checkpoint")
