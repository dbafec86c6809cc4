"""One run per workdir (`fer_jax.training.workdir_lock`): a busy workdir is refused naming the
holder, a
dead holder's lock is taken over, and the lock goes when the run ends, however it ends."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from fer_jax.training import workdir_lock
from fer_jax.user_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def _lock(workdir, pid: int, host: str = HOST, **extra) -> str:
    path = os.path.join(workdir, workdir_lock.LOCK_FILE)
    record = {"host": host, "pid": pid, "started": "2030-01-01T00:00:00+00:00", **extra}
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    """The id of a process that runs for the test's length."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


def _main(workdir, *flags: str) -> subprocess.CompletedProcess:
    """A run that gets past the lock and then stops at once: its fer2013.csv is empty (found by
    the data check before the lock, refused when it is read after it)."""
    empty = os.path.join(workdir, "..", "empty_data")
    os.makedirs(empty, exist_ok=True)
    pathlib.Path(empty, "fer2013.csv").touch()
    cmd = [
        *(sys.executable, "-m", "fer_jax.main", "--config=configs/fer2013.py"),
        *(f"--workdir={workdir}", "--config.cross_validate=False"),
        *("--config.data_source=files", f"--config.manual_dir={empty}", *flags),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_lock_records_its_holder_and_goes_when_the_run_ends(tmp_path):
    path = tmp_path / workdir_lock.LOCK_FILE
    with workdir_lock.hold(str(tmp_path)):
        holder = json.loads(path.read_text())
        assert holder["host"] == HOST and holder["pid"] == os.getpid()
        assert workdir_lock.process_alive(holder)
    assert not path.exists()
    with pytest.raises(RuntimeError, match="boom"), workdir_lock.hold(str(tmp_path)):
        raise RuntimeError("boom")
    assert not path.exists()


def test_a_busy_workdir_is_refused_naming_the_holder(tmp_path, live_pid):
    path = _lock(tmp_path, live_pid)
    with pytest.raises(UserError) as e:
        workdir_lock.acquire(str(tmp_path))
    assert f"is in use by process {live_pid} on host {HOST}" in str(e.value)
    assert json.loads(open(path).read())["pid"] == live_pid  # left alone


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    path = _lock(tmp_path, 1234, host="elsewhere")
    with pytest.raises(UserError) as e:
        workdir_lock.acquire(str(tmp_path))
    assert "process 1234 on host elsewhere" in str(e.value) and f"rm {path}" in str(e.value)


def test_stale_locks_are_taken_over(tmp_path, live_pid, caplog):
    for stale in (
        {"pid": _dead_pid()},  # killed: no such process
        {"pid": live_pid, "pid_start": -1},  # the pid now belongs to a later process
        {"pid": live_pid, "boot_id": "a boot before this one"},
    ):
        path = _lock(tmp_path, **stale)
        with caplog.at_level(logging.WARNING):
            assert workdir_lock.acquire(str(tmp_path)) == path
        assert json.loads(open(path).read())["pid"] == os.getpid()
        assert f"Took over the lock {path} of process {stale['pid']}" in caplog.text
        workdir_lock.release(path)
        assert not os.path.exists(path)
        caplog.clear()


def test_cli_refuses_a_busy_workdir(tmp_path, live_pid):
    workdir = tmp_path / "run"
    workdir.mkdir()
    _lock(workdir, live_pid)
    result = _main(workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: workdir {workdir} is in use by process {live_pid} on host {HOST} (started "
        "2030-01-01T00:00:00+00:00); wait for that run to end or use another --workdir"
    ]
    assert not (workdir / "config.json").exists()  # refused before anything was written


def test_cli_takes_over_a_dead_runs_lock_and_releases_it(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    dead = _dead_pid()
    path = _lock(workdir, dead)
    result = _main(workdir)
    # Past the lock (the run wrote its config.json), then stopped by the missing data.
    assert result.returncode == 2 and "empty file" in result.stderr, result.stderr[-3000:]
    assert f"Took over the lock {path} of process {dead} on host {HOST}" in result.stderr
    assert (workdir / "config.json").exists()
    assert not os.path.exists(path)  # released, although the run failed
