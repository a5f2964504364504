"""The gain benchmark's results file: one JSON line per measured (variant, seed), so a benchmark too long for one
sitting (LIBERO: hours a seed on a CPU) is continued later, or on another machine, and summarised over every seed.

A seed already in the file is not run again, but only if it was measured with the same resolved configuration:
results of different configurations are never pooled. Each line keeps every setting it ran with, so the check is
setting by setting and names what differs; a setting added to the code after the measurement is no difference
while it holds its default, since a new setting's default keeps the behaviour it was added to (that is how this
project adds switches), so a long measurement survives the code growing a switch. Lines written before settings
were kept carry only the configuration's digest, which must then match exactly. Each line also carries the
git commit it was measured at (when there is one) and the base it started from (the behaviour-cloning cache entry),
for the record, not as a condition: a fix elsewhere in the code does not void hours of measurement, but the summary
says when the seeds it pools started from different bases, and the note that reports the figures can say which code
produced them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from ript_ablate.cache_keys import digest
from ript_ablate.config import Config, flatten, to_yaml
from ript_ablate.errors import RiptAblateError

FIELDS = ("variant", "seed", "config_digest", "gain", "per_task", "history", "outcomes", "summary")


def config_digest(cfg: Config) -> str:
    """The resolved configuration's identity (every setting, the seed's included)."""
    return digest(to_yaml(cfg))


def settings(cfg: Config) -> dict[str, Any]:
    """Every setting by its dotted key, as the results file keeps it (JSON: tuples become lists)."""
    return json.loads(json.dumps(flatten(cfg)))


def settings_differences(recorded: dict[str, Any], current: Config) -> list[str]:
    """What differs between the settings a line was measured with and `current`, one phrase a setting; a setting
    the recorded run did not have yet is no difference while it holds its default."""
    now, defaults = settings(current), settings(Config())
    differences = [f"{key} was {recorded[key]!r}, now {now[key]!r}"
                   for key in recorded if key in now and recorded[key] != now[key]]
    differences += [f"{key} was {recorded[key]!r}, no longer a setting" for key in recorded if key not in now]
    differences += [f"{key} is {now[key]!r}, not the default {defaults[key]!r} that the measured code behaved as"
                    for key in now if key not in recorded and now[key] != defaults[key]]
    return differences


def code_commit(results: str | Path | None = None, checkout: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of the checkout this code runs from (with '+changes' when its tracked files differ), or None.
    The results file being written is no change: a committed one grows with every seed of the run."""
    git = {"cwd": checkout, "capture_output": True, "text": True, "check": True}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], **git)
        root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], **git).stdout.strip())
        written = Path(results).resolve() if results is not None else None
        spec = ["--", ":/", f":(exclude){written}"] if written and written.is_relative_to(root.resolve()) else []
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec], **git)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def load(path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(variant, seed) -> its record; a file that does not exist yet holds none."""
    path = Path(path)
    if not path.exists():
        return {}
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RiptAblateError(f"results file {path}, line {number}: not JSON ({exc.msg}); expected one result "
                                  "per line as this benchmark writes them") from None
        missing = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise RiptAblateError(f"results file {path}, line {number}: missing {', '.join(missing)}; expected "
                                  "one result per line as this benchmark writes them")
        records[(record["variant"], int(record["seed"]))] = record
    return records


def reusable(records: dict[tuple[str, int], dict[str, Any]], path: str | Path, variant: str, seed: int,
             cfg: Config) -> dict[str, Any] | None:
    """The recorded result of this variant and seed, if any; an error if it was measured with another config."""
    record = records.get((variant, seed))
    if record is None:
        return None
    if "config" in record:
        differences = settings_differences(record["config"], cfg)
        if differences:
            raise RiptAblateError(
                f"results file {path} holds seed {seed} of variant {variant!r} measured with another configuration "
                f"({'; '.join(differences)}): results of different configurations are not pooled; give another "
                "--results file, or delete that line to measure it again")
    elif record["config_digest"] != config_digest(cfg):
        raise RiptAblateError(
            f"results file {path} holds seed {seed} of variant {variant!r} measured with another configuration "
            f"(digest {record['config_digest']}, this one {config_digest(cfg)}; the line predates kept settings, "
            "so its digest must match exactly): results of different configurations are not pooled; give another "
            "--results file, or delete that line to measure it again")
    return record


def append(path: str | Path, record: dict[str, Any]) -> None:
    """Add one measured seed (written whole at once, so an interrupted run leaves every earlier line intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
