"""One trial on several processes: torch.distributed under torchrun (NCCL on CUDA, gloo on CPU).

`Ranks` is all the training loop asks of its peers: its rank and their number, sums of a few numbers (the global
dynamic-sampling count), the sum of gradients before each optimizer step, gathering small records (rollout tallies,
evaluation episodes) and rank 0's word broadcast to all (a stop: pruned, lease lost). A single process is the same
class with nothing to talk to, so the loop has no branch on the process count and one process behaves exactly as
it did before there were ranks.

Gradients are summed by an explicit all-reduce of one flat buffer, not DDP: an optimizer step spans several
backward passes (gradient accumulation, micro-batches) and both parameter groups must be clipped after the
reduction, which DDP's hooks would fire too early for (the original's hooks never fire either; it all-reduces by
hand). The trainer weighs every trajectory by 1 / (trajectories in this step on all ranks) and the reduction sums,
so N ranks with `gradient_accumulation_steps = g` take exactly the step one process takes with N x g.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

from ript_ablate.errors import RiptAblateError

T = TypeVar("T")

RANK_EXIT_ENV = "RIPT_ABLATE_INJECT_RANK_EXIT"  # "<rank>@<iteration>": that rank exits at that iteration (tests)


class RankFailure(RiptAblateError):
    """Another process of this run stopped or stopped answering: the run cannot go on (resume from a checkpoint)."""

    raised = False  # once one was raised, this process is winding down: the launcher's SIGTERM is not raised again

    def __init__(self, message: str):
        super().__init__(message)
        RankFailure.raised = True


class Ranks:
    """One process: rank 0 of 1, every collective the identity."""

    rank = 0
    size = 1
    local_rank = 0

    def __init__(self) -> None:
        self.comm_seconds = 0.0  # time spent moving gradients in reductions (the benchmark reports its share)
        self.wait_seconds = 0.0  # time spent at a step waiting for a slower rank to reach it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, total: int) -> int:
        """This rank's part of `total` items dealt round-robin."""
        return total // self.size + int(self.rank < total % self.size)

    def split(self, items: Sequence[T]) -> list[T]:
        """This rank's items, dealt round-robin (the original's split of tasks over ranks)."""
        return list(items[self.rank::self.size])

    def sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        return obj

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient and `extra` (a scalar) over the ranks, in place; returns the summed extra.
        A parameter without a gradient on every rank keeps none (so AdamW skips it, as one process would)."""
        return extra

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's weights on every rank (one start for all, whatever each rank's random initialisation)."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def close(self, finished: bool = True) -> None:
        """Nothing to tear down."""


class TorchRanks(Ranks):
    """The ranks of a torch.distributed process group (set up by torchrun's environment variables)."""

    def __init__(self, backend: str, timeout_s: float):
        super().__init__()
        import torch.distributed as dist

        self.dist = dist
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device = torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Collectives whose peer went away raise one `RankFailure` that says what was going on."""
        try:
            yield
        except RuntimeError as exc:  # DistBackendError / DistNetworkError and gloo's own errors derive from it
            detail = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise RankFailure(f"rank {self.rank}: {what} failed, another process of this run stopped or stopped "
                              f"answering ({detail[:160]})") from exc

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        with self._talking("summing counts"):
            self.dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.size
        with self._talking("gathering results"):
            self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        box = [obj]
        with self._talking("broadcasting from rank 0"):
            self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
        device = extra.device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
                for p in params]
        buffer = torch.cat([*flat, present, extra.reshape(1).float()])
        start = time.perf_counter()
        with self._talking("averaging gradients"):
            # a one-number reduction first: the time to here is waiting for the slowest rank's backward passes
            self.dist.all_reduce(torch.zeros(1, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ready = time.perf_counter()
            self.wait_seconds += ready - start
            self.dist.all_reduce(buffer)
        anywhere = buffer[-1 - len(params):-1].tolist()  # one read (and device sync): which have a gradient anywhere
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            if anywhere[i] > 0:
                grad = buffer[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            offset += n
        self.comm_seconds += time.perf_counter() - ready
        return buffer[-1]

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        with self._talking("sharing the start weights"), torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                self.dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        with self._talking("waiting for every rank"):
            self.dist.barrier()

    def close(self, finished: bool = True) -> None:
        """Tear the group down together: after a finished run every rank first meets the others, so none destroys
        its gloo connections while a peer is still inside the last collective (a rank that exits then can die in
        gloo's threads with SIGABRT, which torchrun reports as a failed run)."""
        if finished:
            with contextlib.suppress(Exception):
                self.dist.barrier()
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()


def leave(code: int) -> None:
    """End a finished rank's process now, output flushed, without the interpreter's teardown: there, gloo's
    background threads can still be destroyed while joinable ("terminate called without an active exception"),
    and the SIGABRT makes torchrun report a finished run as failed."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def torchrun_args(nproc: int, argv: Sequence[str], module: str = "ript_ablate") -> list[str]:
    """The torchrun command running `python -m MODULE ARGV` on `nproc` processes of this machine (a free port of
    its own, so several such runs share a machine)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_ranks(device: str = "auto", timeout_s: float = 1800.0) -> Ranks:
    """The process group torchrun's environment describes (NCCL when training on CUDA, gloo otherwise), or one
    process. `timeout_s` bounds any collective, so a rank that hangs ends the run instead of hanging it."""
    if not launched_by_torchrun():
        return Ranks()
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise RiptAblateError(f"training.device={device!r} but this torch has no CUDA device; use 'auto' or 'cpu'")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    ranks = TorchRanks("nccl" if cuda else "gloo", timeout_s)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return ranks


def _stopped_by_launcher(signum: int, frame: Any) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: end with a `RankFailure` (so the run says where
    to resume from) instead of dying silently; when one is already on its way (a broken collective came first), let
    the process finish saying so (torchrun kills it if that takes too long)."""
    if RankFailure.raised:
        return
    raise RankFailure("stopped by the launcher (SIGTERM): another process of this run failed, see the launcher's "
                      "report")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Each rank of a multi-process trial trains on its own GPU (LOCAL_RANK); on CPU they share the device name."""
    if ranks.size > 1 and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return device


def maybe_exit_for_test(ranks: Ranks, iteration: int) -> None:
    """RIPT_ABLATE_INJECT_RANK_EXIT="<rank>@<iteration>": that rank dies (exit 9, no clean-up) as that iteration
    starts, as a crashed or killed process would: a way to check that the others end the run and it resumes."""
    spec = os.environ.get(RANK_EXIT_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        rank, _, when = item.partition("@")
        if rank == str(ranks.rank) and when == str(iteration) and ranks.size > 1:
            os._exit(9)

