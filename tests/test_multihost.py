"""Multi-process training for real: two `python -m fer_jax.main --multihost` processes on this
machine (`jax.distributed` on localhost, gloo CPU collectives, one CPU device each, each
feeding its half of every global batch) against one process with two simulated devices.

The two-process run must train the same parameters, leave one set of checkpoints (written by
Orbax from process 0 alone) and write its summaries (TensorBoard events, eval JSONs and PNGs,
results.json) once, from process 0. Both processes run under a Python audit hook that records
every file they create, write, rename or delete in the workdir, so "process 1 writes nothing"
is observed, not inferred from the files that are left. (Array data is written by TensorStore,
below Python: the checkpoint layout shows it comes from process 0 alone.)

Plain ResNet18 (`cbam=none`): CBAM's max pooling routes its gradient to one arg-max, and near
ties let a last-bit difference flip it and compound over the run's 28 steps
(tests/test_parallel.py). Here both runs execute the same per-device program and a two-way
all-reduce is exact (a + b = b + a), so they agree bit for bit even with CBAM (measured), but
the test should not rest on that; without CBAM a rounding difference stays at rounding size,
and the network compiles faster.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # per run; a hung coordinator or barrier fails the test instead of hanging it

ARGS = [
    "--config=configs/synthetic.py",
    "--config.model.width=8",
    "--config.model.cbam=none",
    "--config.num_epochs=2",
    "--config.cross_validate=False",
    # 448 examples / 32 = 14 steps per epoch: saves at 7 (mid-epoch), 14, 21 and 28; keeps 2.
    "--config.checkpoint_every_steps=7",
    "--config.keep_checkpoints=2",
]
EXPECTED_STEPS = [21, 28]
EXPECTED_EVAL = {
    f"{name}{ext}"
    for name in (
        "public_test_epoch001",
        "public_test_epoch002",
        "private_test_selected",
        "private_test_selected_centre_crop",
    )
    for ext in (".json", "_confusion.png")
}

# fer_jax.main under an audit hook that appends "<event> <path relative to the workdir>" for
# every write-like file operation inside $FER_AUDIT_ROOT to $FER_AUDIT_LOG.
AUDITED_MAIN = textwrap.dedent(
    """
    import os, runpy, sys

    root = os.path.realpath(os.environ["FER_AUDIT_ROOT"]) + os.sep
    log = os.environ["FER_AUDIT_LOG"]
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def record(event, path):
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(root):
                with open(log, "a") as f:
                    f.write(f"{event} {os.path.relpath(path, root)}\\n")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & writes:
                record("write", path)
        elif event in ("os.rename", "os.replace"):
            record(event, args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            record(event, args[0])

    sys.addaudithook(hook)
    sys.argv[0] = "fer_jax.main"
    runpy.run_module("fer_jax.main", run_name="__main__", alter_sys=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # No simulated devices; no proxy for the coordinator's gRPC on localhost.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and "proxy" not in k.lower()}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(
    commands: list[tuple[list[str], dict[str, str], str]], *, expect_failure: bool = False
) -> None:
    """Runs the processes together and fails the test unless all succeed (or, with
    `expect_failure`, all fail by themselves). The first to fail, unless failures are
    expected, or the time limit stops them all."""
    procs = []
    try:
        for argv, env, log in commands:
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=REPO,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = not expect_failure and any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and children
                p.wait()
    failures = []
    for p, (_, _, log) in zip(procs, commands, strict=True):
        if p.returncode == -signal.SIGKILL:
            failures.append(f"{log}: stopped (time limit {TIMEOUT_S} s, or another failed)")
        elif expect_failure and p.returncode == 0:
            failures.append(f"{log}: succeeded, expected to fail")
        elif p.returncode != 0 and not expect_failure:
            with open(log) as f:
                failures.insert(0, f"{log}: exit code {p.returncode}:\n{f.read()[-4000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))


def _multihost(i: int, address: str, workdir: str) -> list[str]:
    return [
        "--multihost",
        f"--coordinator_address={address}",
        "--num_processes=2",
        f"--process_id={i}",
        f"--workdir={workdir}",
    ]


@pytest.fixture(scope="module", params=["tf_data", "device"])
def runs(request, tmp_path_factory) -> dict[str, str]:
    """Workdirs and audit logs of the two-process run and of the one-process reference."""
    pipeline = request.param
    from configs import synthetic

    if "input_pipeline" not in synthetic.get_config():
        pytest.skip("config.input_pipeline ('tf_data' | 'device') does not exist yet")
    tmp = tmp_path_factory.mktemp(f"multihost_{pipeline}")
    args = [*ARGS, f"--config.input_pipeline={pipeline}"]
    multi, single = str(tmp / "two_processes"), str(tmp / "one_process")
    os.makedirs(multi)
    address = f"127.0.0.1:{_free_port()}"
    audits = [str(tmp / f"audit_{i}.txt") for i in range(2)]
    commands = [
        (
            [
                sys.executable,
                "-c",
                AUDITED_MAIN,
                *_multihost(i, address, multi),
                *args,
            ],
            _env(FER_AUDIT_ROOT=multi, FER_AUDIT_LOG=audits[i]),
            str(tmp / f"process_{i}.log"),
        )
        for i in range(2)
    ]
    commands.append(
        (
            [sys.executable, "-m", "fer_jax.main", f"--workdir={single}", *args],
            _env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
            str(tmp / "one_process.log"),
        )
    )
    start = time.perf_counter()
    _run(commands)  # all three at once: the compiles are single-threaded
    print(f"{pipeline}: {time.perf_counter() - start:.0f} s")
    return {"multi": multi, "single": single, "audit0": audits[0], "audit1": audits[1]}


def _audit(path: str) -> list[tuple[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split(" ", 1)) for line in f.read().splitlines()]


def test_two_processes_train_the_same_parameters_as_one_process_with_two_devices(runs):
    from fer_jax.training import checkpoint

    def leaves(workdir: str, step: int) -> list[tuple[str, np.ndarray]]:
        path = os.path.join(workdir, "checkpoints", str(step))
        return list(_leaves(checkpoint.load_variables(path)[0]))

    for step in EXPECTED_STEPS:
        for (path, got), (_, want) in zip(
            leaves(runs["multi"], step), leaves(runs["single"], step), strict=True
        ):
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step} {path}"
            )
    # Training moved the parameters between the two checkpoints: the agreement is not vacuous.
    first, last = (leaves(runs["multi"], step) for step in EXPECTED_STEPS)
    assert max(np.max(np.abs(a - b)) for (_, a), (_, b) in zip(first, last, strict=True)) > 1e-3
    with open(os.path.join(runs["multi"], "results.json")) as f:
        multi = json.load(f)
    with open(os.path.join(runs["single"], "results.json")) as f:
        single = json.load(f)
    assert multi["selected_step"] == single["selected_step"]
    assert multi["private_test"]["confusion_counts"] == single["private_test"]["confusion_counts"]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key], f"{prefix}/{key}")
    else:
        yield prefix, np.asarray(tree)


def test_two_processes_write_one_set_of_checkpoints(runs):
    workdir = runs["multi"]
    for sub, steps in (("checkpoints", EXPECTED_STEPS), ("best", None)):
        entries = sorted(os.listdir(os.path.join(workdir, sub)))
        assert all(e.isdigit() for e in entries), f"{sub}: leftovers {entries}"
        if steps is not None:
            assert sorted(map(int, entries)) == steps
        else:
            assert len(entries) == 1
        for step in entries:
            # Array data (TensorStore, below the audit hook) comes from process 0 alone.
            state = os.path.join(workdir, sub, step, "state")
            assert glob.glob(os.path.join(state, "ocdbt.process_*")) == [
                os.path.join(state, "ocdbt.process_0")
            ]
    # Process 1 wrote nothing there (process 0 did: the audit sees checkpoint writes).
    assert not [e for e in _audit(runs["audit1"]) if e[1].startswith(("checkpoints", "best"))]
    written0 = [path for _, path in _audit(runs["audit0"])]
    assert any(path.startswith("checkpoints/") for path in written0)
    # Process 0 knew it was one of several: it checked that the workdir is shared
    # (fer_jax.training.checkpoint.prepare_workdir), which a lone process skips.
    assert any(path.startswith(".shared_probe_") for path in written0)


def test_two_processes_write_summaries_once_from_process_0(runs):
    workdir = runs["multi"]
    events = glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1, events
    assert set(os.listdir(os.path.join(workdir, "eval"))) == EXPECTED_EVAL
    assert os.path.exists(os.path.join(workdir, "results.json"))
    assert not glob.glob(os.path.join(workdir, "**", ".tmp_*"), recursive=True)
    # (The events file is written by TensorFlow's C++ file system, below the audit hook: a
    # second writer would have left a second file.)
    written0 = {path for _, path in _audit(runs["audit0"])}
    assert "results.json" in written0
    assert {f"eval/{name}" for name in EXPECTED_EVAL} <= written0
    # Process 1 only probed that the workdir is writable (tempfile, created and deleted).
    written1 = [(event, path) for event, path in _audit(runs["audit1"])]
    assert all(path.startswith(".write_probe") for _, path in written1), written1


def test_two_processes_refuse_a_workdir_they_do_not_share(tmp_path):
    """Checkpoints are written by process 0 alone: a process that cannot see them would
    silently start over on resume. (Simulated: each process gets its own directory.)"""
    address = f"127.0.0.1:{_free_port()}"
    logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
    _run(
        [
            (
                [
                    sys.executable,
                    "-m",
                    "fer_jax.main",
                    *_multihost(i, address, str(tmp_path / f"workdir_{i}")),
                    *ARGS,
                ],
                _env(),
                logs[i],
            )
            for i in range(2)
        ],
        expect_failure=True,
    )
    for log in logs:
        with open(log) as f:
            assert "is not shared by all processes: process(es) [1]" in f.read()
