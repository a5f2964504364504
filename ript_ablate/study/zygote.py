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

Protocol (one JSON object per line): request {"job": path, "env": {...}, "cwd": dir, "log": path}; replies
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

PRELOAD = ("numpy", "torch", "torch._dynamo", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
           "optuna", "ript_ablate.study.cell", "ript_ablate.study.command_cell", "ript_ablate.study.objective",
           "ript_ablate.ript.trainer", "ript_ablate.bc", "ript_ablate.tracking.tracker", "ript_ablate.engine")
ZYGOTE_ENV = "RIPT_ABLATE_ZYGOTE"  # set in a cell forked by a zygote: its parent is not its worker
COLD_CELLS_ENV = "RIPT_ABLATE_COLD_CELLS"  # "1": every cell a new interpreter, as before (for comparison)
REAP_S = 0.05


def preload(world: str | None, policy: str | None) -> None:
    """Import what cells need, without running any of it (no torch op, no client, no thread)."""
    for module in PRELOAD:
        importlib.import_module(module)
    from ript_ablate.plugins import resolve

    for kind, name in (("world", world), ("policy", policy)):
        if name:
            with contextlib.suppress(Exception):  # a broken plug-in fails in its cell, with the cell's message
                resolve(kind, name)


def _child(request: dict[str, Any], replies: IO[str]) -> int:
    """In the forked child: become a fresh process for one cell, run it, return its exit code."""
    with contextlib.suppress(OSError):
        os.close(replies.fileno())  # only the zygote answers the worker (and the worker sees EOF when it dies)
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
    os.environ[ZYGOTE_ENV] = "1"
    os.chdir(request["cwd"])
    sys.argv = ["ript_ablate.study.cell", request["job"]]
    from ript_ablate.study import cell

    try:
        return int(cell.main([request["job"]]) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a crashed cell is an exit code and a traceback in its log
        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()


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
                code = _child(request, replies)
                with contextlib.suppress(BaseException):
                    atexit._run_exitfuncs()  # what a cell's interpreter would run on its way out
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
    assert threading.active_count() == 1, "the zygote must not fork with Python threads running"
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of imported code go to the log, not into the replies
    serve(sys.stdin, replies)
    return 0


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
    """A cell forked by the zygote, with the parts of `subprocess.Popen` the worker uses (pid, poll, wait)."""

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
                raise subprocess.TimeoutExpired(f"cell {self.pid}", timeout or 0.0)
            self.returncode = code
        return self.returncode


class Zygote:
    """The worker's side: starts the zygote, restarts it when it has died, forks cells through it."""

    def __init__(self, world: str | None, policy: str | None, env: dict[str, str], log: IO[str]):
        self.args = [a for a in (world, policy) if a]
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None
        self.exits: dict[int, int] = {}
        self.pending = b""
        self.starts = 0

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
        self.starts += 1

    def spawn(self, job: str | Path, env: dict[str, str], log: str | Path, cwd: str | Path) -> ZygoteCell:
        self.ensure()
        assert self.proc is not None and self.proc.stdin is not None
        request = {"job": str(job), "env": env, "log": str(log), "cwd": str(cwd)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        message = self._read(None)
        while message is not None and "pid" not in message:
            message = self._read(None)
        if message is None:
            raise RuntimeError("the cell zygote ended before it forked the cell; see the worker log")
        return ZygoteCell(self, int(message["pid"]))

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


if __name__ == "__main__":
    sys.exit(main())
