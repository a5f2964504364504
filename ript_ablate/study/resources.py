"""Placing study workers on devices and sizing each trial so that workers do not oversubscribe the cores.

On CPU, N workers share the machine's cores: each trial gets cores // N torch threads and as many rollout
processes (in-process rollouts when that is a single core, which saves a process and its pipe). On CUDA, one
worker per GPU, each trial training on its GPU with the CPU cores split between the workers' rollouts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ript_ablate.errors import RiptAblateError


@dataclass(frozen=True)
class Slot:
    """Where one worker runs its trials."""

    index: int
    device: str  # cpu | cuda:N
    threads: int  # torch threads of the trial's main process
    rollout_workers: int  # suite.num_workers for the trial (0 = roll out in the trial's process)

    def overrides(self, configured_rollout_workers: int) -> dict[str, object]:
        """Config values that place a trial here; never more rollout processes than the config asked for."""
        workers = min(self.rollout_workers, configured_rollout_workers) if self.rollout_workers else 0
        return {"training.device": self.device, "suite.num_workers": workers}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_devices() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_slots(workers: int | None, devices: str = "auto", cores: int | None = None) -> list[Slot]:
    """Slots for `workers` workers on `devices` (auto | cpu | cuda | cuda:0,cuda:1)."""
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
        share = max(1, cores // n)
        return [Slot(i, "cpu", share, 0 if share == 1 else share) for i in range(n)]
    n = workers or len(names)
    if n > len(names):
        raise RiptAblateError(f"--workers {n} with {len(names)} GPU(s) ({', '.join(names)}): one trial per GPU, "
                              f"so at most {len(names)} workers")
    share = max(1, cores // n)
    return [Slot(i, names[i], share, max(1, share)) for i in range(n)]
