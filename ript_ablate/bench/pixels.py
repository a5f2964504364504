"""Camera images, measured: rendering cost, rollout throughput, an iteration's memory, and (with --train) a pixel
behaviour-cloning base and a short RIPT run from it, next to the state base. One script for both machines:

    python -m ript_ablate.bench.pixels --device cpu --sizes 64 128                 # these 2 cores
    python -m ript_ablate.bench.pixels --device cuda --sizes 64 128 224 --train    # a GPU machine
    python -m ript_ablate.bench.pixels --device cpu --tiny                         # seconds (CI runs this)

Rendering: one environment stepped with random actions, state-only against each image size, interleaved in one run
(`--seconds` each, the median of `--rounds` rounds). Rollouts: the config's policy on images, replica against central
inference (central keeps the policy on `--device`), env steps/s. RIPT: `--iterations` iterations from the pixel base
(its gain in points, seconds an iteration, the MiB an iteration's kept episodes hold (`perf/episode_mib`), the growth
of this process's peak resident memory over the run, and on CUDA the peak GPU memory). `--train` first prints the
base's held-out success on images next to the state base's (both trained if not cached: long on CPU).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ript_ablate.bench import run_main
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.plugins import build_policy, build_world
from ript_ablate.plugins import load_checked_config as load_config

TINY = ["suite.tasks=[reach-v3]", "suite.demos_per_task=1", "suite.contexts_per_task=1", "suite.eval_states_per_task=1",
        "suite.num_workers=0", "sft.steps=10", "sft.scale_steps=5", "sft.scale_demos_per_task=0", "sft.batch_size=16",
        "policy.d_model=32", "policy.n_layers=1", "policy.n_heads=2", "algo.max_episode_length=50",
        "algo.rloo_batch_size=2", "algo.enable_dynamic_sampling=false", "training.contexts_per_iteration=1",
        "training.eval_interval=1", "training.save_interval=1", "tracking.enabled=false"]


def step_rate(cfg: Any, world: Any, task: str, seconds: float) -> float:
    """Env steps/s of one environment of `task` under random actions (the rollout engine's raw-stepping ceiling)."""
    from ript_ablate.engine.runner import EpisodeRunner

    count, elapsed = EpisodeRunner(cfg, world).raw_steps(task, 1, seconds, world.eval_states(task))
    return count / elapsed


def rendering(args: argparse.Namespace, overrides: list[str]) -> None:
    """State-only stepping against each image size, interleaved over `--rounds` rounds (median reported), so that a
    slow spell of a noisy machine falls on every setting alike rather than on one."""
    settings = {}
    for size in [None, *args.sizes]:
        extra = [] if size is None else ["suite.observation=images", f"suite.image_size={size}"]
        cfg = load_config(args.config, [*overrides, *extra])
        name = "state only" if size is None else f"{size} px, {'+'.join(cfg.suite.cameras)}"
        settings[name] = (cfg, build_world(cfg))
    task = next(iter(settings.values()))[1].tasks[0]
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (cfg, world) in settings.items():
            rates[name].append(step_rate(cfg, world, task, args.seconds))
    state = float(np.median(rates["state only"]))
    print(f"rendering ({task}, one environment, random actions, {args.seconds:g} s each, median of {args.rounds} "
          f"interleaved round(s)):")
    for name, values in rates.items():
        rate = float(np.median(values))
        spread = f"  [{min(values):,.0f}-{max(values):,.0f}]" if len(values) > 1 else ""
        print(f"  {name:<24} {rate:8,.0f} env steps/s  ({rate / state:.3f} of state-only){spread}")


def rollouts(args: argparse.Namespace, cfg: Any) -> None:
    import torch

    world = build_world(cfg)
    task = world.tasks[0]
    policy = build_policy(cfg, world).eval()
    states = world.eval_states(task)
    jobs = [EpisodeJob(states[i % len(states)], seed=i) for i in range(args.episodes)]
    rates = {}
    with RolloutEngine(cfg, world) as engine:
        engine.set_policy(policy, "replica")
        engine.run(jobs[:2])  # warm-up: workers started, environments built
        for mode in ("replica", "central"):
            device = torch.device(args.device) if mode == "central" else None
            engine.set_policy(policy.to(device or "cpu"), mode, device)
            start = time.perf_counter()
            episodes = engine.run(jobs)
            rates[mode] = sum(e.length for e in episodes) / (time.perf_counter() - start)
            policy.to("cpu")
        mib = sum(e.nbytes() for e in episodes) / 2**20
    print(f"rollouts on {cfg.suite.image_size} px images ({task}, {cfg.suite.num_workers} workers x "
          f"{cfg.suite.envs_per_worker} envs, {args.episodes} episodes, central on {args.device}):")
    for mode, rate in rates.items():
        print(f"  {mode:<8} {rate:8,.0f} env steps/s")
    print(f"  central / replica {rates['central'] / rates['replica']:.2f}; the episodes hold {mib:.1f} MiB "
          f"({mib * 2**20 / max(sum(e.length for e in episodes), 1) / 1024:.1f} KiB an env step)")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ript(cfg: Any, out: Path) -> Any:
    from ript_ablate.bc import ensure_base
    from ript_ablate.ript.trainer import Trainer

    ensure_base(cfg)
    return Trainer(cfg).run(out)


def base_success(cfg: Any, state_cfg: Any) -> None:
    """The behaviour-cloning base's held-out success on images, then on states (same demonstrations' states)."""
    from ript_ablate.bc import get_base
    from ript_ablate.evaluation import evaluate

    for name, run_cfg in (("images", cfg), ("states", state_cfg)):
        world = build_world(run_cfg)
        start = time.perf_counter()
        with RolloutEngine(run_cfg, world) as engine:
            policy, _, info = get_base(run_cfg, world, engine)
            base_s = time.perf_counter() - start
            engine.set_policy(policy)
            result = evaluate(world, engine)
        per_task = ", ".join(f"{t.removesuffix('-v3')} {100 * v:.0f}" for t, v in result.per_task.items())
        print(f"base on {name}: {100 * result.success_rate:.1f}% held-out success ({per_task}); base {base_s:.0f} s "
              f"(cache hit {info.get('cache_hit')})", flush=True)


def ript_on_images(cfg: Any, out: Path) -> None:
    """RIPT iterations from the pixel base: gain, seconds an iteration, and what an iteration holds in memory."""
    before = peak_rss_mib()
    result = run_ript(cfg, out)
    history = result.history
    evals = [h["eval/success_rate"] for h in history if "eval/success_rate" in h]
    seconds = [h["perf/iteration_s"] for h in history if "perf/iteration_s" in h]
    episode_mib = max(h.get("perf/episode_mib", 0.0) for h in history)
    gpu = max((h["perf/gpu_max_memory_gib"] for h in history if "perf/gpu_max_memory_gib" in h), default=None)
    print(f"RIPT from the pixel base, {len(seconds)} iteration(s) of {cfg.training.contexts_per_iteration} contexts "
          f"x K={cfg.algo.rloo_batch_size} on {cfg.suite.image_size} px: {100 * evals[0]:.1f}% -> "
          f"{100 * evals[-1]:.1f}% ({100 * (evals[-1] - evals[0]):+.1f} points), {np.mean(seconds):.1f} s an "
          f"iteration; an iteration's kept episodes {episode_mib:.1f} MiB; this process's peak resident memory "
          f"{peak_rss_mib():,.0f} MiB (+{peak_rss_mib() - before:,.0f} over the run)"
          + (f"; peak GPU memory {gpu:.2f} GiB" if gpu is not None else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/metaworld_quick.yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--cameras", nargs="+", default=["corner"])
    parser.add_argument("--seconds", type=float, default=5.0, help="stepping time per rendering measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the rendering measurement")
    parser.add_argument("--episodes", type=int, default=32, help="episodes per rollout measurement")
    parser.add_argument("--train", action="store_true", help="also the pixel and state bases' success")
    parser.add_argument("--iterations", type=int, default=3, help="RIPT iterations from the pixel base (0: none)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long check of the whole script (CI)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        overrides = [*args.set, f"training.device={args.device}", f"suite.cameras=[{','.join(args.cameras)}]"]
        if args.tiny:  # nothing cached outside the temporary directory
            overrides = [*TINY, f"sft.cache_dir={out / 'cache'}", *overrides]
            args.sizes, args.seconds, args.rounds, args.episodes, args.iterations = [16], 0.5, 1, 2, 1
        rendering(args, overrides)
        size = args.sizes[0]
        image_overrides = [*overrides, "suite.observation=images", f"suite.image_size={size}"]
        cfg = load_config(args.config, [*image_overrides, f"training.n_iterations={max(args.iterations, 1)}"])
        rollouts(args, cfg)
        if args.train or args.tiny:
            base_success(cfg, load_config(args.config, overrides))
        if args.iterations > 0:
            ript_on_images(cfg, out / "ript")


if __name__ == "__main__":
    run_main(main)
