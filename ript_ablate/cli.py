"""`ript-ablate` command line. Thin: parse, load the config, call the library, print. User mistakes exit 1 with
one clear message, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml
from rich.text import Text

from ript_ablate.config import Config, to_dict
from ript_ablate.errors import ConfigError, RiptAblateError
from ript_ablate.progress import console

EXIT_DIVERGED = 3  # a run that ended "diverged" (non-finite updates): a result, distinct from an error


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], or one line naming the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value}")
        return value
    return parse


def fraction_in_unit_interval(text: str) -> float:
    """An argparse type: a finite number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (a fall in success rate), got {text}")
    return value


def _load(args: argparse.Namespace) -> Config:
    """Load the config; original-but-unused keys print one warning line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from ript_ablate.plugins import load_checked_config

        cfg = load_checked_config(args.config, args.set)
    for w in caught:
        if issubclass(w.category, UserWarning):
            console.print(f"[yellow]warning:[/] {w.message}")
    return cfg


def is_study_spec(path: str) -> bool:
    from ript_ablate.config import load_yaml, looks_like_study_spec

    return looks_like_study_spec(load_yaml(path))


def cmd_validate(args: argparse.Namespace) -> int:
    if is_study_spec(args.config):
        if args.set:
            raise ConfigError([f"--set {args.set[0]!r}: --set overrides a config; a study spec takes its overrides "
                               "in its own `set:` list"], args.config)
        from ript_ablate.study.spec import describe, load_study

        spec = load_study(args.config)
        configs = spec.grid_configs() if spec.mode == "grid" else []
        for values in configs:
            console.print(f"  {describe(values)}")
        if spec.design is not None:
            console.print(spec.design.describe())
            aliased = spec.design.aliases(2)
            console.print("aliased (main effects and two-factor interactions): " + ("; ".join(aliased) if aliased
                          else "none: every main effect and two-factor interaction is clear of the others"))
        size = (f"{len(configs)} configurations x {len(spec.seeds)} seeds = {len(configs) * len(spec.seeds)} cells"
                if spec.mode == "grid" else f"Optuna search over {len(spec.search_space)} parameters, "
                f"{spec.n_configs} configurations x {len(spec.seeds)} seeds")
        console.print(f"[green]{args.config}: valid study[/] ({size})")
        return 0
    cfg = _load(args)
    if not args.no_env:
        from ript_ablate.plugin_check import check_plugins

        check_plugins(cfg)
    resolved = to_dict(cfg)
    if cfg.policy.name != "reference":  # the built-in policy's keys mean nothing to a plug-in policy
        resolved["policy"] = {"name": cfg.policy.name, "options": cfg.policy.options}
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
    console.print(f"[green]{args.config}: valid[/]" + ("" if args.no_env else
                  " (world and policy checked: one environment reset, one forward)"))
    return 0


def _world_and_engine(cfg: Config):
    from ript_ablate.engine import RolloutEngine
    from ript_ablate.plugins import build_world

    world = build_world(cfg)
    return world, RolloutEngine(cfg, world)


def cmd_sft(args: argparse.Namespace) -> int:
    from ript_ablate.bc import get_base

    cfg = _load(args)
    world, engine = _world_and_engine(cfg)
    with engine:
        _, weights, info = get_base(cfg, world, engine, retrain=args.retrain)
    console.print(f"base weights: {weights}")
    if args.eval:
        return cmd_eval(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ript_ablate.bc import get_base, load_base
    from ript_ablate.device import resolve_device
    from ript_ablate.engine import resolve_inference
    from ript_ablate.evaluation import evaluate

    cfg = _load(args)
    world, engine = _world_and_engine(cfg)
    with engine:
        start = time.perf_counter()
        if args.checkpoint:
            policy = load_base(args.checkpoint, cfg, world)
            source = args.checkpoint
        else:
            policy, weights, _ = get_base(cfg, world, engine)
            source = str(weights)
        device = resolve_device(cfg.training.device)
        policy.to(device)
        engine.set_policy(policy, resolve_inference(cfg.suite.inference, policy, device), device,
                          cfg.training.precision)
        result = evaluate(world, engine, mode=cfg.training.eval_mode)
    seconds = time.perf_counter() - start
    console.print(f"evaluated {source}")
    console.print(result.table())
    console.print(f"{result.episodes} episodes, {result.env_steps} env steps, {seconds:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ript_ablate.distributed import init_ranks, launched_by_torchrun, leave

    if args.nproc > 1 and not launched_by_torchrun():
        return launch_train(args)
    cfg = _load(args)
    ranks = init_ranks(cfg.training.device, cfg.training.collective_timeout_s)
    finished = False
    try:
        code = train_on_rank(cfg, args, ranks)
        finished = True
    finally:
        ranks.close(finished)  # meet the other ranks before tearing down, unless this rank is failing
    if ranks.size > 1:
        leave(code)
    return code


def train_on_rank(cfg: Config, args: argparse.Namespace, ranks) -> int:
    """One process's training: the whole run, or one rank of a torchrun trial (rank 0 builds the base and tracks)."""
    from ript_ablate.bc import ensure_base
    from ript_ablate.ript.trainer import Trainer
    from ript_ablate.tracking import MlflowTracker, Tracker
    from ript_ablate.tracking.tags import outcome_tags

    track = cfg.tracking.enabled and not args.no_track and ranks.is_main
    if track:
        check_tracking(cfg)
    if ranks.is_main:
        ensure_base(cfg)  # the explicit behaviour-cloning step (a cache hit after the first run)
    ranks.barrier()
    tracker = (MlflowTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name)
               if track else Tracker())
    try:
        result = Trainer(cfg, tracker, ranks=ranks).run(args.output)
    except BaseException:
        tracker.end("KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    if track:
        tracker.set_tags(outcome_tags(result.status))  # type: ignore[attr-defined]
    tracker.end("FINISHED" if result.status == "finished" else "FAILED")
    final = result.history[-1] if result.history else {}
    if ranks.is_main:
        console.print(f"run {result.status}: output in {result.output_dir}"
                      + (f", MLflow run {result.run_id}" if result.run_id else "")
                      + (f", final eval {100 * final['eval/success_rate']:.1f}%" if "eval/success_rate" in final
                         else "") + (f" ({ranks.size} processes)" if ranks.size > 1 else ""))
    if result.status == "finished" or ranks.size > 1:  # under torchrun a diverged run is a result, not a crash:
        return 0  # the launcher reads it from the run directory (`train --nproc` exits 3 as one process does)
    return EXIT_DIVERGED


def check_tracking(cfg: Config) -> None:
    """An unreachable tracking store is one line before any demonstration is collected or base built."""
    from ript_ablate.tracking import check_tracking_store, resolve_tracking_uri

    check_tracking_store(resolve_tracking_uri(cfg.tracking.tracking_uri))


def launch_train(args: argparse.Namespace) -> int:
    """`train --nproc N`: check the config, build the base once, then run torchrun with N processes on this
    machine (each with cores / N threads) and exit as one process would (0, 3 when diverged, 1 on an error)."""
    import json
    import subprocess

    from ript_ablate.bc import ensure_base
    from ript_ablate.distributed import torchrun_args
    from ript_ablate.study.resources import available_cores

    cfg = _load(args)
    if cfg.tracking.enabled and not args.no_track:
        check_tracking(cfg)
    ensure_base(cfg)
    out = Path(args.output or Path(cfg.training.output_dir) / time.strftime("run-%Y%m%d-%H%M%S"))
    argv = ["train", args.config, *[f"--set={s}" for s in args.set], "--output", str(out)]
    if args.no_track:
        argv.append("--no-track")
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, available_cores() // args.nproc))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    console.print(f"launching {args.nproc} processes (torchrun, {threads} thread(s) each): output in {out}")
    code = subprocess.run(torchrun_args(args.nproc, argv), env=env, check=False).returncode
    if code != 0:
        from ript_ablate.study.cell import resume_point

        checkpoint, _ = resume_point(out)
        raise RiptAblateError(f"the {args.nproc}-process run failed (torchrun exit {code}; its report is above); "
                              + (f"resume from its last checkpoint with --set algo.lora_adaptor_ckpt={checkpoint}"
                                 if checkpoint else f"it wrote no checkpoint in {out / 'checkpoints'}"))
    try:
        status = json.loads((out / "result.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return 0
    return 0 if status == "finished" else EXIT_DIVERGED


def _study(args: argparse.Namespace):
    from ript_ablate.study.spec import load_study

    return load_study(args.study, args.output_dir)


def cmd_study_run(args: argparse.Namespace) -> int:
    from ript_ablate.study.runner import run_study

    return run_study(_study(args), args.workers, args.devices, args.storage, args.retry_failed)


def cmd_study_worker(args: argparse.Namespace) -> int:
    from ript_ablate.study.runner import run_worker

    return run_worker(_study(args), args.storage, args.devices, args.slot)


def cmd_study_status(args: argparse.Namespace) -> int:
    from ript_ablate.study.runner import show_status

    return show_status(_study(args), args.storage)


def cmd_report(args: argparse.Namespace) -> int:
    from ript_ablate.report.render import write_report
    from ript_ablate.report.stability import Thresholds

    spec = _study(args)
    metrics = Path(args.from_metrics) if args.from_metrics else None
    write_report(spec, Path(args.reports), args.storage, thresholds=Thresholds(collapse=args.collapse_threshold),
                 upload=not args.no_upload, metrics_csv=metrics)
    return 0


def add_report_command(sub) -> None:
    p = sub.add_parser("report", help="Comparison and stability report of a study (Markdown + PNG plots).",
                       description="Reads the study's runs from MLflow and writes reports/<study>/report.md.")
    p.add_argument("study", help="study spec YAML (see studies/)")
    p.add_argument("--reports", default="reports", help="where report directories go (default: reports)")
    p.add_argument("--storage", default=None, help="the study's Optuna storage (optuna mode; as for study run)")
    p.add_argument("--output-dir", default=None, help="the study's output directory (as for study run)")
    p.add_argument("--collapse-threshold", type=fraction_in_unit_interval, default=0.15,
                   help="a fall below the running best evaluation success that counts as collapse (default 0.15)")
    p.add_argument("--no-upload", action="store_true", help="do not attach the report to the study's MLflow run")
    p.add_argument("--from-metrics", default=None, metavar="CSV",
                   help="rebuild a grid study's report from the metrics.csv a report wrote (no MLflow read), e.g. "
                        "a committed example's")
    p.set_defaults(func=cmd_report)


def add_study_commands(sub) -> None:
    study = sub.add_parser("study", help="Run, join or inspect a study (a grid or an Optuna search of trainings).",
                           description="Studies: every cell (configuration x seed) is one training run.")
    ssub = study.add_subparsers(dest="study_command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = ssub.add_parser(name, help=help, description=help)
        p.add_argument("study", help="study spec YAML (see studies/)")
        p.add_argument("--storage", default=None,
                       help="Optuna storage: a journal file path (default: <output-dir>/<name>/optuna.journal) or "
                            "postgresql://user@host/db for studies over several machines")
        p.add_argument("--output-dir", default=None, help="where study directories go (default: runs/studies)")
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_study_run, "Run a study (again: resumes, skipping finished cells, re-running lost ones).")
    p.add_argument("--workers", type=int_in(1, 256), default=None,
                   help="parallel trials (CPU: default 1, cores are split between them; GPU: one per device)")
    p.add_argument("--devices", default="auto", help="auto | cpu | cuda | cuda:0,cuda:1")
    p.add_argument("--retry-failed", action="store_true", help="give cells that failed after all retries another go")
    p = add("worker", cmd_study_worker, "Join a study as one worker (e.g. from another machine).")
    p.add_argument("--devices", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--slot", default=None, help=argparse.SUPPRESS)  # set by `study run` for its own workers
    add("status", cmd_study_status, "Show every cell: state, objective, attempts and failure reason.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ript-ablate", description="Ablation studies of RIPT post-training.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set algo.ppo_clip_high=0.28 (repeatable)")
        p.set_defaults(func=func)
        return p

    p = add("validate", cmd_validate, "Check a config (or a study spec) and print it resolved, or list every error.")
    p.add_argument("--no-env", action="store_true", help="skip the world and policy check (it builds one "
                   "environment, resets it once and runs the policy once on that observation)")
    p = add("sft", cmd_sft, "Train (or reuse from the cache) the behaviour-cloning base.")
    p.add_argument("--retrain", action="store_true", help="ignore the cached base and train it again (a cached "
                   "pre-trained model is reused: delete its pretrain-<hash> folder to rebuild it)")
    p.add_argument("--eval", action="store_true", help="evaluate the base afterwards")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p = add("eval", cmd_eval, "Evaluate a policy (default: the config's behaviour-cloning base).")
    p.add_argument("--checkpoint", default=None, help="model.safetensors to evaluate instead of the base")
    p = add("train", cmd_train, "Run RIPT post-training on the config's base (built first if absent), tracked in "
                                "MLflow.")
    p.add_argument("--no-track", action="store_true", help="do not track in MLflow")
    p.add_argument("--output", default=None, help="run directory (default: training.output_dir/run-<time>)")
    p.add_argument("--nproc", type=int_in(1, 1024), default=1,
                   help="processes (GPUs) for this one run: launches torchrun for you (default 1; or run "
                        "`torchrun --nproc_per_node N -m ript_ablate train CONFIG` yourself)")
    add_study_commands(sub)
    add_report_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if os.getcwd() not in sys.path and "" not in sys.path:  # `python -m` imports from here; the script must too,
        sys.path.insert(0, os.getcwd())  # so a plug-in package in the working directory loads either way
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RiptAblateError as exc:
        console.print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    except OSError as exc:  # a path that cannot be read or written (a file where a directory is expected, ...)
        if os.environ.get("RIPT_ABLATE_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        console.print(Text("error: ", style="red") + Text(f"{exc.strerror or exc}{where} (set RIPT_ABLATE_DEBUG=1 "
                                                          "for the traceback)"), soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
