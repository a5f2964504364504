"""Cells that start warm: a per-worker zygote forks one fresh child per cell from a clean, pre-imported parent.

A cell in a new interpreter spends seconds importing torch (and torch._dynamo, which the first optimizer pulls in),
MLflow and its SQL store, and the world's and the policy's packages before it trains. The zygote imports them once
(`python -m ript_ablate.study.zygote WORLD POLICY`), then waits; for each cell the worker sends one line of JSON and
the zygote forks. The child is a fresh process in every way a cell can tell: its own session and process group
(timeouts, lease loss, signals and pruning still stop the whole group), its own environment, working directory and
log, nothing of earlier cells (each cell is a new fork of the same clean parent, never a process reused). A
long-lived process running cell after cell would leak state from one into the next; a fork does not.

Safe to fork, by construction: the zygote runs no torch operation, creates no MLflow, SQLAlchemy or PostgreSQL
client, starts no Python thread and holds no lock file (the base cache and the study store use `flock`, whose
locks an inherited descriptor would keep), and never initialises CUDA. Native pools that libraries start on import
(OpenBLAS, jemalloc) handle fork themselves, as they do under multiprocessing.

The zygote ends when the worker does: its requests come on its standard input, and end-of-file (a worker that
exits or is SIGKILLed) ends it. A cell watches the worker's pid and takes its process group along when the worker
is gone (`cell.exit_with_parent`). A worker finds a dead zygote before the next cell and starts another.

`study run` goes one step further: its workers are forked by a zygote too, started while the bases are prepared;
each worker, still clean, first forks its own cell zygote from itself (`Zygote.fork_here`), so neither a worker nor
its cells import anything. A worker started on its own (`study worker` on another machine) starts its cell zygote
as a new interpreter at its first cell.

Protocol (one JSON object per line): request {"job": path, "env": {...}, "cwd": dir, "log": path} for a cell, or
{"kind": "worker", "argv": [...], ...} for a worker (which stays in its starter's process group); replies
{"pid": n} once forked, then {"exit": n, "code": c} when that child ends (c negative: killed by signal -c).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

# what a cell of your own trainer needs (its command runs in its own interpreter), then what a built-in cell adds
PRELOAD_LIGHT = ("numpy", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "optuna",
                 "ript_ablate.study.cell", "ript_ablate.study.command_cell", "ript_ablate.study.objective",
                 "ript_ablate.tracking.tracker", "ript_ablate.study.runner", "ript_ablate.cli")
PRELOAD = (*PRELOAD_LIGHT, "torch", "torch._dynamo", "ript_ablate.ript.trainer", "ript_ablate.bc", "ript_ablate.engine")
# What a built-in policy imports only when its cell starts RL: the reference policy's LoRA adapters come from peft,
# 2-3 s of imports that every cell paid on its own before.
POLICY_PRELOAD = {"reference": ("peft",)}
ZYGOTE_ENV = "RIPT_ABLATE_ZYGOTE"  # set in a cell forked by a zygote: its parent is not its worker
COLD_CELLS_ENV = "RIPT_ABLATE_COLD_CELLS"  # "1": every cell a new interpreter, as before (for comparison)
REAP_S = 0.05


def preload(world: str | None, policy: str | None) -> None:
    """Import what cells need, without running any of it (no torch op, no client, no thread). Without a world and
    a policy (a study of your own trainer) the light set: the cell only watches your command."""
    for module in (*PRELOAD, *POLICY_PRELOAD.get(policy or "", ())) if world or policy else PRELOAD_LIGHT:
        importlib.import_module(module)
    from ript_ablate.plugins import resolve

    for kind, name in (("world", world), ("policy", policy)):
        if name:
            with contextlib.suppress(Exception):  # a broken plug-in fails in its cell, with the cell's message
                resolve(kind, name)


def _become(request: dict[str, Any], replies: IO[str], new_session: bool) -> None:
    """In a forked child: a fresh process with the request's environment, working directory and log."""
    with contextlib.suppress(OSError):
        os.close(replies.fileno())  # only the zygote answers (and its reader sees EOF when the zygote dies)
    if new_session:
        os.setsid()  # its own session and process group, as `start_new_session` gave a spawned cell
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])


def _exit_code(run: Any) -> int:
    try:
        return int(run() or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a crash is an exit code and a traceback in the log
        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()


def _run_cell(request: dict[str, Any]) -> int:
    os.environ[ZYGOTE_ENV] = "1"
    sys.argv = ["ript_ablate.study.cell", request["job"]]
    from ript_ablate.study import cell

    return _exit_code(lambda: cell.main([request["job"]]))


def _run_worker(request: dict[str, Any]) -> int:
    """A study worker forked by the runner's zygote: it first forks its own cell zygote (still clean: nothing has
    run here yet), then works as `ript-ablate study worker` would."""
    global _attached
    _attached = Zygote.fork_here(request.get("world"), request.get("policy"))
    sys.argv = ["ript-ablate", *request["argv"]]
    cli = importlib.import_module("ript_ablate.cli")  # by name: the command line sits above the study package
    return _exit_code(lambda: cli.main(request["argv"]))


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Fork a child per request until the worker closes `requests`; report each child's pid and exit code."""
    children: set[int] = set()

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    fd = requests.fileno()
    while True:
        if select.select([fd], [], [], REAP_S)[0]:
            line = requests.readline()
            if not line:
                return  # the worker is gone: its cells see that themselves and stop
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                worker = request.get("kind") == "worker"
                _become(request, replies, new_session=not worker)  # a worker stays in the runner's group
                code = _run_worker(request) if worker else _run_cell(request)
                with contextlib.suppress(BaseException):
                    atexit._run_exitfuncs()  # what an interpreter would run on its way out
                os._exit(code)
            children.add(pid)
            reply({"pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            with contextlib.suppress(OSError):  # the worker may be gone
                reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the worker's group is the worker's to handle
    preload(*(args + [None, None])[:2])
    if threading.active_count() > 1:  # forking with threads running is not safe: the starter falls back to cold
        print(f"the cell zygote does not fork: importing the plug-ins started threads "
              f"({', '.join(t.name for t in threading.enumerate()[1:])}); cells start as new interpreters",
              file=sys.stderr, flush=True)
        return 3
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of imported code go to the log, not into the replies
    serve(sys.stdin, replies)
    return 0


_attached: Zygote | None = None  # the cell zygote this worker forked at its start (a worker forked by a zygote)


def attached() -> Zygote | None:
    return _attached


class _Forked:
    """A zygote forked from this process, with the parts of `subprocess.Popen` that `Zygote` uses."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]):
        self.pid, self.stdin, self.stdout, self.returncode = pid, stdin, stdout, None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"zygote {self.pid}", timeout or 0.0)
            time.sleep(REAP_S)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie does not: nobody may be left to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


class ZygoteCell:
    """A process forked by a zygote, with the parts of `subprocess.Popen` its starter uses (pid, poll, wait,
    send_signal, kill)."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid, 0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.zygote.exit_code(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(f"process {self.pid}", timeout or 0.0)
            self.returncode = code
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The worker's side: starts the zygote, restarts it when it has died, forks cells through it."""

    def __init__(self, world: str | None, policy: str | None, env: dict[str, str], log: IO[str]):
        self.args = [a for a in (world, policy) if a]
        self.env, self.log = env, log
        self.proc: subprocess.Popen | _Forked | None = None
        self.exits: dict[int, int] = {}
        self.pending = b""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        """A running zygote: started on first use, and again if it died (between cells)."""
        if self.alive():
            return
        if self.proc is not None:
            print(f"the cell zygote (pid {self.proc.pid}) exited with code {self.proc.returncode}: starting another",
                  file=sys.stderr, flush=True)
        self.close()
        self.pending = b""
        self.proc = subprocess.Popen([sys.executable, "-m", "ript_ablate.study.zygote", *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=self.env,
                                     bufsize=0)

    def spawn(self, job: str | Path, env: dict[str, str], log: str | Path, cwd: str | Path) -> ZygoteCell:
        """Fork a cell (`python -m ript_ablate.study.cell JOB` as a fresh process in its own session)."""
        return self._fork({"job": str(job), "env": env, "log": str(log), "cwd": str(cwd)})

    def spawn_worker(self, argv: list[str], env: dict[str, str], log: str | Path, cwd: str | Path,
                     world: str | None, policy: str | None) -> ZygoteCell:
        """Fork a study worker (`ript-ablate ARGV`, in the caller's process group), which forks its own cell
        zygote from itself before it does anything else: its cells then start without importing either."""
        return self._fork({"kind": "worker", "argv": argv, "env": env, "log": str(log), "cwd": str(cwd),
                           "world": world, "policy": policy})

    def _fork(self, request: dict[str, Any]) -> ZygoteCell:
        self.ensure()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        message = self._read(None)
        while message is not None and "pid" not in message:
            message = self._read(None)
        if message is None:
            raise RuntimeError("the zygote ended before it forked; see the worker log")
        return ZygoteCell(self, int(message["pid"]))

    @classmethod
    def fork_here(cls, world: str | None, policy: str | None) -> Zygote:
        """A zygote forked from this process, which must be clean (see the module docstring): a worker just
        forked by the runner's zygote. If it dies, `ensure` starts a new interpreter as usual."""
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(requests_w)
            os.close(replies_r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            code = 0
            try:
                serve(os.fdopen(requests_r, "r"), os.fdopen(replies_w, "w"))
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(requests_r)
        os.close(replies_w)
        zygote = cls(world, policy, dict(os.environ), None)
        zygote.proc = _Forked(pid, os.fdopen(requests_w, "wb", buffering=0), os.fdopen(replies_r, "rb",
                                                                                       buffering=0))
        return zygote

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The exit code of child `pid` once it has ended, within `timeout` seconds (None: wait), else None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.exits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self._read(left) if self.alive() else None
            if message is None:
                if not self.alive() and pid not in self.exits:  # the zygote died under its cell: the cell goes on
                    if not _running(pid):  # (it answers to the worker); its result file tells how it ended
                        self.exits[pid] = 0
                        break
                    time.sleep(min(REAP_S * 4, left if left is not None else REAP_S * 4))
                if deadline is not None and time.monotonic() >= deadline:
                    return None
        return self.exits.pop(pid)

    def _read(self, timeout: float | None) -> dict[str, Any] | None:
        """The zygote's next message, or None at `timeout` or when it is gone. Reads the pipe unbuffered (with
        a buffer of its own), so that `select` never waits on a line already read ahead."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()
                return None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        message = json.loads(line)
        if "exit" in message:
            self.exits[int(message["exit"])] = int(message["code"])
        return message

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


if __name__ == "__main__":  # run the importable module's main: the worker's `attached()` reads its global
    sys.exit(importlib.import_module("ript_ablate.study.zygote").main())
