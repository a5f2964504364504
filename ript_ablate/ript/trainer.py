"""The RIPT iteration: contexts -> K rollouts -> dynamic sampling -> RLOO -> PPO passes -> eval -> checkpoint.

`Trainer.set_up` builds a run (world, engine, start policy, optimizer, tracking) and `Trainer.iteration` runs one
iteration on it; `Trainer.run` is the loop. The behaviour-cloning base is built beforehand (`bc.ensure_base`).

Evaluation runs before the first update (iteration 0), every `training.eval_interval` iterations and at the end;
checkpoints every `training.save_interval` and at the end, in the layout `algo.lora_adaptor_ckpt` reads.

Under torchrun the same loop runs on every rank (`ript_ablate.distributed`): each rank rolls out its tasks' contexts
(its share of the quota), the update sums gradients over the ranks, evaluation is split and gathered, and rank 0
alone writes (history, MLflow, checkpoints) and decides a stop (pruning, a lost lease), which every rank follows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ript_ablate import checkpoints, eval_cache
from ript_ablate.bc import cached_base, load_base
from ript_ablate.config import Config, flatten, to_yaml
from ript_ablate.device import resolve_device
from ript_ablate.distributed import RankFailure, Ranks, maybe_exit_for_test, rank_device
from ript_ablate.engine import RolloutEngine, resolve_inference
from ript_ablate.episodes import InitialState
from ript_ablate.errors import CheckpointError, ConfigError
from ript_ablate.evaluation import evaluate
from ript_ablate.families import ChunkFamily, build_family
from ript_ablate.interfaces.policy import Policy
from ript_ablate.plugins import build_world
from ript_ablate.progress import console
from ript_ablate.ript.advantages import advantages as rloo_advantages
from ript_ablate.ript.health import health_line
from ript_ablate.ript.rollouts import collect, rollout_metrics
from ript_ablate.ript.update import PPOUpdater, build_trajectories
from ript_ablate.seeding import stream_seed
from ript_ablate.switch_table import inert_switches
from ript_ablate.tracking import Tracker, git_commit
from ript_ablate.tracking import tags as tag

HISTORY_LOG = "history.jsonl"  # one line per logged iteration, appended as the run goes (read when resuming)


@dataclass
class TrainResult:
    status: str  # finished | diverged
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None
    final_checkpoint: Path | None = None
    run_id: str | None = None


def load_start_policy(cfg: Config, world: Any) -> tuple[Policy, str, dict]:
    """Base weights (checkpoint_path, or this config's cached behaviour-cloning base: built beforehand by
    `ensure_base`, never here), header_checkpoint, the policy's RL preparation (LoRA), then lora_adaptor_ckpt."""
    algo = cfg.algo
    path = algo.checkpoint_path or str(cached_base(cfg, world))
    policy = load_base(path, cfg, world)
    if algo.header_checkpoint:
        tensors = checkpoints.load_tensors(algo.header_checkpoint, "header checkpoint")
        checkpoints.load_into(policy, tensors, algo.header_checkpoint, "header checkpoint", strict=False)
    policy.prepare_for_rl(cfg)
    meta: dict = {}
    if algo.lora_adaptor_ckpt:
        directory = Path(algo.lora_adaptor_ckpt)
        if not directory.is_dir():
            raise CheckpointError(f"algo.lora_adaptor_ckpt: adapter directory not found: {directory}")
        adapter = directory / checkpoints.ADAPTER_FILE
        checkpoints.load_into(policy, checkpoints.load_tensors(adapter, "adapter checkpoint"), adapter,
                              "adapter checkpoint", strict=False)
        meta = checkpoints.read_meta(directory)
    return policy, path, meta


@dataclass
class RunState:
    """Everything one run holds between iterations (built by `Trainer.set_up`)."""

    out: Path
    world: Any
    engine: RolloutEngine
    policy: Policy
    updater: PPOUpdater
    base: str
    tasks: list[str]
    contexts: list[InitialState]
    eval_states: dict[str, list[InitialState]]
    instructions: dict[str, torch.Tensor]
    distribution: ChunkFamily  # the policy's family with the run's switches: rollouts sample it, the update scores it
    inference: str
    start_iteration: int
    result: TrainResult
    done: int = 0  # the last iteration run (the start iteration before any)
    all_tasks: list[str] = field(default_factory=list)  # the training tasks of every rank (metrics name them all)


EvalCallback = Callable[[int, dict[str, float]], None]


class Trainer:
    """One RIPT run. `on_eval(iteration, metrics)` is called after every evaluation (a study's pruner raises
    from it to stop the run); `prior_history` holds the metrics of the iterations before a resume point, so a
    resumed run's history (and MLflow run) is complete; `guard()` is called before every write that matters
    (history line, MLflow batch, checkpoint) and raises to stop a run that must not write any more (a study cell
    whose lease was taken over). In a multi-process trial (`ranks`) only rank 0's tracker, callbacks and guard
    act; give the other ranks an untracked `Tracker()`."""

    def __init__(self, cfg: Config, tracker: Tracker | None = None, on_eval: EvalCallback | None = None,
                 prior_history: list[dict[str, float]] | None = None, guard: Callable[[], None] | None = None,
                 ranks: Ranks | None = None):
        self.cfg = cfg
        self.tracker = tracker or Tracker()
        self.ranks = ranks or Ranks()
        self.device = rank_device(resolve_device(cfg.training.device), self.ranks)
        self.last_checkpoint: Path | None = None
        self.on_eval = on_eval
        self.prior_history = prior_history or []
        self.history_file: Path | None = None
        self.guard = guard or (lambda: None)

    def run(self, output_dir: str | Path | None = None) -> TrainResult:
        """Set up, evaluate the start, then one `iteration` at a time until `n_iterations` or divergence."""
        try:
            with self.set_up(output_dir) as run:
                if not self.cfg.algo.eval_only:
                    for iteration in range(run.start_iteration + 1, self.cfg.training.n_iterations + 1):
                        if not self.iteration(run, iteration):
                            break
                self._finish(run)
                return run.result
        except RankFailure as exc:
            where = (f"the last checkpoint is {self.last_checkpoint}: resume with --set "
                     f"algo.lora_adaptor_ckpt={self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet (training.save_interval): start again")
            raise RankFailure(f"{exc}; {where}") from exc

    @contextmanager
    def set_up(self, output_dir: str | Path | None = None) -> Iterator[RunState]:
        """Output directory, world, rollout engine, start policy, optimizer, tracking, contexts; logs the
        evaluation of the starting point. The engine's worker processes live as long as the context."""
        cfg, algo, ranks = self.cfg, self.cfg.algo, self.ranks
        torch.manual_seed(algo.model_seed)
        out = Path(ranks.broadcast(str(output_dir or Path(cfg.training.output_dir)
                                       / time.strftime("run-%Y%m%d-%H%M%S"))))
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self.guard()
            (out / "config.yaml").write_text(to_yaml(cfg))
            self.history_file = out / HISTORY_LOG
            self.history_file.write_text("")
        world = build_world(cfg)
        all_tasks = algo.rollout_training_task_names or world.tasks
        unknown = [t for t in all_tasks if t not in world.tasks]
        if unknown:
            raise ConfigError([f"algo.rollout_training_task_names: {unknown} are not tasks of the world "
                               f"({world.tasks})"])
        if cfg.training.contexts_per_iteration < ranks.size:
            raise ConfigError([(f"training.contexts_per_iteration: {cfg.training.contexts_per_iteration} groups "
                                f"cannot be shared by {ranks.size} processes: give at least one per process")])
        # the original deals tasks round-robin over the ranks; `rank_split: contexts` (or fewer tasks than ranks)
        # deals each task's contexts instead, so every rank carries a similar share of every task
        by_context = cfg.training.rank_split == "contexts" or len(all_tasks) < ranks.size
        tasks = list(all_tasks) if by_context else ranks.split(all_tasks)
        policy, base, meta = load_start_policy(cfg, world)
        policy.to(self.device)
        ranks.broadcast_parameters(policy)  # one start on every rank, whatever its random LoRA initialisation
        if ranks.size > 1:
            torch.manual_seed(algo.model_seed + ranks.rank)  # model_seed + rank seeds each rank, as the original does
        inference = resolve_inference(cfg.suite.inference, policy, self.device)
        family = build_family(algo, policy)
        if ranks.is_main:  # switches the config carries (not set explicitly) that mean nothing here: a note
            for key, value, why in inert_switches(cfg, family.variant):
                console.print(f"note: {key} = {value!r} has no effect on a {family.variant} policy ({why})")
        with RolloutEngine(cfg, world) as engine:
            updater = PPOUpdater(policy, algo, self.device, cfg.training.precision, ranks, family)
            start_iteration = int(meta.get("iteration", 0))
            if algo.lora_adaptor_ckpt:
                opt_file = Path(algo.lora_adaptor_ckpt) / checkpoints.OPTIMIZER_FILE
                if opt_file.is_file():
                    checkpoints.load_optimizer_tensors(
                        updater.optimizer, checkpoints.load_tensors(opt_file, "optimizer checkpoint"))
            self.tracker.start(flatten(cfg), {
                "git_commit": git_commit(), "device": str(self.device), "torch_version": torch.__version__,
                "base_checkpoint": base, "rollout_inference": inference, "processes": str(ranks.size),
            })
            demos = None if algo.use_val_init else world.demonstrations(engine, cfg.sft.cache_dir)
            per_task = [world.eval_states(t) if algo.use_val_init else world.training_contexts(t, demos)
                        for t in tasks]
            contexts = [s for states in per_task for s in (ranks.split(states) if by_context else states)]
            run = RunState(
                out=out, world=world, engine=engine, policy=policy, updater=updater, base=base, tasks=tasks,
                contexts=contexts, eval_states={t: world.eval_states(t) for t in tasks},
                instructions={t: policy.encode_instruction(world.instruction(t)) for t in world.tasks},
                distribution=family, inference=inference, start_iteration=start_iteration,
                result=TrainResult("finished", output_dir=out, run_id=getattr(self.tracker, "run_id", None)),
                all_tasks=list(all_tasks),
            )
            run.done = start_iteration
            self._replay_prior(start_iteration, run.result)
            evaluated = any(h["iteration"] == start_iteration and "eval/success_rate" in h for h in run.result.history)
            if not ranks.broadcast(evaluated):  # one point per iteration, also on resume
                probe = (eval_cache.probe_digest(policy, world, demos, self.device, cfg.training.precision)
                         if start_iteration == 0 and ranks.size == 1 else None)
                self._evaluate(run, start_iteration, cache_key=probe and eval_cache.eval_key(
                    cfg, world, probe, inference, self.device))
            yield run

    def warm_start(self) -> None:
        """Set up (building nothing that is cached) and tear down again: the start policy's evaluation lands in
        the cache, so that every run that starts from it skips it. Untracked; writes into a temporary folder."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, self.set_up(Path(tmp) / "warm"):
            pass

    def _act(self, run: RunState) -> None:
        """Point the engine at the current weights (replica: sent to the workers; central: used in place)."""
        run.engine.set_policy(run.policy, run.inference, self.device, self.cfg.training.precision, run.distribution)

    def iteration(self, run: RunState, iteration: int) -> bool:
        """One RIPT iteration: rollouts, RLOO, PPO passes, evaluation when due, log, checkpoint when due.
        Returns False when the run must stop (diverged)."""
        cfg, algo, ranks = self.cfg, self.cfg.algo, self.ranks
        run.done = iteration
        maybe_exit_for_test(ranks, iteration)
        t_iter = time.perf_counter()
        self._act(run)
        rollouts = collect(run.engine, run.contexts, algo, cfg.training.contexts_per_iteration, iteration,
                           run.eval_states, run.distribution, ranks)
        tallies = ranks.gather(rollouts.tally())
        metrics = rollout_metrics(tallies, run.all_tasks)
        t_update = time.perf_counter()
        if any(t["accepted"] for t in tallies):  # every rank steps together, those with no group too
            rewards = np.stack([g.rewards for g in rollouts.accepted]) if rollouts.accepted else np.zeros((0, 1))
            adv = rloo_advantages(rewards, algo.rloo_over_all_rollouts) if rollouts.accepted else rewards
            pooled = [np.concatenate(part) for part in zip(*ranks.gather((rewards.ravel(), adv.ravel())))]
            metrics["rloo/advantage_mean"] = float(pooled[1].mean())
            metrics["rloo/nonzero_adv_fraction"] = float((np.abs(pooled[1]) > 1e-12).mean())
            metrics["rloo/reward_mean"] = float(pooled[0].mean())
            trajectories = build_trajectories(rollouts.accepted, adv, run.instructions, algo, self.device,
                                              run.distribution, run.policy, cfg.training.precision)
            rank_part = ("rank", ranks.rank) if ranks.size > 1 else ()
            rng = np.random.default_rng(stream_seed(algo.model_seed, "shuffle", iteration, *rank_part))
            comm_before, wait_before = ranks.comm_seconds, ranks.wait_seconds
            update = run.updater.update(trajectories, rng, cfg.training.max_nonfinite)
            metrics.update(update["metrics"])
            if ranks.size > 1:
                metrics["perf/allreduce_s"] = ranks.comm_seconds - comm_before
                metrics["perf/rank_wait_s"] = ranks.wait_seconds - wait_before
            if update["diverged"]:
                run.result.status = "diverged"
        metrics["perf/update_s"] = time.perf_counter() - t_update
        if self.device.type == "cuda":
            metrics["perf/gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics["lr/backbone"] = algo.lr
        metrics["lr/header"] = algo.header_lr
        last = iteration == cfg.training.n_iterations or run.result.status == "diverged"
        if iteration % cfg.training.eval_interval == 0 or last:
            self._evaluate(run, iteration, metrics, subset=0 if last else cfg.training.eval_subset_per_task)
        metrics["perf/iteration_s"] = time.perf_counter() - t_iter
        self._log(iteration, metrics, run.result)
        if run.result.status == "diverged":
            console.print(f"[red]diverged[/] at iteration {iteration}: more than "
                          f"{cfg.training.max_nonfinite} non-finite updates in a row")
            return False
        if iteration % cfg.training.save_interval == 0 and not last:
            self._save(run, run.out / "checkpoints" / f"iter_{iteration:04d}", iteration)
        return True

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

    def _evaluate(self, run: RunState, iteration: int, metrics: dict[str, float] | None = None,
                  cache_key: str | None = None, subset: int = 0) -> None:
        """Evaluate (on the first `subset` states of each task; 0: all) and log (into `metrics` when given). With
        `cache_key` (the start policy's evaluation, see `ript_ablate.eval_cache`), a cached result is used, and a
        computed one cached."""
        t0 = time.perf_counter()
        res = eval_cache.load(self.cfg, cache_key) if cache_key else None
        cached = res is not None
        if res is None:
            self._act(run)
            res = evaluate(run.world, run.engine, ranks=self.ranks, states_per_task=subset,
                           mode=self.cfg.training.eval_mode)
            if cache_key:
                eval_cache.save(self.cfg, cache_key, res)
        values = {**res.metrics(), "perf/eval_s": time.perf_counter() - t0}
        if cache_key:
            values["perf/eval_cached"] = float(cached)
        if not subset and res.outcomes:
            self._on_main(lambda: self.tracker.set_tags(tag.outcome_state_tags(iteration, res.outcomes)))
        if metrics is None:
            self._log(iteration, values, run.result)
        else:
            metrics.update(values)

    def _append_history(self, entry: dict[str, float]) -> None:
        if self.history_file is not None:
            with self.history_file.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _log(self, iteration: int, metrics: dict[str, float], result: TrainResult) -> None:
        result.history.append({"iteration": iteration, **metrics})
        self._on_main(lambda: self._log_main(iteration, metrics, result))

    def _log_main(self, iteration: int, metrics: dict[str, float], result: TrainResult) -> None:
        self.guard()
        self._append_history(result.history[-1])
        self.tracker.record(metrics, iteration)
        self.tracker.flush()
        self._print(iteration, metrics)
        if self.on_eval is not None and "eval/success_rate" in metrics:
            self.on_eval(iteration, metrics)  # after logging, so a pruned run keeps this iteration

    def _on_main(self, action: Callable[[], Any]) -> Any:
        """Run `action` on rank 0; when it raises (a pruner, a lost lease, a full disk), every rank stops with it:
        rank 0 re-raises its own exception, the others a `RankFailure` that names it."""
        if self.ranks.size == 1:
            return action()
        error: BaseException | None = None
        value = None
        if self.ranks.is_main:
            try:
                value = action()
            except BaseException as exc:  # noqa: BLE001 - passed on to every rank, then re-raised
                error = exc
        reason = self.ranks.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if reason is not None:
            raise RankFailure(f"rank {self.ranks.rank}: stopped because rank 0 stopped ({reason})")
        return value

    def _print(self, iteration: int, metrics: dict[str, float]) -> None:
        parts = [f"iter {iteration}"]
        for key, label in (("eval/success_rate", "eval"), ("train/success_rate", "train"),
                           ("sampling/contexts_tried", "tried"), ("ppo/clip_fraction", "clip"),
                           ("perf/iteration_s", "s")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3g}")
        console.print(" | ".join(parts))
        line = health_line(metrics) if "eval/success_rate" in metrics else None
        if line:
            console.print(line)

    def _save(self, run: RunState, directory: Path, iteration: int) -> Path:
        def save() -> Path:
            self.guard()
            meta = {"iteration": iteration, "base_checkpoint": run.base, "processes": self.ranks.size}
            return checkpoints.save_run_checkpoint(directory, run.policy, run.updater.optimizer, meta)

        self._on_main(save)
        self.last_checkpoint = directory
        return directory

    def _finish(self, run: RunState) -> None:
        final = self._save(run, run.out / "checkpoints" / "final", run.done)
        run.result.final_checkpoint = final

        def write() -> None:
            self.guard()
            (run.out / "history.json").write_text(json.dumps(run.result.history, indent=1))
            (run.out / "result.json").write_text(json.dumps({"status": run.result.status,
                                                              "processes": self.ranks.size}))
            self.tracker.log_artifact(run.out / "config.yaml")
            if self.cfg.tracking.log_checkpoint:
                self.tracker.log_artifact(final, "checkpoint")

        self._on_main(write)
