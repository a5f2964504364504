"""Bring your own world and policy: name resolution and its errors, the package's layering, the example plug-in
(examples/pointmass) trained, studied and reported through the unchanged CLI, and replica == central rollouts."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ript_ablate import plugins
from ript_ablate.bc import ensure_base, load_base
from ript_ablate.cli import main
from ript_ablate.config import config_from_dict
from ript_ablate.engine import RolloutEngine
from ript_ablate.episodes import EpisodeJob
from ript_ablate.errors import ConfigError
from ript_ablate.report.collect import collect
from ript_ablate.ript.distributions import ActionDistribution
from ript_ablate.ript.trainer import Trainer
from ript_ablate.study.spec import load_study

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ript_ablate"
EXAMPLE = ROOT / "examples" / "pointmass"


def example_dict(tmp_path: Path, **training) -> dict:
    """The example's own config, made smaller: what CI trains in seconds."""
    data = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    data["sft"].update(cache_dir=str(tmp_path / "cache"), steps=150, scale_steps=30)
    data["suite"].update(contexts_per_task=6, eval_states_per_task=6)
    data["training"].update(n_iterations=2, contexts_per_iteration=4, eval_interval=1, save_interval=1,
                            output_dir=str(tmp_path / "runs"), **training)
    data["tracking"]["log_checkpoint"] = False
    return data


# --- resolution and its errors ------------------------------------------------------------------------------------
def test_unknown_names_and_broken_import_paths_are_config_errors_naming_the_key(tiny_dict):
    cases = {
        ("suite", "metawrld"): ["suite.name: unknown world 'metawrld' (did you mean 'metaworld'?)"],
        ("policy", "no_such_pkg.mod:make"): ["policy.name: cannot import module 'no_such_pkg.mod'"],
        ("policy", "ript_ablate.plugins:no_such_factory"): ["has no attribute 'no_such_factory'"],
        ("policy", "ript_ablate.plugins:build_polcy"): ["(did you mean 'ript_ablate.plugins:build_policy'?)"],
        ("suite", "ript_ablate.plugins:KINDS"): ["suite.name", "is not callable"],
    }
    for (section, name), expected in cases.items():
        data = copy.deepcopy(tiny_dict)
        data[section]["name"] = name
        with pytest.raises(ConfigError) as info:
            plugins.checked_config_from_dict(data, "cfg.yaml")
        (problem,) = info.value.problems
        assert all(part in problem for part in expected), problem


def test_the_world_checks_its_own_keys_before_any_compute(tiny_dict):
    tiny_dict["suite"]["tasks"] = ["reach-v9"]
    with pytest.raises(ConfigError, match=r"suite.tasks: unknown task 'reach-v9' \(did you mean 'reach-v3'\?\)"):
        plugins.checked_config_from_dict(tiny_dict)
    config_from_dict(tiny_dict)  # the floor alone does not know Meta-World's tasks


def test_registered_names_entry_points_and_import_paths_resolve(tiny_dict):
    from ript_pointmass.policy import make_mlp_policy
    from ript_pointmass.world import PointMassWorld

    assert plugins.resolve("world", "pointmass") is PointMassWorld  # entry point of the installed example
    assert plugins.resolve("policy", "ript_pointmass.policy:make_mlp_policy") is make_mlp_policy
    plugins.register_world("my-world", PointMassWorld)
    try:
        assert plugins.resolve("world", "my-world") is PointMassWorld and "my-world" in plugins.known_names("world")
    finally:
        del plugins._registered["world"]["my-world"]


def test_a_plug_in_checks_its_own_options(tmp_path):
    data = example_dict(tmp_path)
    data["policy"]["options"]["hiddn"] = 3
    data["suite"]["options"] = {"radius": 0.1}
    with pytest.raises(ConfigError) as info:
        plugins.checked_config_from_dict(data)
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["policy.options.hiddn", "suite.options.radius"]


def test_dotted_keys_reach_a_plug_ins_own_options(tmp_path, capsys):
    path = tmp_path / "pm.yaml"
    path.write_text(yaml.safe_dump(example_dict(tmp_path)))
    cfg = plugins.load_checked_config(path, ["policy.options.hidden=128", "suite.options.damping=0.3"])
    assert cfg.policy.options["hidden"] == 128 and cfg.suite.options["damping"] == 0.3
    kept = {k: v for k, v in example_dict(tmp_path)["policy"]["options"].items() if k != "hidden"}
    assert {k: cfg.policy.options[k] for k in kept} == kept  # merged into the file's options, not replacing them
    with pytest.raises(ConfigError) as info:  # the plug-in checks its own keys, with the closest one
        plugins.load_checked_config(path, ["policy.options.hiden=128"])
    assert info.value.problems == ["policy.options.hiden: unknown option (did you mean 'hidden'?); options are "
                                   "hidden, chunk_size, instruction_dim, scale_bias_init, seed, replicable"]
    capsys.readouterr()
    assert main(["validate", str(path), "--no-env", "--set", "policy.options.hidden=128"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["policy"] == {"name": "mlp", "options": {**example_dict(tmp_path)["policy"]["options"],
                                                            "hidden": 128}}  # not the built-in policy's keys
    assert main(["validate", str(path), "--set", "algo.options.x=1"]) == 1  # only suite and policy have options
    assert "plug-in's own setting, e.g. policy.options.hidden=128" in capsys.readouterr().err


def test_built_in_policy_settings_are_refused_for_a_plug_in_policy(tmp_path):
    data = example_dict(tmp_path)
    data["policy"]["chunk_size"] = 8  # the built-in policy's key: the plug-in reads policy.options.chunk_size
    with pytest.raises(ConfigError) as info:
        plugins.checked_config_from_dict(data)
    assert info.value.problems == ["policy.chunk_size: got 8, but it configures the built-in 'reference' policy "
                                   "only; settings of the policy 'mlp' go in policy.options"]


def test_the_console_script_imports_a_plug_in_from_the_working_directory(tmp_path):
    (tmp_path / "localworld.py").write_text("from ript_pointmass.world import PointMassWorld as World\n")
    data = example_dict(tmp_path)
    data["suite"]["name"] = "localworld:World"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(data))
    script = Path(sys.executable).with_name("ript-ablate")
    done = subprocess.run([str(script), "validate", "local.yaml"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr


# --- layering ---------------------------------------------------------------------------------------------------
def package_imports(path: Path) -> set[str]:
    """Every ript_ablate module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ript_ablate"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ript_ablate"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_config_is_the_floor_and_the_package_has_no_import_cycle():
    assert package_imports(PACKAGE / "config.py") == {"ript_ablate.errors", "ript_ablate.switch_table"}
    assert package_imports(PACKAGE / "switch_table.py") == set()  # the switch x family table: a floor of its own
    graph = {module_name(p): package_imports(p) for p in PACKAGE.rglob("*.py")}
    modules = set(graph)

    def resolved(target: str) -> str | None:  # 'from ript_ablate.x import y' may name a module or a package
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {t for t in map(resolved, deps) if t and t != m and not m.startswith(t + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_worlds_know_no_algorithm_and_nothing_below_imports_study_or_report():
    for path in (PACKAGE / "worlds").rglob("*.py"):
        assert not {m for m in package_imports(path) if m.startswith(("ript_ablate.ript", "ript_ablate.study"))}, path
    for path in (PACKAGE / "families").rglob("*.py"):  # below both the rollout engine and the algorithm
        assert not {m for m in package_imports(path) if m.startswith(("ript_ablate.ript", "ript_ablate.engine"))}, path
    for path in (PACKAGE / "engine").rglob("*.py"):
        assert not {m for m in package_imports(path) if m.startswith("ript_ablate.ript")}, path
    lower = [p for p in PACKAGE.rglob("*.py") if not p.relative_to(PACKAGE).parts[0] in ("study", "report", "bench")
             and p.name not in ("cli.py", "__main__.py")]
    for path in lower:
        assert not {m for m in package_imports(path) if m.startswith(("ript_ablate.study", "ript_ablate.report"))}, path


def test_mlflow_has_one_home():
    """Only `ript_ablate/tracking/` talks to MLflow; everything else goes through its functions and tag names."""
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "tracking":
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        assert not {n for n in names if n.split(".")[0] == "mlflow"}, f"{path} imports mlflow"
        text = path.read_text()
        assert '"ript.' not in text and '"factor.' not in text, f"{path} spells a tag name: use tracking.tags"


def test_the_example_uses_only_the_public_interfaces():
    allowed = {"ript_ablate.interfaces"}
    for path in (EXAMPLE / "ript_pointmass").glob("*.py"):
        assert package_imports(path) <= allowed, path


# --- the example plug-in end to end ---------------------------------------------------------------------------------
def test_example_plug_in_trains_with_the_unchanged_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path = tmp_path / "pointmass.yaml"
    path.write_text(yaml.safe_dump(example_dict(tmp_path)))
    assert main(["validate", str(path)]) == 0
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert all("eval/success_rate/reach-mirror" in h for h in history)
    updates = [h for h in history if "ppo/loss" in h]
    assert updates and all(h["ppo/optimizer_steps"] >= 1 for h in updates)
    final = tmp_path / "run" / "checkpoints" / "final"
    base = load_base(ensure_base(config_from_dict(example_dict(tmp_path))), config_from_dict(example_dict(tmp_path)),
                     plugins.build_world(config_from_dict(example_dict(tmp_path))))
    from safetensors.torch import load_file

    trained = load_file(final / "model.safetensors")
    assert not torch.equal(trained["backbone.0.weight"], base.state_dict()["backbone.0.weight"])  # full fine-tune
    assert set(load_file(final / "header.safetensors")) == {"scale_head.weight", "scale_head.bias"}


def test_example_plug_in_runs_a_four_cell_study_over_its_own_option_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pointmass.yaml").write_text(yaml.safe_dump(example_dict(tmp_path)))
    shipped = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    spec = {**shipped, "name": "pm" + uuid.uuid4().hex[:6], "config": "pointmass.yaml", "seeds": [0],
            "factors": {"algo.use_laplace_sampling": [True, False], "policy.options.hidden": [16, 24]},
            "output_dir": str(tmp_path / "studies")}
    spec.pop("set", None)
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["study", "run", str(spec_path), "--workers", "2"]) == 0
    assert main(["report", str(spec_path), "--reports", str(tmp_path / "reports"), "--no-upload"]) == 0
    report = (tmp_path / "reports" / spec["name"] / "report.md").read_text()
    assert "use_laplace_sampling" in report and "Partial study" not in report
    assert "policy.options.hidden=24" in report  # a plug-in's own setting, as a factor, named whole
    frame = collect(load_study(spec_path)).frame
    assert frame["cell_id"].nunique() == 4
    assert "eval/success_rate/reach-mirror" in set(frame["metric"])  # the world's own task names, tracked


# --- replica and central inference -----------------------------------------------------------------------------------
def with_layout(data: dict, inference: str, workers: int) -> dict:
    data = copy.deepcopy(data)
    data["suite"].update(inference=inference, num_workers=workers, envs_per_worker=4)
    return data


def test_replica_and_central_give_the_same_histories(tmp_path):
    """Two worker processes, the example plug-in, two iterations: the same rollouts (every success and count
    identical) and the same losses and weights up to float rounding. The central forward batches several worker
    batches together, and a Linear layer's result can depend on the batch size in the last bit (measured: mu within
    6e-8 of the replica's), so bitwise equality is not what the arithmetic allows here; see the Meta-World test
    below for a policy whose arithmetic does."""
    base = example_dict(tmp_path)
    ensure_base(config_from_dict(base))
    results = {}
    for inference in ("replica", "central"):
        cfg = config_from_dict(with_layout(base, inference, 2))
        results[inference] = Trainer(cfg).run(tmp_path / inference)
    replica, central = (r.history for r in results.values())
    assert len(replica) == len(central) == 3
    for a, b in zip(replica, central):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("eval/", "train/", "sampling/", "rloo/reward")) or key == "iteration":
                assert a[key] == b[key], key  # the episodes: successes and what was accepted
            elif not key.startswith("perf/"):
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
    weights = [checkpoints_of(r.final_checkpoint) for r in results.values()]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6)


def checkpoints_of(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def episodes_by_layout(cfg, world, policy, jobs, distribution, worker_counts, envs_per_worker=None) -> dict:
    """{(workers, mode): episodes} of the same jobs for each worker count and both inference modes."""
    runs = {}
    for workers in worker_counts:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.suite.num_workers = workers
        if envs_per_worker is not None:
            run_cfg.suite.envs_per_worker = envs_per_worker
        with RolloutEngine(run_cfg, world) as engine:
            for mode in ("replica", "central"):
                engine.set_policy(policy, mode)
                runs[(workers, mode)] = engine.run(jobs, distribution)
    return runs


def test_replica_and_central_episodes_are_identical_on_meta_world(tiny_cfg):
    """Same weights, same jobs: every length and success identical across the modes and process layouts, and every
    action bitwise where the forward passes see the same batches (within 1e-3 where they do not)."""
    from ript_ablate.policies.reference import build_policy

    world = plugins.build_world(tiny_cfg)
    policy = build_policy(tiny_cfg.policy, 39, 4).eval()
    states = world.eval_states("reach-v3")
    jobs = [EpisodeJob(states[i % len(states)], seed=10 + i) for i in range(7)]
    jobs += [EpisodeJob(states[0], seed=0, mode="mean")]
    distribution = ActionDistribution(scale_factor=5.0)
    runs = episodes_by_layout(tiny_cfg, world, policy, jobs, distribution, (0, 2), envs_per_worker=3)
    reference = runs[(0, "replica")]
    for key, episodes in runs.items():
        # the same batches in one forward each (in-process, or a replica per worker): bitwise; the central forward
        # over several workers' batches at once (which arrive together is a matter of timing): the last bit of a
        # matmul may move with the batch size, and the physics carries it on through the episode (3e-5 seen by step 9)
        bitwise = key != (2, "central")
        for a, b in zip(reference, episodes):
            assert (a.success, a.length, a.state_id) == (b.success, b.length, b.state_id), key
            if bitwise:
                np.testing.assert_array_equal(a.actions, b.actions, err_msg=str(key))
            else:
                np.testing.assert_allclose(a.actions, b.actions, rtol=0, atol=1e-3, err_msg=str(key))
    assert len(reference) == 8 and len({ep.state_id for ep in reference}) > 1


def test_auto_inference_is_central_for_cuda_or_a_policy_that_cannot_be_replicated():
    from ript_ablate.engine import resolve_inference

    class Large:
        replicable = False

    class Small:
        replicable = True

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_inference("auto", Small(), cpu) == "replica"
    assert resolve_inference("auto", Small(), cuda) == "central"
    assert resolve_inference("auto", Large(), cpu) == "central"
    assert resolve_inference("replica", Large(), cpu) == "replica"  # an explicit choice stands
