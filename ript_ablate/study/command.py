"""A study over your own trainer: the `command:` block of a study spec, checked before anything runs.

Each cell writes the user's base YAML with the cell's factor values and seed set at their dotted keys, then runs
the user's command on it. Metrics reach the cell's MLflow child run one of two ways: `mlflow` (the command gets
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID and MLFLOW_RUN_ID, so a plain `mlflow.start_run()` + `log_metric`
lands in the cell's run) or `jsonl` (the command appends `{"step": 3, "eval/success_rate": 0.4, ...}` lines to
a file, which the cell streams into its run).

    command:
      run: "{python} train.py --config_path {config} --output_dir {output_dir}"
      seed_key: training.seed            # where the seed goes in your YAML
      metrics: mlflow                    # mlflow | jsonl
      metrics_file: metrics.jsonl        # jsonl: relative to {output_dir}
      resume: {checkpoint: "ckpt_*.npz", args: "--resume_from {resume_from}"}
"""

from __future__ import annotations

import difflib
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# in `run`; `resume.args` may also use resume_from. {python} is the interpreter running the study (sys.executable),
# so a command runs in the study's environment without activating it; {nproc} is the spec's processes_per_cell (for
# a command that launches its own torchrun on the GPUs CUDA_VISIBLE_DEVICES lists).
PLACEHOLDERS = ("python", "config", "output_dir", "seed", "cell_id", "nproc")
METRIC_ROUTES = ("mlflow", "jsonl")
COMMAND_KEYS = ("run", "cwd", "seed_key", "metrics", "metrics_file", "step_key", "resume", "allow_new_keys", "env",
                "n_steps")
CONFIG_FILE = "config.yaml"  # the cell's YAML, in its output directory


@dataclass(frozen=True)
class CommandSpec:
    run: tuple[str, ...]  # the command line, split like a shell would (placeholders still in place)
    cwd: Path
    seed_key: str
    metrics: str = "mlflow"
    metrics_file: str = "metrics.jsonl"
    step_key: str = "step"
    resume_checkpoint: str | None = None  # a glob in the cell's output directory
    resume_args: tuple[str, ...] = ()
    allow_new_keys: bool = False
    env: dict[str, str] = field(default_factory=dict)
    n_steps: int | None = None  # the last step the command reports (the pruner never stops a run there)

    def to_json(self) -> dict[str, Any]:
        return {"run": list(self.run), "cwd": str(self.cwd), "seed_key": self.seed_key, "metrics": self.metrics,
                "metrics_file": self.metrics_file, "step_key": self.step_key,
                "resume_checkpoint": self.resume_checkpoint, "resume_args": list(self.resume_args),
                "env": dict(self.env), "n_steps": self.n_steps}


def dotted_keys(data: Any, prefix: str = "") -> list[str]:
    """Every leaf and section of a nested mapping as a dotted key: {'algo': {'lr': 1}} -> ['algo', 'algo.lr']."""
    keys: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            keys.append(name)
            keys.extend(dotted_keys(value, name + "."))
    return keys


def flatten_dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'algo': {'lr': 1}} -> {'algo.lr': 1}: the leaves only (a cell's YAML as MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with `key` (dotted, any depth) set to `value`; missing sections are created."""
    head, _, rest = key.partition(".")
    out = dict(data)
    if not rest:
        out[head] = value
    else:
        inner = out.get(head)
        out[head] = set_dotted(inner if isinstance(inner, dict) else {}, rest, value)
    return out


def with_dotted(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for key, value in values.items():
        data = set_dotted(data, key, value)
    return data


def unknown_key_problem(where: str, key: str, known: list[str], source: str) -> str:
    """'factors.algo.ppo_clip_hgih: not a key of trainer.yaml; did you mean algo.ppo_clip_high?'"""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = (f"; did you mean {close[0]}?" if close else f" (its keys: {', '.join(known[:12])}"
            + (", ..." if len(known) > 12 else "") + ")")
    return (f"{where}: {key} is not a key of {source}{hint} (set command.allow_new_keys: true to add keys the "
            "file lacks)")


def _split(text: Any, where: str, allowed: tuple[str, ...], problems: list[str]) -> tuple[str, ...]:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: got {text!r}, expected a command line (a non-empty string)")
        return ()
    try:
        parts = tuple(shlex.split(text))
    except ValueError as exc:
        problems.append(f"{where}: {text!r} does not parse as a command line ({exc})")
        return ()
    for part in parts:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(part) if name is not None]
        except ValueError as exc:
            problems.append(f"{where}: {part!r}: {exc} (write {{{{ and }}}} for literal braces)")
            continue
        for name in names:
            if name not in allowed:
                problems.append(f"{where}: unknown placeholder {{{name}}} (known: "
                                + ", ".join(f"{{{n}}}" for n in allowed) + ")")
    return parts


def parse_command(raw: Any, spec_dir: Path, problems: list[str]) -> CommandSpec | None:
    """The `command:` block, every problem appended (named by its key); None when it cannot be built."""
    if not isinstance(raw, dict):
        problems.append(f"command: got {raw!r}, expected a mapping with at least run and seed_key")
        return None
    for key in sorted(set(raw) - set(COMMAND_KEYS)):
        problems.append(f"command.{key}: unknown key (known: {', '.join(COMMAND_KEYS)})")
    run = _split(raw.get("run"), "command.run", PLACEHOLDERS, problems)
    seed_key = raw.get("seed_key")
    if not isinstance(seed_key, str) or not seed_key or seed_key.startswith(".") or seed_key.endswith("."):
        problems.append(f"command.seed_key: got {seed_key!r}, expected the dotted key of your YAML that holds the "
                        "seed, e.g. training.seed")
    metrics = raw.get("metrics", "mlflow")
    if metrics not in METRIC_ROUTES:
        problems.append(f"command.metrics: got {metrics!r}, expected {' | '.join(METRIC_ROUTES)}")
    for key in ("metrics_file", "step_key"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key]):
            problems.append(f"command.{key}: got {raw[key]!r}, expected a non-empty string")
    resume = raw.get("resume") or {}
    checkpoint, resume_args = None, ()
    if not isinstance(resume, dict) or set(resume) - {"checkpoint", "args"}:
        problems.append(f"command.resume: got {resume!r}, expected a mapping with checkpoint (a glob in the cell's "
                        "output directory) and args (appended when one is found, with {resume_from})")
    elif resume:
        checkpoint = resume.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            problems.append(f"command.resume.checkpoint: got {checkpoint!r}, expected a glob such as ckpt_*.npz")
        resume_args = _split(resume.get("args"), "command.resume.args", (*PLACEHOLDERS, "resume_from"), problems)
        if resume_args and not any("{resume_from}" in a for a in resume_args):
            problems.append("command.resume.args: must contain {resume_from} (the checkpoint found)")
    env = raw.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
        problems.append(f"command.env: got {env!r}, expected a mapping of variable names to values")
        env = {}
    n_steps = raw.get("n_steps")
    if n_steps is not None and (not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1):
        problems.append(f"command.n_steps: got {n_steps!r}, expected the last step your trainer reports (>= 1)")
    cwd = spec_dir / str(raw.get("cwd", "."))
    if not cwd.is_dir():
        problems.append(f"command.cwd: directory not found: {cwd} (relative to the spec's directory {spec_dir})")
    allow = raw.get("allow_new_keys", False)
    if not isinstance(allow, bool):
        problems.append(f"command.allow_new_keys: got {allow!r}, expected true or false")
    if not run or not isinstance(seed_key, str) or metrics not in METRIC_ROUTES:
        return None
    return CommandSpec(run=run, cwd=cwd.resolve(), seed_key=seed_key, metrics=metrics,
                       metrics_file=str(raw.get("metrics_file", "metrics.jsonl")),
                       step_key=str(raw.get("step_key", "step")), resume_checkpoint=checkpoint,
                       resume_args=resume_args, allow_new_keys=bool(allow),
                       env={k: str(v) for k, v in env.items()}, n_steps=n_steps)


def check_keys(command: CommandSpec, base: dict[str, Any], keys: dict[str, str], source: str) -> list[str]:
    """Every factor / search-space key (and the seed key) must name a key of the user's YAML, unless new keys are
    allowed: {where: key}."""
    if command.allow_new_keys:
        return []
    known = dotted_keys(base)
    return [unknown_key_problem(where, key, known, source) for where, key in keys.items() if key not in known]


def format_args(parts: tuple[str, ...] | list[str], values: dict[str, Any]) -> list[str]:
    return [part.format(**values) for part in parts]
