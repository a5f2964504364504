"""Study specs: a YAML file naming a base config, the switches to vary (a grid or an Optuna search space),
the seeds, the objective and the retry policy. Every problem is reported before anything runs.

    name: laplace_x_fix_scale
    config: ../configs/metaworld_quick.yaml      # relative to this file
    set: [training.n_iterations=10]              # optional overrides for every cell
    mode: grid                                   # grid | optuna
    factors: {algo.use_laplace_sampling: [true, false], algo.fix_scale_head: [true, false]}
    seeds: [0, 1]                                # sets algo.model_seed; the behaviour-cloning base is shared
    objective: {metric: eval/success_rate, reduction: final, aggregation: mean, direction: maximize}
    retries: 1

With a `command:` block (see study/command.py) the cells run your own trainer on your own YAML instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ript_ablate.config import (
    SECTIONS,
    Config,
    all_keys,
    is_option_key,
    load_yaml,
    merge,
    parse_overrides,
    parse_value,
    set_dotted,
)
from ript_ablate.errors import ConfigError
from ript_ablate.study.command import CommandSpec, check_keys, parse_command, with_dotted
from ript_ablate.study.sequential import SeedPlan

SEED_KEY = "algo.model_seed"
MAX_CELLS = 100_000
REDUCTIONS = ("final", "best", "auc")
AGGREGATIONS = ("mean", "iqm")
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "gp", "random")
PRUNERS = ("none", "median", "hyperband")
PARAM_TYPES = ("categorical", "float", "int")
TOP_KEYS = ("name", "config", "set", "mode", "factors", "search_space", "sampler", "sampler_seed", "n_configs",
            "pruner", "seeds", "objective", "retries", "timeout_s", "storage", "output_dir", "tracking_uri",
            "experiment", "heartbeat_s", "lease_timeout_s", "description", "command", "report", "race",
            "processes_per_cell", "configurations", "design", "controls")
CONFIGURATION = "configuration"  # the factor whose levels are the spec's named `configurations`
CONTROL = "control"  # the key naming a control configuration outside the grid or design (`controls`)
REPORT_KEYS = ("success_metric",)


@dataclass(frozen=True)
class Objective:
    metric: str = "eval/success_rate"
    reduction: str = "final"  # over the evaluation points of one run
    aggregation: str = "mean"  # over the seeds of one configuration
    direction: str = "maximize"


@dataclass(frozen=True)
class Param:
    """One dimension of an Optuna search space."""

    key: str
    type: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None


@dataclass
class StudySpec:
    name: str
    path: Path
    config_path: Path
    base: dict[str, Any]  # the base config as a dict, with the spec's `set` overrides merged in
    mode: str
    seeds: list[int]
    objective: Objective
    factors: dict[str, list[Any]] = field(default_factory=dict)
    search_space: list[Param] = field(default_factory=list)
    sampler: str = "tpe"
    sampler_seed: int = 0
    n_configs: int = 0
    pruner: str = "none"
    retries: int = 1
    timeout_s: float | None = None
    storage: str | None = None
    output_dir: Path = Path("runs/studies")
    tracking_uri: str | None = None
    experiment: str | None = None
    heartbeat_s: float = 10.0
    lease_timeout_s: float | None = None
    description: str = ""
    command: CommandSpec | None = None  # your own trainer instead of the built-in one
    seed_plan: SeedPlan | None = None  # adaptive seeds: `seeds` are the ones enqueued so far (from 0 up)
    race: Race | None = None  # optuna: race the best configurations with added seeds after the search
    success_metric: str = "eval/success_rate"  # what the report plots and compares as success
    processes_per_cell: int = 1  # >1: every cell is one torchrun trial of that many processes (GPUs)
    #: named configurations (grid): the levels of the `configuration` factor, each a set of dotted keys, for
    #: settings that only make sense together (each policy family with its own exploration switch)
    configurations: dict[str, dict[str, Any]] = field(default_factory=dict)
    design: Any = None  # a fractional screening design over two-level factors (ript_ablate.study.design)
    #: controls (grid): configurations outside the grid or design, each the factors' first levels with its own
    #: settings on top (e.g. a learning rate of 0: a gain that must come out as none); compared, never in an effect
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)

    def expand(self, values: dict[str, Any]) -> dict[str, Any]:
        """A cell's factor values as dotted config keys: a named configuration replaced by its settings."""
        out = {k: v for k, v in values.items() if k not in (CONFIGURATION, CONTROL)}
        if CONFIGURATION in values:
            out = {**self.configurations[values[CONFIGURATION]], **out}
        if CONTROL in values:
            out = {**out, **self.controls[values[CONTROL]]}
        return out

    def race_seeds(self, n: int) -> list[int]:
        """The seeds of a raced configuration that has run `n`: the spec's, then the next integers."""
        extra = [max(self.seeds) + 1 + i for i in range(max(0, n - len(self.seeds)))]
        return [*self.seeds[:n], *extra]

    @property
    def seed_key(self) -> str:
        return self.command.seed_key if self.command else SEED_KEY

    @property
    def n_iterations(self) -> int | None:
        """The last step a cell reports (pruners and the pruning rule need it); None when unknown."""
        if self.command:
            return self.command.n_steps
        return int(self.base.get("training", {}).get("n_iterations", 15))

    def cell_data(self, values: dict[str, Any], seed: int) -> dict[str, Any]:
        """A cell's config as a dict: the base with the cell's values and seed set."""
        if self.command:
            return with_dotted(self.base, {**self.expand(values), self.command.seed_key: seed})
        return with_values(self.base, {**self.expand(values), SEED_KEY: seed})

    @property
    def lease_timeout(self) -> float:
        """Seconds without a heartbeat after which a running cell's worker counts as dead."""
        return self.lease_timeout_s or max(3 * self.heartbeat_s, 30.0)

    @property
    def study_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"study-{self.name}"

    def storage_url(self, override: str | None = None) -> str:
        """Explicit --storage, else the spec's, else a journal file in the study directory (no server)."""
        return override or self.storage or str(self.study_dir / "optuna.journal")

    def grid_configs(self) -> list[dict[str, Any]]:
        """Every combination of the factors' values, in a fixed order (the first factor varies slowest); with a
        fractional design, its runs; then the controls."""
        return [*self.effect_configs(), *self.control_configs()]

    def effect_configs(self) -> list[dict[str, Any]]:
        """The grid's or the design's configurations: those the effects are estimated from."""
        if self.design is not None and self.design.type == "fractional":
            return self.design.rows(self.factors)
        keys = list(self.factors)
        return [dict(zip(keys, values)) for values in itertools.product(*self.factors.values())]

    def control_configs(self) -> list[dict[str, Any]]:
        """Each control: the factors' first levels, named (its own settings are applied by `expand`)."""
        return [{**{k: v[0] for k, v in self.factors.items()}, CONTROL: name} for name in self.controls]

    def cell_config(self, values: dict[str, Any], seed: int) -> Config:
        from ript_ablate.plugins import checked_config_from_dict

        if self.command:
            raise ValueError("a study over your own command has no built-in config; use cell_data")
        settings = self.expand(values)
        return checked_config_from_dict(with_values(self.base, {**settings, SEED_KEY: seed}), f"{self.path} cell",
                                        explicit=settings)

    def fingerprint(self) -> str:
        """What defines the cells; resuming with a changed spec is refused instead of mixing results."""
        seeds = {"adaptive": self.seed_plan.__dict__} if self.seed_plan else self.seeds  # adaptive: seeds grow
        data = {"base": self.base, "mode": self.mode, "factors": self.factors, "seeds": seeds,
                **({"configurations": self.configurations} if self.configurations else {}),
                **({"design": self.design.generators} if self.design is not None else {}),
                **({"controls": self.controls} if self.controls else {}),
                "space": [p.__dict__ for p in self.search_space], "objective": self.objective.__dict__,
                **({"command": self.command.to_json()} if self.command else {}),
                **({"race": {"top": self.race.top, **self.race.plan.__dict__}} if self.race else {})}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The config dict with dotted keys set, e.g. {'algo.lr': 1e-4, 'policy.options.hidden': 128}."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        set_dotted(nested, key, value)
    return merge(data, nested)


def config_id_for(values: dict[str, Any]) -> str:
    """A short stable id for a configuration (the same values give the same id on any machine)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return "cfg-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def cell_id_for(config_id: str, seed: int) -> str:
    return f"{config_id}-s{seed}"


def format_value(value: Any) -> str:
    """A factor value for people: floats to 3 significant digits (an Optuna sample is 0.283, not
    0.28316032453460394); everything else as it is."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe(values: dict[str, Any]) -> str:
    """'ppo_clip_high=0.28, policy.options.hidden=128': a config key without its section, a plug-in's option whole."""
    return ", ".join(f"{k if is_option_key(k) else k.split('.', 1)[-1]}={format_value(v)}"
                     for k, v in values.items()) or "base"


class _Checker:
    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def need(self, ok: bool, key: str, value: Any, expected: str) -> bool:
        if not ok:
            self.problems.append(f"{key}: got {value!r}, expected {expected}")
        return ok


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_param(key: str, raw: Any, check: _Checker) -> Param | None:
    where = f"search_space.{key}"
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not check.need(isinstance(raw, dict), where, raw, "a mapping with type (categorical|float|int) or a list"):
        return None
    kind = raw.get("type")
    if not check.need(kind in PARAM_TYPES, f"{where}.type", kind, " | ".join(PARAM_TYPES)):
        return None
    unknown = set(raw) - {"type", "choices", "low", "high", "log", "step"}
    check.need(not unknown, where, sorted(unknown), "only type, choices, low, high, log, step")
    if kind == "categorical":
        choices = raw.get("choices")
        if check.need(isinstance(choices, list) and len(choices) >= 2, f"{where}.choices", choices,
                      "a list of at least 2 values"):
            return Param(key, kind, choices=tuple(choices))
        return None
    low, high, log = raw.get("low"), raw.get("high"), bool(raw.get("log", False))
    numeric = all(_finite(v) for v in (low, high))
    if not check.need(numeric and low < high, f"{where}.low/high", (low, high), "finite numbers with low < high"):
        return None
    if log:
        check.need(low > 0, f"{where}.low", low, "> 0 for a log-scaled range")
    if kind == "int":
        check.need(float(low).is_integer() and float(high).is_integer(), f"{where}.low/high", (low, high),
                   "integers for an int range")
    return Param(key, kind, low=low, high=high, log=log, step=raw.get("step"))


def param_samples(param: Param) -> list[Any]:
    """Values that exercise a dimension's range when validating it against the config (ends and middle)."""
    if param.type == "categorical":
        return list(param.choices)
    assert param.low is not None and param.high is not None
    mid = math.sqrt(param.low * param.high) if param.log else (param.low + param.high) / 2
    values = [param.low, mid, param.high]
    return [int(round(v)) for v in values] if param.type == "int" else values


def load_study(path: str | Path, output_dir: str | Path | None = None) -> StudySpec:
    """Load and check a study spec; raises ConfigError listing every problem, before anything runs."""
    path = Path(path)
    raw = load_yaml(path, "study spec")
    check = _Checker(path)
    if not isinstance(raw, dict):
        raise ConfigError([f"a study spec is a mapping, got {type(raw).__name__}"], str(path))
    sections = sorted(set(SECTIONS) & set(raw))
    if sections and "config" not in raw:
        raise ConfigError([f"this is a config (it has the sections {', '.join(sections)}), not a study spec: train it "
                           f"with `ript-ablate train {path}`, or name it as `config:` in a study spec (see studies/)"],
                          str(path))
    for key in sorted(set(raw) - set(TOP_KEYS)):
        check.problems.append(f"{key}: unknown study key (known: {', '.join(TOP_KEYS)})")
    name = raw.get("name")
    check.need(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), "name", name,
               "a name of letters, digits, '-' and '_'")
    base: dict[str, Any] = {}
    config_path = path.parent / str(raw.get("config", ""))
    if check.need(isinstance(raw.get("config"), str), "config", raw.get("config"), "a path to a config YAML"):
        if not config_path.is_file():
            check.problems.append(f"config: file not found: {config_path} (paths are relative to {path.parent})")
        else:
            loaded = load_yaml(config_path)
            base = loaded if isinstance(loaded, dict) else {}
    command = parse_command(raw["command"], path.parent, check.problems) if "command" in raw else None
    overrides = raw.get("set") or []
    if check.need(isinstance(overrides, list), "set", overrides, "a list of section.key=value strings"):
        if "command" in raw:  # your own YAML: dotted keys of any depth
            base = with_dotted(base, _dotted_overrides([str(o) for o in overrides], check))
        else:
            nested, problems = parse_overrides([str(o) for o in overrides])
            check.problems.extend(f"set: {p}" for p in problems)
            base = merge(base, nested)
    report_raw = raw.get("report") or {}
    success_metric = "eval/success_rate"
    if check.need(isinstance(report_raw, dict) and not set(report_raw) - set(REPORT_KEYS), "report", report_raw,
                  f"a mapping with only {', '.join(REPORT_KEYS)}"):
        success_metric = report_raw.get("success_metric", success_metric)
        check.need(isinstance(success_metric, str) and bool(success_metric), "report.success_metric",
                   success_metric, "the name of the metric your runs log as evaluation success")
    mode = raw.get("mode", "grid")
    check.need(mode in ("grid", "optuna"), "mode", mode, "grid | optuna")
    seeds = raw.get("seeds")
    if "seeds" not in raw:
        check.problems.append("seeds: missing; list the seeds every configuration runs with, e.g. seeds: [0, 1, 2] "
                              "(each sets algo.model_seed; one seed cannot tell an effect from noise)")
    seed_plan = None
    if isinstance(seeds, dict):  # adaptive: {initial, max, min_effect}
        seed_plan = _parse_seed_plan(seeds, raw.get("mode", "grid"), check)
        seeds = list(range(seed_plan.initial)) if seed_plan else []
    adaptive_failed = isinstance(raw.get("seeds"), dict) and seed_plan is None  # its problems are listed already
    seeds_ok = "seeds" in raw and not adaptive_failed and check.need(
        isinstance(seeds, list) and bool(seeds) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and len(set(seeds)) == len(seeds) and len(seeds) <= 10_000, "seeds", seeds,
        "a non-empty list of distinct integers")
    obj_raw = raw.get("objective") or {}
    objective = Objective()
    if check.need(isinstance(obj_raw, dict), "objective", obj_raw, "a mapping"):
        unknown = set(obj_raw) - {"metric", "reduction", "aggregation", "direction"}
        check.need(not unknown, "objective", sorted(unknown), "only metric, reduction, aggregation, direction")
        objective = Objective(**{k: v for k, v in obj_raw.items() if k not in unknown})
        check.need(isinstance(objective.metric, str) and ("/" in objective.metric or "command" in raw),
                   "objective.metric", objective.metric, "a metric name such as eval/success_rate")
        check.need(objective.reduction in REDUCTIONS, "objective.reduction", objective.reduction, " | ".join(REDUCTIONS))
        check.need(objective.aggregation in AGGREGATIONS, "objective.aggregation", objective.aggregation,
                   " | ".join(AGGREGATIONS))
        check.need(objective.direction in DIRECTIONS, "objective.direction", objective.direction,
                   " | ".join(DIRECTIONS))
    seed_key = command.seed_key if command else SEED_KEY
    # your own YAML's keys are checked against that file below (with the closest key); the built-in config's here
    known = None if "command" in raw else set(all_keys())
    factors: dict[str, list[Any]] = {}
    space: list[Param] = []
    configurations = _parse_configurations(raw, mode, known, seed_key, check)
    controls = _parse_configurations(raw, mode, known, seed_key, check, "controls", 1)
    if configurations:
        factors[CONFIGURATION] = list(configurations)
    if mode == "grid":
        raw_factors = raw.get("factors", {} if configurations else None)
        if check.need(isinstance(raw_factors, dict) and (raw_factors or configurations), "factors", raw_factors,
                      "a mapping of dotted config keys to lists of values (or named configurations)"):
            for key, values in raw_factors.items():
                if key == seed_key:
                    check.problems.append(f"factors.{key}: seeds are an axis of their own; list them under seeds")
                elif known is not None and key not in known and not is_option_key(key):
                    check.problems.append(f"factors.{key}: not a config key (a plug-in's own settings are "
                                          "suite.options.NAME or policy.options.NAME)")
                elif check.need(isinstance(values, list) and len(values) >= 1, f"factors.{key}", values,
                                "a list of values"):
                    check.need(len(values) == len(set(map(repr, values))), f"factors.{key}", values,
                               "distinct values")
                    factors[key] = list(values)
        for key in ("search_space", "n_configs"):
            check.need(key not in raw, key, raw.get(key), "nothing in grid mode (it belongs to mode: optuna)")
        design = _parse_design(raw, factors, check)
        if design is not None and seed_plan is not None:
            from ript_ablate.study.design import effect_terms

            spare = seed_plan.initial * (design.runs - 1) - len(effect_terms(design))
            check.need(spare >= 1, "seeds.initial", seed_plan.initial,
                       f"enough seeds that the {design.runs}-run design estimates its {len(effect_terms(design))} "
                       f"effects with spare degrees of freedom (at least {_min_initial(design)})")
        configs = (design.runs if design is not None else math.prod(len(v) for v in factors.values())) + len(controls)
        cells = configs * (len(seeds) if seeds_ok else 1)
        check.need(cells <= MAX_CELLS, "factors", f"{cells:,} cells", f"at most {MAX_CELLS:,} cells (configurations x "
                   "seeds): every cell is a training run, enqueued up front")
    elif mode == "optuna":
        raw_space = raw.get("search_space")
        if check.need(isinstance(raw_space, dict) and raw_space, "search_space", raw_space,
                      "a mapping of dotted config keys to parameter ranges"):
            for key, value in raw_space.items():
                if key == seed_key or (known is not None and key not in known and not is_option_key(key)):
                    check.problems.append(f"search_space.{key}: not a config key that can be searched")
                    continue
                param = _parse_param(key, value, check)
                if param:
                    space.append(param)
        check.need(raw.get("sampler", "tpe") in SAMPLERS, "sampler", raw.get("sampler"), " | ".join(SAMPLERS))
        check.need(raw.get("pruner", "none") in PRUNERS, "pruner", raw.get("pruner"), " | ".join(PRUNERS))
        n_configs = raw.get("n_configs")
        check.need(isinstance(n_configs, int) and n_configs >= 1, "n_configs", n_configs, "an integer >= 1")
        check.need("factors" not in raw, "factors", raw.get("factors"), "nothing in optuna mode (use search_space)")
    retries = raw.get("retries", 1)
    check.need(isinstance(retries, int) and not isinstance(retries, bool) and 0 <= retries <= 100, "retries",
               retries, "an integer in 0..100")
    timeout = raw.get("timeout_s")
    check.need(timeout is None or (_finite(timeout) and timeout > 0), "timeout_s", timeout,
               "a finite number of seconds > 0, or null for none")
    heartbeat = raw.get("heartbeat_s", 10.0)
    check.need(_finite(heartbeat) and 0 < heartbeat <= 3600, "heartbeat_s", heartbeat, "seconds in (0, 3600]")
    lease = raw.get("lease_timeout_s")
    check.need(lease is None or (_finite(lease) and _finite(heartbeat) and lease > heartbeat), "lease_timeout_s",
               lease, "null (default max(3 x heartbeat_s, 30)) or seconds > heartbeat_s")
    if mode == "optuna":
        check.need(isinstance(raw.get("sampler_seed", 0), int), "sampler_seed", raw.get("sampler_seed"), "an integer")
        n_configs = raw.get("n_configs")
        check.need(not isinstance(n_configs, int) or n_configs <= 100_000, "n_configs", n_configs, "at most 100,000")
    processes = raw.get("processes_per_cell", 1)
    check.need(isinstance(processes, int) and not isinstance(processes, bool) and 1 <= processes <= 64,
               "processes_per_cell", processes, "an integer in 1..64 (processes, one GPU each on CUDA, of one cell)")
    storage = raw.get("storage")
    check.need(storage is None or isinstance(storage, str), "storage", storage, "a URL or journal file path")
    if command is not None and base:
        keys = {**{f"factors.{k}": k for k in factors if k != CONFIGURATION},
                **{f"configurations.{n}.{k}": k for n, c in configurations.items() for k in c},
                **{f"search_space.{p.key}": p.key for p in space},
                "command.seed_key": command.seed_key}
        check.problems.extend(check_keys(command, base, keys, config_path.name))
    race = _parse_race(raw["race"], mode, seeds if seeds_ok else [], check) if "race" in raw else None
    if command is not None and raw.get("pruner", "none") != "none" and command.n_steps is None:
        check.problems.append("command.n_steps: required with a pruner (the last step your trainer reports: a run is "
                              "never pruned at its last evaluation)")
    if check.problems:
        raise ConfigError(check.problems, str(path))

    spec = StudySpec(
        name=name, path=path, config_path=config_path, base=base, mode=mode, seeds=list(seeds) if seeds_ok else [],
        objective=objective, factors=factors, search_space=space, sampler=raw.get("sampler", "tpe"),
        sampler_seed=int(raw.get("sampler_seed", 0)), n_configs=int(raw.get("n_configs") or 0),
        pruner=raw.get("pruner", "none"), retries=retries, timeout_s=timeout, storage=storage,
        output_dir=Path(output_dir or raw.get("output_dir") or "runs/studies"),
        tracking_uri=raw.get("tracking_uri"), experiment=raw.get("experiment"), heartbeat_s=float(heartbeat),
        lease_timeout_s=float(lease) if lease is not None else None,
        description=str(raw.get("description", "")), command=command, success_metric=success_metric,
        seed_plan=seed_plan, race=race, processes_per_cell=processes if isinstance(processes, int) else 1,
        configurations=configurations, design=design if mode == "grid" else None, controls=controls,
    )
    if command is None:  # the built-in trainer checks every cell's config now; your trainer checks its own
        _check_cells(spec)
    return spec


@dataclass(frozen=True)
class Race:
    """`race: {top: 4, max_seeds: 10, min_effect: 5}`: after an Optuna search, the `top` configurations get added
    seeds until a paired sequential test drops each of them as worse than the leader, or max_seeds is reached."""

    top: int
    plan: SeedPlan  # initial = the spec's seeds


def _parse_race(raw: Any, mode: str, seeds: list[int], check: _Checker) -> Race | None:
    if not check.need(isinstance(raw, dict) and not set(raw) - {"top", "max_seeds", "min_effect", "alpha"}, "race",
                      raw, "a mapping with top, max_seeds, min_effect (and alpha)"):
        return None
    ok = check.need(mode == "optuna", "race", raw, "nothing in grid mode (grids take adaptive seeds instead)")
    ok &= check.need(len(seeds) >= 2, "race", raw, "at least 2 seeds in `seeds` (a paired spread needs two)")
    top, most = raw.get("top", 4), raw.get("max_seeds", 10)
    effect, alpha = raw.get("min_effect", 5.0), raw.get("alpha", 0.05)
    ok &= check.need(isinstance(top, int) and not isinstance(top, bool) and top >= 2, "race.top", top,
                     "an integer >= 2 (configurations raced)")
    ok &= check.need(isinstance(most, int) and not isinstance(most, bool) and len(seeds) <= most <= 1000,
                     "race.max_seeds", most, f"an integer >= the {len(seeds)} seeds of the search (and <= 1000)")
    ok &= check.need(_finite(effect) and effect > 0, "race.min_effect", effect, "points (> 0)")
    ok &= check.need(_finite(alpha) and 0 < alpha < 0.5, "race.alpha", alpha, "a false-decision rate in (0, 0.5)")
    return Race(top, SeedPlan(len(seeds), most, float(effect), float(alpha))) if ok else None


def _parse_seed_plan(raw: dict[str, Any], mode: str, check: _Checker) -> SeedPlan | None:
    """`seeds: {initial: 3, max: 10, min_effect: 5}`: seeds 0.. are added one at a time while a factor is
    undecided (study/sequential.py); min_effect in points (100 x the objective, as the report prints rates)."""
    unknown = set(raw) - {"initial", "max", "min_effect", "alpha"}
    ok = check.need(not unknown, "seeds", sorted(unknown), "only initial, max, min_effect, alpha (adaptive seeds)")
    ok &= check.need(mode == "grid", "seeds", raw, "a list in optuna mode (adaptive seeds are for grids)")
    initial, most = raw.get("initial", 3), raw.get("max", 10)
    ok &= check.need(isinstance(initial, int) and not isinstance(initial, bool) and initial >= 2, "seeds.initial",
                     initial, "an integer >= 2 (a paired spread needs two seeds)")
    ok &= check.need(isinstance(most, int) and not isinstance(most, bool) and isinstance(initial, int)
                     and initial <= most <= 1000, "seeds.max", most, "an integer >= seeds.initial (and <= 1000)")
    effect, alpha = raw.get("min_effect"), raw.get("alpha", 0.05)
    ok &= check.need(_finite(effect) and effect > 0, "seeds.min_effect", effect,
                     "the smallest effect worth finding, in points (> 0), e.g. 5")
    ok &= check.need(_finite(alpha) and 0 < alpha < 0.5, "seeds.alpha", alpha, "a false-decision rate in (0, 0.5)")
    return SeedPlan(initial, most, float(effect), float(alpha)) if ok else None


def _min_initial(design: Any) -> int:
    from ript_ablate.study.design import effect_terms

    return len(effect_terms(design)) // (design.runs - 1) + 1


def _parse_design(raw: dict[str, Any], factors: dict[str, list[Any]], check: _Checker) -> Any:
    """`design: full | fractional`, or `{type: fractional, resolution: 5}` / `{type: fractional, generators: "a b c d
    abcd"}`: a fractional factorial over two-level factors (ript_ablate.study.design). None for the full grid."""
    from ript_ablate.study.design import DESIGN_TYPES, STANDARD_GENERATORS, build_design, check_generators

    if "design" not in raw:
        return None
    value = raw["design"]
    settings = value if isinstance(value, dict) else {"type": value}
    kind = settings.get("type")
    if not check.need(kind in DESIGN_TYPES and not set(settings) - {"type", "resolution", "generators"}, "design",
                      value, "full | fractional, or {type: fractional, resolution: N} or {type: fractional, "
                      "generators: 'a b c ab'}"):
        return None
    if kind == "full":
        return None
    uneven = [k for k, v in factors.items() if len(v) != 2]
    if not check.need(not uneven and len(factors) >= 3, "design", value,
                      f"two levels for every factor and at least 3 factors (not two-level: {uneven})" if uneven
                      else "at least 3 two-level factors"):
        return None
    generators, resolution = settings.get("generators"), settings.get("resolution")
    if generators is not None:
        problem = check_generators(str(generators), len(factors))
        if not check.need(problem is None, "design.generators", generators, f"valid generators: {problem}"):
            return None
    else:
        known = sorted(r for n, r in STANDARD_GENERATORS if n == len(factors))
        if not check.need(resolution in known, "design.resolution", resolution,
                          f"one of {known} for {len(factors)} factors (or give design.generators)"):
            return None
    return build_design(list(factors), "fractional", generators, resolution)


def _parse_configurations(raw: dict[str, Any], mode: str, known: set[str] | None, seed_key: str,
                          check: _Checker, section: str = "configurations",
                          at_least: int = 2) -> dict[str, dict[str, Any]]:
    """`configurations: {name: {dotted.key: value, ...}, ...}` (grid mode): settings that only make sense together
    (each policy family with its own exploration switch), crossed with the factors and the seeds. `controls:` has
    the same shape: configurations outside the grid (the factors' first levels with these settings on top)."""
    if section not in raw:
        return {}
    value = raw[section]
    if not check.need(mode == "grid", section, "...", "nothing in optuna mode (list them in a grid)"):
        return {}
    if not check.need(isinstance(value, dict) and len(value) >= at_least, section, value,
                      f"a mapping of at least {'two names' if at_least == 2 else 'one name'} to mappings of dotted "
                      "config keys to values"):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        where = f"{section}.{name}"
        if not check.need(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), where, name,
                          "a name of letters, digits, '-' and '_'"):
            continue
        if not check.need(isinstance(settings, dict), where, settings, "a mapping of dotted config keys to values"):
            continue
        for key in settings:
            if key == seed_key:
                check.problems.append(f"{where}.{key}: seeds are an axis of their own; list them under seeds")
            elif known is not None and key not in known and not is_option_key(key):
                check.problems.append(f"{where}.{key}: not a config key")
        out[name] = dict(settings)
    if section == "configurations":  # a control may set a factor's key: it stands outside the grid
        overlap = set(raw.get("factors") or {}) & {k for c in out.values() for k in c}
        check.need(not overlap, "configurations", sorted(overlap), "keys that no factor also sets")
    return out


def _dotted_overrides(items: list[str], check: _Checker) -> dict[str, Any]:
    """`set:` entries for your own YAML: key.at.any.depth=value (values parsed as YAML scalars)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            check.problems.append(f"set: {item!r}: expected dotted.key=value")
            continue
        try:
            values[key.strip()] = parse_value(text, f"set: {key.strip()}")
        except ConfigError as exc:
            check.problems.extend(exc.problems)
    return values


def _check_cells(spec: StudySpec) -> None:
    """Build the config of every grid cell (or the ends of every search range): bad values fail here, named."""
    problems: list[str] = []
    if spec.mode == "grid":
        candidates = spec.grid_configs()
    else:
        candidates = [{p.key: v} for p in spec.search_space for v in param_samples(p)]
    seen: set[str] = set()
    for values in candidates or [{}]:
        for seed in spec.seeds[:1]:
            try:
                spec.cell_config(values, seed)
            except ConfigError as exc:
                for problem in exc.problems:
                    if problem not in seen:
                        seen.add(problem)
                        problems.append(f"with {describe(values)}: {problem}")
    if problems:
        raise ConfigError(problems, str(spec.path))
