"""Every MLflow tag name ript-ablate writes or reads, in one place: the runner, the cells, the trainer and the
report agree on them, and a user querying MLflow (a filter such as tags.`ript.cell_id` = 'cfg-...-s0') finds
them listed here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a cell's run under its study's run

STUDY = "ript.study"  # the study's name, on its parent run
ROLE = "ript.role"  # "study" on a study's parent run
ROLE_STUDY = "study"
CELL_ID = "ript.cell_id"  # cfg-<hash>-s<seed>: one configuration at one seed
CONFIG_ID = "ript.config_id"  # cfg-<hash>: the configuration, shared by its seeds
SEED = "ript.seed"
TRIAL_NUMBER = "ript.trial_number"  # the Optuna trial that is this attempt's lease
WORKER = "ript.worker"  # host:pid of the worker that ran the attempt
ATTEMPT = "ript.attempt"
RESUMED_FROM = "ript.resumed_from"  # the checkpoint an interrupted cell resumed from
STATUS = "ript.status"  # finished | diverged | pruned | failed | infrastructure | killed | lost | lease-lost, ...
REASON = "ript.reason"  # one readable line: why a run failed or was stopped
METRICS_LINES_SKIPPED = "ript.metrics_lines_skipped"  # a command's metrics-file lines that did not parse

FACTOR_PREFIX = "factor."  # factor.<config key> = the value this cell sets
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value
# ript.outcomes.<iteration>.<task> = "0110...": each evaluation state's success at a full evaluation, in the world's
# state order (a per-state paired gain in the report)
OUTCOMES_PREFIX = "ript.outcomes."


_TAGGABLE_TASK = re.compile(r"[\w\-. /]{1,200}")  # what MLflow accepts in a tag key


def outcome_state_tags(iteration: int, outcomes: dict[str, str]) -> dict[str, str]:
    """A tag per task; none at all when a task has more states than a tag holds or a name MLflow refuses in a key
    (the report then has no per-state pairing: it needs every task)."""
    if not all(bits and len(bits) <= MAX_TAG_CHARS and _TAGGABLE_TASK.fullmatch(task) for task, bits in outcomes.items()):
        return {}
    return {f"{OUTCOMES_PREFIX}{iteration}.{task}": bits for task, bits in outcomes.items()}


def factor_tags(values: Mapping[str, Any]) -> dict[str, str]:
    """{config key: value} -> {factor.<key>: str(value)}."""
    return {FACTOR_PREFIX + key: str(value) for key, value in values.items()}


def factor_key(tag: str) -> str:
    """factor.<key> -> <key>."""
    return tag.removeprefix(FACTOR_PREFIX)


def outcome_tags(status: str, reason: str | None = None) -> dict[str, str]:
    """The status tag, and the reason (cut to MLflow's limit) when there is one."""
    return {STATUS: status, **({REASON: str(reason)[:MAX_TAG_CHARS]} if reason else {})}
