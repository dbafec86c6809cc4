"""One run per workdir: a lock file, `workdir/.lock`, that a run holds for its lifetime.

`hold(workdir)` creates it atomically holding `{host, pid, started, boot_id, pid_start}` and
removes it at the end. A second run is refused with a `UserError` naming the holder; a stale
lock (process gone or reused, or a reboot) is taken over; one from another host is refused with
the command that removes it (docs/runs_and_failures.md). Only process 0 takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

from fer_jax.training.evaluate import read_json
from fer_jax.user_errors import UserError

LOCK_FILE = ".lock"
_READ_TRIES = 10  # a lock just created may not hold its JSON yet: re-read for up to ~1 s


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """`/proc/<pid>/stat` after the name (Linux; else None): [0] state, [19] start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _record() -> dict[str, Any]:
    pid = os.getpid()
    stat = _stat(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "boot_id": _boot_id(),
        "pid_start": None if stat is None else int(stat[19]),
    }


def _read(path: str) -> dict[str, Any] | None:
    """The lock's record; None if it vanished; UserError if it stays unreadable."""
    for _ in range(_READ_TRIES):
        if not os.path.exists(path):
            return None
        holder = read_json(path, check=False)
        if holder is not None:
            return holder
        time.sleep(0.1)
    raise UserError(
        f"{path} is not a lock this tool wrote (unreadable); if no run uses this workdir, "
        f"remove it: rm {path}"
    )


def process_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the lock holder's process still runs: None when it is on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False  # the machine rebooted since
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    stat, recorded = _stat(pid), holder.get("pid_start")
    if stat is None:
        return True  # /proc cannot tell more
    # Not a zombie, and not a later process that was given the same pid.
    return stat[0] != "Z" and (recorded is None or int(stat[19]) == recorded)


def _holder_text(holder: dict[str, Any]) -> str:
    host, pid, started = holder.get("host"), holder.get("pid"), holder.get("started")
    return f"process {pid} on host {host} (started {started})"


def _take_over(path: str, stale: dict[str, Any]) -> None:
    """Removes the stale lock `stale`, unless another run replaced it meanwhile."""
    moved = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, moved)  # of several runs taking it over, one moves it
    except FileNotFoundError:
        return
    same = read_json(moved, check=False) == stale
    if not same:  # a live run's lock, created after we read the stale one: put it back
        with contextlib.suppress(FileExistsError):
            os.link(moved, path)
    os.remove(moved)
    if same:
        logging.warning(
            "Took over the lock %s of %s, which is no longer running.", path, _holder_text(stale)
        )


def check_free(workdir: str) -> dict[str, Any] | None:
    """Raises UserError where another run holds `workdir`'s lock (`acquire` would refuse it);
    returns the record of a stale lock, whose process is gone (None: no lock)."""
    path = os.path.join(workdir, LOCK_FILE)
    holder = _read(path)
    if holder is None:
        return None
    alive = process_alive(holder)
    if alive is None:
        raise UserError(
            f"workdir {workdir} is locked by {_holder_text(holder)}, which cannot be "
            f"checked from host {socket.gethostname()}; if that run has ended, remove the "
            f"lock: rm {path}"
        )
    if alive:
        raise UserError(
            f"workdir {workdir} is in use by {_holder_text(holder)}; wait for that run "
            "to end or use another --workdir"
        )
    return holder


def acquire(workdir: str) -> str:
    """Takes the lock of `workdir` (UserError if another run holds it); returns its path."""
    path = os.path.join(workdir, LOCK_FILE)
    record = _record()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale = check_free(workdir)
            if stale is not None:  # else released meanwhile
                _take_over(path, stale)
            continue  # try again: released, taken over, or another run was faster
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return path


def release(path: str) -> None:
    """Removes the lock at `path` if this process holds it."""
    holder = read_json(path, check=False)
    if holder is None:
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the lock of `workdir` for the `with` block (process 0 only, in multi-process runs)."""
    import jax

    if jax.process_index() != 0:
        yield
        return
    path = acquire(workdir)
    try:
        yield
    finally:
        release(path)
