"""One trial on several processes, on CPU with gloo: N ranks with gradient_accumulation_steps g take exactly the
step one process takes with N x g; a 2-rank run of the example world trains, tracks one MLflow run, survives a
killed rank with a resumable checkpoint and resumes to the same numbers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from ript_ablate.config import AlgoConfig
from ript_ablate.distributed import RANK_EXIT_ENV, Ranks, TorchRanks
from ript_ablate.ript.update import PPOUpdater
from tests.test_fidelity import WIDE, small_policy, with_ratios
from tests.test_plugins import example_dict

ROOT = Path(__file__).resolve().parents[1]
ALGO = {"lora_rank": 2, "log_scale_clip": WIDE, "fix_scale_head": False, "num_ppo_epochs": 1, "lr": 1e-2,
        "header_lr": 1e-2}


def trajectories(algo: AlgoConfig, n: int) -> list:
    """n trajectories, the same in every process: ratios inside and outside the clip band, both signs of A."""
    torch.manual_seed(0)
    policy = small_policy(chunk=2)
    patterns = [([[1.0, 1.05]], -1.0), ([[1.3, 0.95]], 1.0), ([[0.7, 1.0]], -1.0), ([[1.02, 1.25]], 1.0)]
    return [with_ratios(policy, algo, patterns[i % 4][0], patterns[i % 4][1] * (1 + i / n), seed=i)
            for i in range(n)]


def step(ranks: Ranks, algo: AlgoConfig, mine: list) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    policy = small_policy(chunk=2)  # the same start (seeded) in every process
    updater = PPOUpdater(policy, algo, torch.device("cpu"), "fp32", ranks)
    metrics = updater.update(mine, np.random.default_rng(7), 3)["metrics"]
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}, metrics


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = TorchRanks("gloo", timeout_s=60)
    try:
        results = {}
        # even: each rank 2 trajectories, GA 2 -> one step of 4 trajectories
        algo = AlgoConfig(**ALGO, gradient_accumulation_steps=2)
        trajs = trajectories(algo, 4)
        results["even"] = step(ranks, algo, trajs[2 * rank:2 * rank + 2])
        # uneven: rank 0 has 3 trajectories, rank 1 none; GA 2 -> two steps (2 then 1), rank 1 steps with them
        algo = AlgoConfig(**{**ALGO, "num_ppo_epochs": 2}, gradient_accumulation_steps=2)
        results["uneven"] = step(ranks, algo, trajectories(algo, 3) if rank == 0 else [])
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        ranks.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_ga_g_take_the_step_of_one_process_with_2g(tmp_path):
    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = Ranks()
    algo = AlgoConfig(**ALGO, gradient_accumulation_steps=4)
    expected = {"even": step(one, algo, trajectories(algo, 4))}
    algo = AlgoConfig(**{**ALGO, "num_ppo_epochs": 2}, gradient_accumulation_steps=2)
    expected["uneven"] = step(one, algo, trajectories(algo, 3))  # what rank 0 alone would do with its 3
    torch.manual_seed(0)
    start = small_policy(chunk=2).state_dict()
    for case, (weights, metrics) in expected.items():
        assert any(not torch.equal(weights[k], start[k]) for k in weights), case  # the step moved the weights
        for r in range(2):
            got_weights, got_metrics = ranks[r][case]
            for key in weights:
                torch.testing.assert_close(got_weights[key], weights[key], rtol=1e-5, atol=1e-7, msg=key)
                assert torch.equal(got_weights[key], ranks[0][case][0][key]), key  # the ranks agree bitwise
            for key in ("ppo/loss", "ppo/clip_fraction_low", "ppo/clip_fraction_high", "ppo/ratio_mean",
                        "ppo/optimizer_steps", "grad_norm/backbone", "grad_norm/header"):
                assert got_metrics[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), (case, key)
    assert expected["even"][1]["ppo/clip_fraction"] > 0 and expected["uneven"][1]["ppo/optimizer_steps"] == 4


def train(config: Path, out: Path, *extra: str, env: dict | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "ript_ablate", "train", str(config), "--nproc", "2", "--output",
                           str(out), *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})


def settled(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]


def test_a_two_rank_run_tracks_one_run_survives_a_killed_rank_and_resumes_to_the_same_numbers(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = example_dict(tmp_path)
    data["training"]["n_iterations"] = 3
    data["tracking"].update(tracking_uri=uri, experiment="two-ranks")
    config = tmp_path / "pointmass.yaml"
    config.write_text(yaml.safe_dump(data))

    whole = train(config, tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "(2 processes)" in whole.stderr
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1, 2, 3]
    assert history[1]["sampling/accepted_groups"] >= 1
    assert {"perf/allreduce_s", "perf/rank_wait_s", "perf/rank_rollout_imbalance"} <= set(history[1])
    assert {"train/success_rate/reach", "train/success_rate/reach-mirror"} <= set(history[1])  # both ranks' tasks

    killed = train(config, tmp_path / "killed", env={RANK_EXIT_ENV: "1@3"}, timeout=120)  # ends; never hangs
    assert killed.returncode == 1
    checkpoint = tmp_path / "killed" / "checkpoints" / "iter_0002"
    assert f"resume from its last checkpoint with --set algo.lora_adaptor_ckpt={checkpoint}" in killed.stderr
    # rank 0's own word (from the broken collective or from the launcher's SIGTERM, whichever comes first)
    assert "another process of this run" in killed.stderr and f"the last checkpoint is {checkpoint}" in killed.stderr
    resumed = train(config, tmp_path / "resumed", f"--set=algo.lora_adaptor_ckpt={checkpoint}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    again = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["iteration"] for h in again] == [2, 3]
    assert settled(again)[1] == settled(history)[3]  # the resumed ranks continue exactly as the whole run did
    assert again[0]["eval/success_rate"] == history[2]["eval/success_rate"]  # from the same weights

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("two-ranks").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]  # one run per launch: rank 0's
    assert all(r.data.tags.get("processes") == "2" for r in runs)


@pytest.mark.usefixtures("all_cores")  # 2-process cells: the runner refuses more processes than cores
def test_a_study_runs_two_process_cells_each_once_and_a_killed_rank_resumes_the_cell(tmp_path, monkeypatch):
    from ript_ablate.cli import main
    from ript_ablate.study.spec import config_id_for, load_study
    from tests.test_study import child_runs, trials

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    data = example_dict(tmp_path)
    data["training"]["n_iterations"] = 3
    (tmp_path / "pointmass.yaml").write_text(yaml.safe_dump(data))
    spec = {"name": "ranks", "config": "pointmass.yaml", "mode": "grid", "processes_per_cell": 2,
            "factors": {"algo.use_laplace_sampling": [True, False]}, "seeds": [0], "retries": 1,
            "heartbeat_s": 2, "output_dir": str(tmp_path / "studies")}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    killed = f"{config_id_for(load_study(path).grid_configs()[0])}-s0"
    monkeypatch.setenv("RIPT_ABLATE_INJECT_FAULT", f"{killed}@1:rank-exit")
    assert main(["study", "run", str(path), "--workers", "1"]) == 0
    by_cell: dict[str, list] = {}
    for t in trials(path):
        by_cell.setdefault(t.user_attrs["cell_id"], []).append(t)
    assert len(by_cell) == 2
    assert [t.state.name for t in by_cell[killed]] == ["FAIL", "COMPLETE"]
    assert by_cell[killed][1].user_attrs["resumed_from"].endswith("iter_0001")  # the rank died as iteration 2 began
    other = next(c for c in by_cell if c != killed)
    assert [t.state.name for t in by_cell[other]] == ["COMPLETE"]
    _, children = child_runs(path)
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED"]  # rank 0's runs only
    assert all(r.data.tags.get("processes") == "2" for r in children)
    history = json.loads((tmp_path / "studies" / "ranks" / "cells" / killed / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1, 2, 3]  # the whole curve, once each


def test_multi_process_cells_divide_cores_and_gpus_and_refuse_oversubscription(monkeypatch):
    from ript_ablate.errors import RiptAblateError
    from ript_ablate.study.command_cell import cuda_visible_devices
    from ript_ablate.study.resources import plan_slots

    slots = plan_slots(2, "cpu", cores=8, processes=2)
    assert [(s.device, s.threads, s.rollout_workers, s.processes) for s in slots] == [("cpu", 2, 2, 2)] * 2
    assert plan_slots(None, "cpu", cores=2, processes=2)[0].threads == 1  # one worker, one core per rank
    with pytest.raises(RiptAblateError, match="4 processes on 2 cores"):
        plan_slots(2, "cpu", cores=2, processes=2)
    gpus = plan_slots(None, "cuda:0,cuda:1,cuda:2,cuda:3", cores=16, processes=2)
    assert [s.device for s in gpus] == ["cuda:0,cuda:1", "cuda:2,cuda:3"] and gpus[0].threads == 4
    assert gpus[1].overrides(4)["training.device"] == "cuda"  # each rank takes its GPU of CUDA_VISIBLE_DEVICES
    assert cuda_visible_devices(gpus[1].device) == "2,3" and cuda_visible_devices("cuda:1") == "1"
    with pytest.raises(RiptAblateError, match="at most 2 worker"):
        plan_slots(3, "cuda:0,cuda:1,cuda:2,cuda:3", cores=16, processes=2)


def test_shares_and_splits_deal_round_robin():
    shares = []
    for rank in range(3):
        ranks = Ranks()
        ranks.rank, ranks.size = rank, 3
        shares.append((ranks.share(8), ranks.split(list(range(7)))))
    assert shares == [(3, [0, 3, 6]), (3, [1, 4]), (2, [2, 5])]  # the quota adds up to 8; every task dealt once
    assert Ranks().share(5) == 5 and Ranks().split([1, 2]) == [1, 2]


def test_the_cuda_branches_without_a_gpu(monkeypatch):
    from ript_ablate.distributed import init_ranks, rank_device
    from ript_ablate.errors import RiptAblateError

    ranks = Ranks()
    ranks.size, ranks.local_rank = 4, 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(torch.device("cuda"), ranks) == torch.device("cuda", 1)  # LOCAL_RANK over the visible GPUs
    assert rank_device(torch.device("cpu"), ranks) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RiptAblateError, match="training.device='cuda' but this torch has no CUDA device"):
        init_ranks("cuda")


def test_processes_per_cell_is_checked_with_the_study(tmp_path):
    from ript_ablate.errors import ConfigError
    from ript_ablate.study.spec import load_study

    (tmp_path / "pointmass.yaml").write_text(yaml.safe_dump(example_dict(tmp_path)))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "config": "pointmass.yaml", "factors": {"algo.lr": [1e-3]},
                                    "seeds": [0], "processes_per_cell": 0}))
    with pytest.raises(ConfigError, match=r"processes_per_cell: got 0, expected an integer in 1\.\.64"):
        load_study(path)


@pytest.mark.parametrize("split", ["tasks", "contexts"])
def test_rank_split_deals_tasks_or_every_tasks_contexts(tmp_path, split):
    from ript_ablate.bc import ensure_base
    from ript_ablate.config import config_from_dict
    from ript_ablate.ript.trainer import Trainer

    cfg = config_from_dict({
        "suite": {"name": "pointmass", "tasks": ["all"], "demos_per_task": 1, "contexts_per_task": 5,
                  "eval_states_per_task": 2, "num_workers": 0},  # each rank evaluates one state of each task
        "policy": {"name": "mlp", "options": {"hidden": 8}},
        "sft": {"steps": 5, "scale_steps": 2, "batch_size": 16, "cache_dir": str(tmp_path / "cache")},
        "training": {"n_iterations": 1, "contexts_per_iteration": 2, "rank_split": split},
    })
    ensure_base(cfg)
    dealt = []
    for rank in range(2):
        ranks = Ranks()
        ranks.rank, ranks.size = rank, 2
        with Trainer(cfg, ranks=ranks).set_up(tmp_path / f"run-{rank}") as run:
            dealt.append((run.tasks, [s.state_id for s in run.contexts]))
    every = {f"{t}/context/{i}" for t in ("reach", "reach-mirror") for i in range(5)}
    assert set(dealt[0][1]) | set(dealt[1][1]) >= every and not set(dealt[0][1]) & set(dealt[1][1])
    tasks_of = [{i.split("/")[0] for i in ids} for _, ids in dealt]
    if split == "tasks":  # the original: whole tasks, round-robin
        assert [t for t, _ in dealt] == [["reach"], ["reach-mirror"]] and tasks_of == [{"reach"}, {"reach-mirror"}]
    else:  # every rank carries every task, each task's contexts dealt evenly
        assert tasks_of == [{"reach", "reach-mirror"}] * 2
        assert [sum(i.startswith("reach/") for i in ids) for _, ids in dealt] == [3, 3]  # 1 demo + 5 contexts
