"""The quick suite's fingerprint: the exact hash of its demonstrations and a short fixed-thread behaviour-cloning
run, next to the cache keys they were made under, and a fixed-seed 2-iteration Laplace run's metrics. The committed quickstart example and the README's figures come
from these demonstrations and this base; `tests/test_fingerprint.py` fails when a change moves either, so a change
that moves them also regenerates what was committed (or, if the cache key stayed, gives the cache a new key).

    python -m ript_ablate.bench.fingerprint            # print it, and whether it equals the committed one
    python -m ript_ablate.bench.fingerprint --write    # after regenerating the committed example: record it
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
QUICK_CONFIG = REPO / "configs" / "metaworld_quick.yaml"
COMMITTED = REPO / "tests" / "data" / "quick_suite_fingerprint.json"
BC_STEPS, SCALE_STEPS = 20, 10  # a few steps: enough for any change of data, model or BC code to show


def demonstrations_sha256(demos: Any, tasks: list[str]) -> str:
    """Every byte of every demonstration: observations, actions, lengths and initial states, in task order."""
    digest = hashlib.sha256()
    for task in tasks:
        for state, episode in zip(demos.states[task], demos.episodes[task]):
            digest.update(np.ascontiguousarray(np.asarray(state.data, dtype=np.float64)).tobytes())
            for key in sorted(episode.obs):
                digest.update(key.encode() + np.ascontiguousarray(episode.obs[key]).tobytes())
            digest.update(np.ascontiguousarray(episode.actions).tobytes())
    return digest.hexdigest()


def bc_numbers(cfg: Any, world: Any, demos: Any) -> list[float]:
    """Losses and per-tensor absolute sums after a short behaviour cloning on one thread (bitwise reproducible on
    one machine; compared with a relative tolerance of 1e-6 elsewhere)."""
    from ript_ablate.bc import _bc_data, fit_scale_head, train_bc
    from ript_ablate.plugins import build_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.sft.seed)
        policy = build_policy(cfg, world)
        data = _bc_data(policy, world, demos)
        policy.observe_demonstrations(data.obs)
        l1 = train_bc(policy, data, cfg, torch.device("cpu"))
        nll = fit_scale_head(policy, data, cfg, torch.device("cpu"))
        sums = [float(t.double().abs().sum()) for t in policy.state_dict().values() if t.is_floating_point()]
    finally:
        torch.set_num_threads(threads)
    return [float(f"{v:.9g}") for v in (l1, nll, *sums)]


# A short fixed-seed Laplace run (RIPT's default family): what a change to the policy interface, the rollout engine,
# the distributions or the update must leave unchanged. Small enough for CI, with mixed-reward groups so that the
# update runs (the quick suite's 20-step fingerprint base would solve nothing).
RUN_CONFIG: dict[str, Any] = {
    "suite": {"tasks": ["reach-v3"], "demos_per_task": 2, "contexts_per_task": 4, "eval_states_per_task": 4,
              "num_workers": 0, "envs_per_worker": 8},
    "policy": {"d_model": 32, "n_layers": 1, "n_heads": 2, "chunk_size": 4},
    "sft": {"steps": 300, "scale_steps": 50, "batch_size": 64},
    "algo": {"max_episode_length": 60, "rloo_batch_size": 4, "scale_factor": 5.0, "lr": 1e-3, "header_lr": 1e-3,
             "max_step_batch_size": 64, "gradient_accumulation_steps": 3, "lora_rank": 4},
    "training": {"n_iterations": 2, "contexts_per_iteration": 2, "eval_interval": 1, "save_interval": 10},
    "tracking": {"enabled": False},
}


def laplace_run_numbers() -> list[dict[str, float]]:
    """Every logged metric but timings of a 2-iteration Laplace run from its own base, on one thread."""
    from ript_ablate.bc import ensure_base
    from ript_ablate.plugins import checked_config_from_dict
    from ript_ablate.ript.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = {**RUN_CONFIG, "sft": {**RUN_CONFIG["sft"], "cache_dir": f"{tmp}/cache"}}
            cfg = checked_config_from_dict(data, "fingerprint run")
            ensure_base(cfg)
            history = Trainer(cfg).run(Path(tmp) / "run").history
    finally:
        torch.set_num_threads(threads)
    return [{k: float(f"{v:.9g}") for k, v in h.items() if not k.startswith("perf/")} for h in history]


def quick_suite_fingerprint(config: Path = QUICK_CONFIG) -> dict[str, Any]:
    from ript_ablate.bc import base_key, demo_key
    from ript_ablate.engine import RolloutEngine
    from ript_ablate.plugins import build_world, load_checked_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_checked_config(config, [f"sft.cache_dir={tmp}", "suite.num_workers=0",
                                           f"sft.steps={BC_STEPS}", f"sft.scale_steps={SCALE_STEPS}"])
        world = build_world(cfg)
        with RolloutEngine(cfg, world) as engine:
            demos = world.demonstrations(engine, None)
        full = load_checked_config(config, [f"sft.cache_dir={tmp}"])
        return {"machine": machine_signature(), "config": str(config.relative_to(REPO)), "demo_key": demo_key(world),
                "demo_sha256": demonstrations_sha256(demos, world.tasks), "base_key": base_key(full, build_world(full)),
                "bc_steps": [BC_STEPS, SCALE_STEPS], "bc": bc_numbers(cfg, world, demos),
                "laplace_run": laplace_run_numbers()}


def machine_signature() -> str:
    """What float results depend on beyond the code: the CPU's vendor and vector capability, and torch. Two CPUs
    run different kernels (AVX2 vs AVX-512 reductions), so the same code gives results that differ in the 5th digit."""
    vendor = "unknown-cpu"
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: an unknown kind, compared with the tolerance
        vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("vendor_id")), vendor)
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()} torch {torch.__version__}"


def recorded(machine: str | None = None) -> tuple[dict[str, Any], bool]:
    """(the committed fingerprint to compare with, whether it was recorded on this kind of machine): this machine's
    own when there is one (compared to 1e-6), else the first (compared to the cross-machine tolerance)."""
    data = json.loads(COMMITTED.read_text())
    entries = data["fingerprints"] if "fingerprints" in data else [data]
    machine = machine or machine_signature()
    for entry in entries:
        if entry.get("machine") == machine:
            return entry, True
    return entries[0], False


def record(now: dict[str, Any]) -> None:
    """Add (or replace) this machine's fingerprint, keeping the other machines'."""
    entries: list[dict[str, Any]] = []
    if COMMITTED.is_file():
        data = json.loads(COMMITTED.read_text())
        entries = [e for e in (data["fingerprints"] if "fingerprints" in data else [data])
                   if e.get("machine") != now["machine"]]
    COMMITTED.write_text(json.dumps({"fingerprints": [*entries, now]}, indent=1) + "\n")


CROSS_MACHINE_RTOL = 2e-2  # another CPU's kernels: BC sums differ by ~2e-5, a 2-iteration run's grad norms by ~1e-3


def differences(now: dict[str, Any], committed: dict[str, Any], same_machine: bool = True) -> list[str]:
    """What moved, each with what it means: content that changed under the same cache key, or content that changed
    (under a new key) after the committed figures were made from the old one. Compared to 1e-6 on the machine kind
    that recorded them, to `CROSS_MACHINE_RTOL` on another (where a changed episode still moves a success rate)."""
    rtol = 1e-6 if same_machine else CROSS_MACHINE_RTOL
    problems = []
    if now["demo_sha256"] != committed["demo_sha256"]:
        if now["demo_key"] == committed["demo_key"]:
            problems.append(f"the quick suite's demonstrations changed but their cache key did not "
                            f"({now['demo_key']}): a user's cache would silently keep the old ones; make what "
                            "changed part of the key (ript_ablate/cache_keys.py)")
        else:
            problems.append("the quick suite's demonstrations changed (new key "
                            f"{now['demo_key']}, was {committed['demo_key']})")
    if not np.allclose(now["bc"], committed["bc"], rtol=rtol, atol=0.0):
        if now["base_key"] == committed["base_key"]:
            problems.append(f"the quick suite's behaviour cloning changed but the base's cache key did not "
                            f"({now['base_key']}): a user's cache would silently keep the old base; make what "
                            "changed part of the key (ript_ablate/cache_keys.py)")
        else:
            problems.append(f"the quick suite's behaviour cloning changed (new base key {now['base_key']}, "
                            f"was {committed['base_key']})")
    if not _same_history(now.get("laplace_run", []), committed.get("laplace_run", []), rtol):
        problems.append("the fixed-seed 2-iteration Laplace run moved (RUN_CONFIG in ript_ablate/bench/fingerprint.py):"
                        " a change to the policy interface, the engine, the distributions or the update changed what "
                        "RIPT computes for the default family")
    if problems:
        problems.append("the committed quickstart example and the README's figures came from the old ones: "
                        "regenerate them (`make quickstart`, then copy reports/quickstart to reports/examples), "
                        "then record the new fingerprint with `python -m ript_ablate.bench.fingerprint --write`")
    return problems


def _same_history(now: list[dict[str, float]], committed: list[dict[str, float]], rtol: float = 1e-6) -> bool:
    """Every committed number still there and equal (a metric added since is not a moved number)."""
    if len(now) != len(committed) or any(not b.keys() <= a.keys() for a, b in zip(now, committed)):
        return False
    return all(np.isclose(a[k], b[k], rtol=rtol, atol=1e-9, equal_nan=True) for a, b in zip(now, committed) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"record it in {COMMITTED.relative_to(REPO)}")
    args = parser.parse_args()
    now = quick_suite_fingerprint()
    print(json.dumps(now, indent=1))
    if args.write:
        record(now)
        print(f"written to {COMMITTED} for {now['machine']}")
    elif COMMITTED.is_file():
        committed, same = recorded(now["machine"])
        moved = differences(now, committed, same)
        where = "this machine's" if same else f"another machine's ({committed.get('machine')}; cross-machine tolerance)"
        print("\n".join(moved) if moved else f"equal to {where} committed fingerprint ({COMMITTED.relative_to(REPO)})")


if __name__ == "__main__":
    from ript_ablate.bench import run_main

    run_main(main)
