"""RIPT post-training gain on a config over seeds, with the time split, rollout efficiency and tracking overhead.

    python -m ript_ablate.bench.ript_gain CONFIG --seeds 0 1 2 [--set key=value ...] [--overhead [N]]
        [--variant NAME key=value ...] [--results FILE.jsonl]

With one or more --variant, each variant (the config with its own overrides on top of --set) runs over the same
seeds in this one invocation, and the gains are printed side by side, e.g. the defaults against the behaviour of an
earlier release:  --variant now  --variant before policy.lora_init=kaiming_uniform algo.loss_on_executed_steps_only=true

Prints, per seed: evaluation success before and after (overall and per task), mean seconds per iteration split
into rollout, update and evaluation, and rollout env steps/s as a fraction of raw env stepping measured in this
same invocation: random-action stepping of each task on a rollout pool of the same shape (workers x envs per
worker), weighted by the steps the run spent on each task. It is given twice: against pure stepping (resets only
at the env's own limit) and against stepping that resets onto a new variation at the run's mean episode length
per task (so the resets a rollout cannot avoid are in the ceiling too). The seeds' mean gain comes with the report's two intervals: a t over seeds with the evaluation states' least noise
added, and the gain paired per evaluation state (docs/reports.md). With --overhead N, runs seed 0 for N
iterations tracked in MLflow (a temporary sqlite store) and untracked, side by side, and prints the ratio of wall times.

With --results FILE.jsonl each measured seed is kept in FILE (bench/gain_results.py) and the seeds already there,
measured with the same configuration, are read instead of run: a benchmark of hours (LIBERO on a CPU) is continued
later with the same command plus more seeds, and summarised over all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from ript_ablate.bc import ensure_base
from ript_ablate.bench import gain_results, run_main
from ript_ablate.config import Config
from ript_ablate.engine import RolloutEngine
from ript_ablate.plugins import build_world
from ript_ablate.plugins import load_checked_config as load_config
from ript_ablate.ript.trainer import Trainer
from ript_ablate.tracking import MlflowTracker, Tracker


def run(cfg: Config, tracker: Tracker, out: str) -> tuple[list[dict], float, str]:
    """The run's history, its wall seconds and its base (the behaviour-cloning cache entry it started from)."""
    start = time.perf_counter()
    weights = ensure_base(cfg)
    result = Trainer(cfg, tracker).run(out)
    tracker.end("FINISHED")
    return result.history, time.perf_counter() - start, str(weights) if cfg.algo.checkpoint_path else weights.parent.name


class OutcomeTracker(Tracker):
    """Untracked, but keeps the per-state outcomes the trainer tags at its full evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, str] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def gain_intervals(gains: list[float], per_task: list[dict[str, float]], histories: list[list[dict]],
                   outcomes: list[dict[str, str]]) -> str:
    """The seeds' mean gain with the report's two intervals: a t over seeds with the evaluation states' least
    noise added (report/analysis.py), and the one paired per evaluation state (states resampled within tasks)."""
    import numpy as np

    from ript_ablate.report import stats
    from ript_ablate.report.analysis import gain_state_variance, outcome_matrices
    from ript_ablate.report.collect import state_outcomes

    tasks = list(per_task[0])
    counts = [next((h[f"eval/states/{t}"] for h in reversed(histories[0]) if f"eval/states/{t}" in h), 0.0)
              for t in tasks]
    state_var = gain_state_variance(np.array([statistics.fmean(p[t] for p in per_task) for t in tasks]),
                                    np.asarray(counts))
    if len(gains) > 1:
        seeds = stats.paired_effect("gain", np.asarray(gains), state_var=state_var)
        text = f"interval over seeds (+ evaluation states) [{100 * seeds.low:+.1f}, {100 * seeds.high:+.1f}]"
    else:
        text = "interval over seeds: needs 2 seeds or more"
    matrices = outcome_matrices([state_outcomes(tags) for tags in outcomes])
    if matrices is not None:
        gain, lo, hi = stats.state_paired_gain(*matrices)
        states = sum(m.shape[1] for m in matrices[0].values())
        text += f"; paired per evaluation state ({states} states) {100 * gain:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return text


def describe_bases(results: list[dict]) -> str | None:
    """When pooled seeds started from different bases (measured at commits whose base code differs, or on another
    machine kind), whether those bases evaluate alike: the question a reader of the pooled gain has. Compares the
    first evaluation's per-state outcomes (the base's) of one seed of each base."""
    from ript_ablate.report.collect import state_outcomes

    first: dict[str, dict[str, str]] = {}
    for result in results:
        if result.get("base"):
            evaluations = state_outcomes(result.get("outcomes", {}))
            first.setdefault(result["base"], evaluations[min(evaluations)] if evaluations else {})
    if len(first) < 2:
        return None
    text = f"note: these seeds started from {len(first)} different bases ({', '.join(sorted(first))})"
    outcomes = list(first.values())
    if not all(outcomes) or any(set(o) != set(outcomes[0]) for o in outcomes):
        return text + "; their base evaluations were not kept on the same states, so they cannot be compared"
    reference = outcomes[0]
    states = sum(len(v) for v in reference.values())
    differing = max(sum(a != b for task in reference for a, b in zip(reference[task], o[task])) for o in outcomes[1:])
    if differing == 0:
        return text + f"; they evaluate alike on every one of the {states} evaluation states"
    rates = ", ".join(f"{100 * sum(v.count('1') for v in o.values()) / states:.1f}%" for o in outcomes)
    return text + (f"; their base evaluations differ on up to {differing} of {states} evaluation states "
                   f"(base success {rates}): the pooled gain mixes bases")


class TimedTracker(MlflowTracker):
    """An MLflow tracker that also adds up the seconds spent in its own calls (the direct cost of tracking)."""

    seconds = 0.0

    def __init__(self, *args, **kwargs):
        start = time.perf_counter()
        super().__init__(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def _timed(name):  # noqa: N805 - a decorator factory used in the class body
        def method(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return getattr(MlflowTracker, name)(self, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return method

    start = _timed("start")
    record = _timed("record")
    flush = _timed("flush")
    log_artifact = _timed("log_artifact")
    end = _timed("end")


def raw_rates(cfg: Config, seconds: float, episode_lengths: dict[str, int] | None = None) -> dict[str, float]:
    """Random-action env steps/s per task on a pool shaped like the trainer's (the ceiling for rollouts), with
    resets every `episode_lengths[task]` steps when given."""
    tasks = list(episode_lengths) if episode_lengths else build_world(cfg).tasks
    with RolloutEngine(cfg) as engine:
        return {task: engine.raw_steps_per_second(task, seconds, (episode_lengths or {}).get(task)) for task in tasks}


def mean_episode_lengths(history: list[dict]) -> dict[str, int]:
    """Per task, the run's rollout env steps / rollout episodes."""
    steps: dict[str, float] = {}
    episodes: dict[str, float] = {}
    for h in history:
        for key, value in h.items():
            if key.startswith("perf/episodes/"):
                task = key.removeprefix("perf/episodes/")
                episodes[task] = episodes.get(task, 0.0) + value
                steps[task] = steps.get(task, 0.0) + h[f"perf/env_steps/{task}"]
    return {task: max(1, round(steps[task] / episodes[task])) for task in episodes}


def rollout_efficiency(history: list[dict], raw: dict[str, float]) -> float:
    """Seconds raw stepping would need for the run's per-task env steps / seconds the rollouts took."""
    iters = [h for h in history if h["iteration"] > 0 and "perf/rollout_s" in h]
    ideal = sum(h.get(f"perf/env_steps/{task}", 0.0) / rate for h in iters for task, rate in raw.items())
    return ideal / sum(h["perf/rollout_s"] for h in iters)


def describe(seed: int, history: list[dict], wall: float, raw: dict[str, float],
             raw_with_resets: dict[str, float], lengths: dict[str, int]) -> tuple[float, dict, str]:
    """The seed's gain, its gain per task and the lines that describe it (success, time split, efficiency)."""
    evals = [h for h in history if "eval/success_rate" in h]
    first, last = evals[0], evals[-1]
    gain = last["eval/success_rate"] - first["eval/success_rate"]
    iters = [h for h in history if h["iteration"] > 0]
    mean = lambda key: statistics.fmean(h.get(key, 0.0) for h in iters)  # noqa: E731
    eval_iters = [h["perf/eval_s"] for h in iters if "perf/eval_s" in h]
    curve = " ".join(f"{h['iteration']}:{100 * h['eval/success_rate']:.0f}" for h in evals)
    tasks = sorted(k.removeprefix("eval/success_rate/") for k in first if k.startswith("eval/success_rate/"))
    per_task = " ".join(f"{t} {100 * first[f'eval/success_rate/{t}']:.0f}->{100 * last[f'eval/success_rate/{t}']:.0f}"
                        for t in tasks)
    lines = [
        (f"seed {seed}: eval {100 * first['eval/success_rate']:.1f}% -> {100 * last['eval/success_rate']:.1f}% "
         f"({100 * gain:+.1f}); {per_task}; curve {curve}"),
        (f"   wall {wall:.0f}s; per iteration {mean('perf/iteration_s'):.1f}s = rollout {mean('perf/rollout_s'):.1f}s "
         f"+ update {mean('perf/update_s'):.2f}s + eval {mean('perf/eval_s'):.1f}s amortised "
         f"({statistics.fmean(eval_iters) if eval_iters else 0.0:.1f}s on evaluation iterations); "
         f"contexts tried/iteration {mean('sampling/contexts_tried'):.1f}"),
        f"   rollouts {mean('perf/env_steps_per_s'):,.0f} env steps/s = {rollout_efficiency(history, raw):.2f} of "
        f"pure raw stepping, {rollout_efficiency(history, raw_with_resets):.2f} of raw stepping with resets at the "
        f"run's mean episode length ({', '.join(f'{t} {n}' for t, n in lengths.items())}: "
        + ", ".join(f"{t} {r:,.0f}/s" for t, r in raw_with_resets.items()) + "), same processes, task-weighted"]
    return gain, {t: last[f"eval/success_rate/{t}"] - first[f"eval/success_rate/{t}"] for t in tasks}, "\n".join(lines)


def measure_seed(cfg: Config, name: str, seed: int, tmp: str, raw: dict[str, float],
                 raw_seconds: float, results: str | None = None) -> dict:
    """Run one seed of one variant; its result as the results file keeps it (with the commit it started at)."""
    commit = gain_results.code_commit(results)
    tracker = OutcomeTracker()
    history, wall, base = run(cfg, tracker, f"{tmp}/{name}/seed{seed}")
    lengths = mean_episode_lengths(history)
    gain, tasks, summary = describe(seed, history, wall, raw, raw_rates(cfg, raw_seconds, lengths), lengths)
    return {"variant": name, "seed": seed, "config_digest": gain_results.config_digest(cfg),
            "config": gain_results.settings(cfg), "commit": commit, "base": base, "wall_s": wall, "gain": gain,
            "per_task": tasks, "history": history, "outcomes": tracker.tags, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="seconds of raw stepping per task")
    parser.add_argument("--overhead", type=int, nargs="?", const=5, default=0, metavar="N",
                        help="also compare a tracked and an untracked run of N iterations (default 5)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a named set of overrides run over the same seeds (repeat to compare variants)")
    parser.add_argument("--results", metavar="FILE.jsonl",
                        help="keep each measured seed in this file and reuse the seeds it already holds (measured "
                             "with the same configuration), so a long benchmark can be continued later")
    args = parser.parse_args()
    variants = {v[0]: v[1:] for v in args.variant} or {"config": []}
    configs = {(name, seed): load_config(args.config, [*args.set, *overrides, f"algo.model_seed={seed}"])
               for name, overrides in variants.items() for seed in args.seeds}  # every mistake before any compute
    records = gain_results.load(args.results) if args.results else {}
    done = {key: gain_results.reusable(records, args.results, *key, cfg) for key, cfg in configs.items()}
    tmp = tempfile.mkdtemp(prefix="ript-gain-")
    raw: dict[str, float] = {}
    if not all(done.values()):
        raw = raw_rates(load_config(args.config, args.set), args.raw_seconds)
        print("raw stepping, same pool shape: " + ", ".join(f"{t} {r:,.0f}/s" for t, r in raw.items()), flush=True)
    summary = []
    for name, overrides in variants.items():
        if len(variants) > 1:
            print(f"--- variant {name}: {' '.join(overrides) or '(the config as it is)'}", flush=True)
        results = []
        for seed in args.seeds:
            result = done[(name, seed)]
            if result is not None:
                print(f"{result['summary']}\n   (measured earlier, read from {args.results}; commit "
                      f"{result.get('commit') or 'unknown'})", flush=True)
            else:
                result = measure_seed(configs[(name, seed)], name, seed, tmp, raw, args.raw_seconds, args.results)
                print(result["summary"], flush=True)
                if args.results:
                    gain_results.append(args.results, result)
            results.append(result)
        gains = [r["gain"] for r in results]
        per_task = [r["per_task"] for r in results]
        spread = f" (sd {100 * statistics.stdev(gains):.1f})" if len(gains) > 1 else ""
        line = (f"mean gain over {len(gains)} seeds: {100 * statistics.fmean(gains):+.1f} points{spread}; per task: "
                + ", ".join(f"{t} {100 * statistics.fmean(p[t] for p in per_task):+.1f}" for t in per_task[0])
                + "; per seed: " + " ".join(f"{100 * g:+.1f}" for g in gains)
                + "\n  " + gain_intervals(gains, per_task, [r["history"] for r in results],
                                           [r["outcomes"] for r in results]))
        bases = describe_bases(results)  # (files written before bases were kept: none)
        if bases:
            line += f"\n  {bases}"
        print(line, flush=True)
        summary.append(f"{name}: {line}")
    if len(variants) > 1:
        print("side by side:\n  " + "\n  ".join(summary))
    if args.overhead:
        cfg = load_config(args.config, [*args.set, "algo.model_seed=0", f"training.n_iterations={args.overhead}"])
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        MlflowTracker(None, "warmup", None)  # create the database outside the timed runs
        _, untracked, _ = run(cfg, Tracker(), f"{tmp}/untracked")
        tracker = TimedTracker(None, "overhead", None)
        _, tracked, _ = run(cfg, tracker, f"{tmp}/tracked")
        print(f"tracking overhead ({args.overhead} iterations, final checkpoint uploaded: "
              f"{cfg.tracking.log_checkpoint}): tracked {tracked:.1f}s vs untracked {untracked:.1f}s = "
              f"{100 * (tracked / untracked - 1):+.1f}% (includes run-to-run noise); time inside MLflow calls "
              f"{tracker.seconds:.2f}s = {100 * tracker.seconds / tracked:.2f}% of the tracked run")


if __name__ == "__main__":
    run_main(main)
