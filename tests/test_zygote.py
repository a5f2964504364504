"""Cells that start warm (study/zygote.py): each cell is a fresh fork of a clean pre-imported parent, so nothing one
cell does reaches the next; a cell still dies with its worker; a zygote that died is replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from ript_ablate.cli import main
from test_study import alive, config_id_for, load_study, running_trial, study_env, trials, wait_for, write_spec  # noqa: F401

# A point-mass world that, built inside a forked cell, records what it finds of earlier cells, then leaves traces
# of its own: an environment variable, a monkeypatched module, a running thread, a module global. With `kill_zygote`
# it SIGKILLs its parent (the zygote) in the first cell that sees no marker file.
LEAKY_WORLD = '''
import json
import os
import signal
import threading
import time
from pathlib import Path

import ript_ablate.seeding
from ript_pointmass.world import PointMassWorld

BUILT = False


class LeakyWorld(PointMassWorld):
    inert_options = frozenset({"record", "kill_zygote"})

    def __init__(self, cfg):
        global BUILT
        options = dict(cfg.suite.options)
        record, kill = options.pop("record"), options.pop("kill_zygote", False)
        import dataclasses

        super().__init__(dataclasses.replace(cfg, suite=dataclasses.replace(cfg.suite, options=options)))
        if "RIPT_ABLATE_ZYGOTE" not in os.environ or BUILT:
            return  # only the first build inside a forked cell records and leaks
        BUILT = True
        with open(record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "env": os.environ.get("LEAKED_BY_A_CELL"),
                                "patched": ript_ablate.seeding.stream_seed.__name__,
                                "threads": sorted(t.name for t in threading.enumerate())}) + "\\n")
        os.environ["LEAKED_BY_A_CELL"] = "1"
        original = ript_ablate.seeding.stream_seed

        def patched(*args, **kwargs):
            return original(*args, **kwargs)

        ript_ablate.seeding.stream_seed = patched
        threading.Thread(target=time.sleep, args=(3600,), name="left-running", daemon=True).start()
        marker = Path(record).with_suffix(".killed")
        if kill and not marker.exists():
            marker.write_text(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGKILL)

    @classmethod
    def config_problems(cls, cfg):
        return []
'''


@pytest.fixture
def leaky(study_env, monkeypatch) -> Path:  # noqa: F811 - the study fixture, extended
    package = study_env / "plugins"
    package.mkdir()
    (package / "leakyworld.py").write_text(textwrap.dedent(LEAKY_WORLD))
    monkeypatch.setenv("PYTHONPATH", f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(package))
    return study_env


def use_leaky_world(study_env: Path, **options) -> Path:
    import yaml

    cfg = yaml.safe_load((study_env / "tiny.yaml").read_text())
    record = study_env / "record.jsonl"
    cfg["suite"].update(name="leakyworld:LeakyWorld", options={"record": str(record), **options})
    (study_env / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return record


def test_nothing_a_cell_leaves_reaches_the_next_and_a_killed_zygote_is_replaced(leaky):
    """Three cells on one worker; the first also SIGKILLs its zygote (the second and third then come from the
    zygote that replaced it). Every cell is a fresh process that sees nothing the earlier ones left, the cell under
    the killed zygote still finishes, and every cell completes exactly once."""
    record = use_leaky_world(leaky, kill_zygote=True)
    path = write_spec(leaky, factors={"algo.ppo_clip_high": [0.2, 0.25, 0.3]})
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) == 3 and len({s["pid"] for s in seen}) == 3, "one fresh process per cell"
    for cell in seen:
        assert cell["env"] is None and cell["patched"] == "stream_seed" and "left-running" not in cell["threads"]
    killed = int(record.with_suffix(".killed").read_text())
    assert not alive(killed)
    complete = Counter(t.user_attrs["cell_id"] for t in trials(path) if t.state.name == "COMPLETE")
    assert len(complete) == 3 and set(complete.values()) == {1}, "the cell under the killed zygote finished too"
    logs = "".join(p.read_text() for p in load_study(path).study_dir.glob("logs/worker-*.log"))
    assert f"the cell zygote (pid {killed}) exited" in logs and "starting another" in logs


def test_a_sigkilled_worker_leaves_no_cell_and_no_zygote_behind(study_env, monkeypatch):  # noqa: F811
    path = write_spec(study_env, factors={"algo.ppo_clip_high": [0.2]})
    (cell,) = [f"{config_id_for(v)}-s0" for v in load_study(path).grid_configs()]
    monkeypatch.setenv("RIPT_ABLATE_INJECT_FAULT", f"{cell}@1:stall")  # still running when the worker dies
    proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.cli", "study", "run", str(path), "--workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trial = wait_for(lambda: running_trial(path), 120, "a running cell")
        worker_pid, cell_pid = int(trial.user_attrs["pid"]), int(trial.user_attrs["cell_pid"])
        zygote_pid = int(Path(f"/proc/{cell_pid}/stat").read_text().rpartition(")")[2].split()[1])  # its parent
        assert zygote_pid != worker_pid and alive(zygote_pid)
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(lambda: not alive(cell_pid) and not alive(zygote_pid), 30, "the cell and the zygote to end")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
