"""Placing study workers on devices and sizing each trial so that workers do not oversubscribe the cores.

On CPU, N workers share the machine's cores: each trial gets cores // N torch threads and as many rollout
processes (in-process rollouts when that is a single core, which saves a process and its pipe). On CUDA, one
worker per GPU, each trial training on its GPU with the CPU cores split between the workers' rollouts.

A study with `processes_per_cell: P` runs every cell as one P-process trial (torchrun): on CUDA each worker holds P
GPUs; on CPU the cores are divided between workers x P processes, and more processes than cores is refused (they
would only take turns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ript_ablate.errors import RiptAblateError


@dataclass(frozen=True)
class Slot:
    """Where one worker runs its trials."""

    index: int
    device: str  # cpu | cuda:N | cuda:N,cuda:M,... (one GPU per process of a multi-process cell)
    threads: int  # torch threads of each of the trial's processes
    rollout_workers: int  # suite.num_workers for each process (0 = roll out in that process)
    processes: int = 1  # processes of one trial (torchrun) when > 1

    def overrides(self, configured_rollout_workers: int) -> dict[str, object]:
        """Config values that place a trial here; never more rollout processes than the config asked for. A
        multi-GPU cell trains on "cuda": each rank on its own GPU of the ones CUDA_VISIBLE_DEVICES lists."""
        workers = min(self.rollout_workers, configured_rollout_workers) if self.rollout_workers else 0
        device = "cuda" if self.processes > 1 and self.device.startswith("cuda") else self.device
        return {"training.device": device, "suite.num_workers": workers}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_devices() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_slots(workers: int | None, devices: str = "auto", cores: int | None = None,
               processes: int = 1) -> list[Slot]:
    """Slots for `workers` workers on `devices` (auto | cpu | cuda | cuda:0,cuda:1), each running `processes`
    processes per cell."""
    cores = cores or available_cores()
    if devices == "auto":
        gpus = cuda_devices()
        devices = ",".join(gpus) if gpus else "cpu"
    if devices == "cuda":
        gpus = cuda_devices()
        if not gpus:
            raise RiptAblateError("--devices cuda: no CUDA device is visible")
        devices = ",".join(gpus)
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names or any(n != "cpu" and not n.startswith("cuda") for n in names):
        raise RiptAblateError(f"--devices {devices!r}: expected auto, cpu, cuda or a list like cuda:0,cuda:1")
    if names == ["cpu"]:
        n = workers or 1
        if n < 1:
            raise RiptAblateError(f"--workers {n}: expected at least 1")
        if processes > 1 and n * processes > cores:
            raise RiptAblateError(f"--workers {n} x processes_per_cell {processes} = {n * processes} processes on "
                                  f"{cores} cores: they would only take turns; use at most {max(1, cores // processes)}"
                                  f" worker(s) or fewer processes per cell")
        share = max(1, cores // (n * processes))
        return [Slot(i, "cpu", share, 0 if share == 1 else share, processes) for i in range(n)]
    n = workers or max(1, len(names) // processes)
    if n * processes > len(names):
        per = "one trial per GPU" if processes == 1 else f"processes_per_cell {processes}, one GPU per process"
        raise RiptAblateError(f"--workers {n} with {len(names)} GPU(s) ({', '.join(names)}): {per}, so at most "
                              f"{len(names) // processes} worker(s)")
    share = max(1, cores // (n * processes))
    return [Slot(i, ",".join(names[i * processes:(i + 1) * processes]), share, max(1, share), processes)
            for i in range(n)]
