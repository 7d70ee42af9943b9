"""One run at a time per work dir.

Two runs on one work dir would share a study (and overshoot its trial budget with duplicate
parameter sets) and race to write the same bundles. A file lock (the `filelock` library: an OS
lock, released by the kernel even when a run is SIGKILLed) serialises them; beside it, a small JSON
file names the holder so the run that has to wait can say which run holds the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK = ".run.lock"
HOLDER = ".run.lock.json"


class WorkdirBusy(RuntimeError):
    """Another run holds the work dir."""


def read_holder(workdir: Path) -> dict:
    try:
        return json.loads((Path(workdir) / HOLDER).read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def lock_workdir(workdir: Path, what: str, wait_s: float = 0) -> Iterator[Callable[..., None]]:
    """Hold the work dir's lock while inside; wait up to `wait_s` seconds (negative: for ever) for a
    run that holds it, then raise `WorkdirBusy` naming that run. `what` describes this run; the
    yielded function adds facts to that description (the MLflow run id, once there is one)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(workdir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = read_holder(workdir)
        who = (
            (
                f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('since')})"
            )
            if holder
            else "another run"
        )
        if wait_s == 0:
            raise WorkdirBusy(
                f"work dir {workdir} is in use by {who}; wait for it to finish, or pass "
                "--wait SECONDS to queue behind it"
            ) from None
        print(
            f"[lock] work dir {workdir} is in use by {who}: waiting" + (f" up to {wait_s:.0f}s" if wait_s > 0 else ""),
            flush=True,
        )
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise WorkdirBusy(f"work dir {workdir} is still in use by {who} after waiting {wait_s:.0f}s") from None
    holder = {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def note(**facts: str) -> None:
        holder.update(facts)
        holder["what"] = what + "".join(f", {k} {v}" for k, v in facts.items())
        (workdir / HOLDER).write_text(json.dumps(holder))

    try:
        note()
        yield note
    finally:
        (workdir / HOLDER).unlink(missing_ok=True)
        lock.release()
