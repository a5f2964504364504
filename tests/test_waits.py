"""No silent waits: a process that waits for another's base build names the holder at once and keeps saying so;
an unreachable tracking server is reported before any demonstration or base is built."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import yaml

from ript_ablate.bc import base_dir
from ript_ablate.cache_lock import cache_lock
from ript_ablate.cli import main
from ript_ablate.config import config_from_dict
from ript_ablate.plugins import build_world

POINTMASS = {
    "suite": {"name": "pointmass", "tasks": ["reach"], "demos_per_task": 1, "contexts_per_task": 1,
              "eval_states_per_task": 1, "num_workers": 0},
    "policy": {"name": "mlp", "options": {"hidden": 8}},
    "sft": {"steps": 5, "scale_steps": 2, "batch_size": 16},
    "training": {"n_iterations": 1, "contexts_per_iteration": 1},
}


def test_a_second_process_names_the_holder_before_the_base_exists(tmp_path):
    data = {**POINTMASS, "sft": {**POINTMASS["sft"], "cache_dir": str(tmp_path / "cache")}}
    config = tmp_path / "pm.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = config_from_dict(data)
    out = base_dir(cfg, build_world(cfg))
    with cache_lock(out.with_name(out.name + ".lock"), f"the behaviour-cloning base {out.name}"):
        waiter = subprocess.Popen([sys.executable, "-m", "ript_ablate", "sft", str(config)], stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True, env={**os.environ, "COLUMNS": "300"})
        line = waiter.stderr.readline()  # its first word, while this process still holds the lock
        assert f"waiting for process {os.getpid()}" in line and "behaviour-cloning base" in line, line
        assert waiter.poll() is None and not (out / "model.safetensors").exists()
    rest = waiter.communicate(timeout=120)[1]
    assert waiter.returncode == 0 and "lock free after" in rest and (out / "model.safetensors").is_file()


def test_the_wait_heartbeats_until_the_lock_is_free(tmp_path, capsys):
    lock = tmp_path / "entry.lock"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with cache_lock(lock, "an entry"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    with cache_lock(lock, "an entry", heartbeat_s=0.3):
        pass
    thread.join()
    err = capsys.readouterr().err
    assert err.index("waiting for process") < err.index("still waiting") < err.index("lock free after")


def test_an_unreachable_tracking_server_is_named_before_any_base_is_built(tmp_path, capsys):
    data = {**POINTMASS, "sft": {**POINTMASS["sft"], "cache_dir": str(tmp_path / "cache")},
            "tracking": {"tracking_uri": "http://127.0.0.1:9"}}  # the discard port: nothing listens
    config = tmp_path / "pm.yaml"
    config.write_text(yaml.safe_dump(data))
    code = main(["train", str(config), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "unreachable" in err and "127.0.0.1:9" in err
    assert not (tmp_path / "cache").exists()  # no demonstration collected, no base built
