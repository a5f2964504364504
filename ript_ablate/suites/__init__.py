"""Task suites. Meta-World is the embedded default world; `build_suite` is the one entry point."""

from __future__ import annotations

import difflib

from ript_ablate.config import Config, SuiteConfig
from ript_ablate.suites.metaworld_tasks import PRESETS, all_task_names


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand presets ('quick', 'mt10') into task names, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        for task in PRESETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def task_problems(cfg: SuiteConfig) -> list[str]:
    """Config errors for unknown task names, each with the closest known name."""
    known = all_task_names()
    problems = []
    for name in cfg.tasks:
        if name in PRESETS or name in known:
            continue
        match = difflib.get_close_matches(name, list(known) + list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        problems.append(f"suite.tasks: unknown task {name!r}{hint}; presets are {', '.join(PRESETS)}")
    return problems


def build_suite(cfg: Config):  # -> MetaWorldSuite (imported lazily: Meta-World is heavy)
    from ript_ablate.suites.metaworld import MetaWorldSuite

    return MetaWorldSuite(cfg.suite, cfg.algo.max_episode_length)
