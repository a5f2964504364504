"""An exclusive lock between processes of one machine on a cache entry, that never waits silently.

The holder writes who it is (process, host, since when, what it builds) into the lock file; a process that finds
the entry locked says so at once, naming the holder, and then every `HEARTBEAT_S` seconds until it gets the lock.
`flock` releases the lock when its holder dies, so a crashed build never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ript_ablate.progress import console

HEARTBEAT_S = 15.0
POLL_S = 0.2


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process"
    since = float(info.get("since", time.time()))
    return (f"process {info.get('pid')} on {info.get('host')} (building {info.get('what')} since "
            f"{time.strftime('%H:%M:%S', time.localtime(since))}, {time.time() - since:.0f} s ago)")


@contextmanager
def cache_lock(path: Path, what: str, heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Hold `path` exclusively while building `what`; announce and heartbeat while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            console.print(f"waiting for {holder}: {what} is being built by it; this process uses it once it is "
                          f"done (lock {path})")
            start = last = time.monotonic()
            while True:
                time.sleep(POLL_S)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - last >= heartbeat_s:
                        last = time.monotonic()
                        console.print(f"still waiting for {holder.split(' (')[0]} ({last - start:.0f} s)")
            console.print(f"lock free after {time.monotonic() - start:.0f} s: {what}")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                     "what": what}))
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
