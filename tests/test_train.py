"""The training loop: learning, checkpoints, resume after kill -9, the CLI end to end.

The runs use `configs/synthetic.py` (a width-8 model on generated data) through the real CLI,
in subprocesses that share the session's persistent compilation cache.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fer_jax.training import checkpoint
from fer_jax.training.step import create_model, create_train_state
from tests.test_no_tensorflow import _RUN_WITHOUT_TENSORFLOW

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Device input (the default), 3 steps per call: calls of 3 and fewer steps end at every
# checkpoint (4 steps) and epoch end (14 steps), and a resumed run must make the same calls.
# With a moving average of the weights: resumes, reports and reads of the run cover it too.
RUN_FLAGS = [
    "--config=configs/synthetic.py",
    "--config.num_epochs=3",
    "--config.checkpoint_every_steps=4",
    "--config.steps_per_dispatch=3",
    "--config.ema_decay=0.9",
]


def _cli(workdir, *flags, wait=True, without_tensorflow=False):
    python = [sys.executable, "-m"]
    if without_tensorflow:  # importing tensorflow / tensorflow_datasets fails, as if absent
        python = [sys.executable, "-c", _RUN_WITHOUT_TENSORFLOW]
    cmd = [*python, "fer_jax.main", f"--workdir={workdir}", *RUN_FLAGS, *flags]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _final_state(workdir):
    manager = checkpoint._manager(os.path.join(workdir, "checkpoints"), 100)
    try:
        step = manager.latest_step()
        tree, meta = checkpoint._restore_step(manager, step)
    finally:
        manager.close()
    return step, jax.tree.map(np.asarray, tree), meta


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The whole main job on synthetic data: train, select, report, 5-fold CV; with
    TensorFlow and TFDS unimportable (the device input and the TF-free writer need neither)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    proc = _cli(workdir, without_tensorflow=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_synthetic_run_learns_and_reports_the_selected_model(finished_run):
    with open(os.path.join(finished_run, "results.json")) as f:
        results = json.load(f)
    perf = results["performance"]
    assert perf["input_pipeline"] == "device" and perf["steps_per_dispatch"] == 3
    assert perf["steps_timed"] == 42 and perf["evaluations"] == 3
    assert perf["train_images_per_s"] > 0 and perf["eval_crops_per_s"] > 0
    assert perf["compile_seconds"]["train"] > 0 and perf["flops_per_image"]["train"] > 0
    assert perf["projected_full_recipe_s"] > 0
    with open(os.path.join(finished_run, "config.json")) as f:
        assert json.load(f)["model"]["width"] == 8
    report = results["private_test"]
    assert results["selected_on"] == "public_test"
    assert report["num_examples"] == 70  # every test image exactly once
    assert report["accuracy"] > 0.6  # chance is 1/7
    assert np.allclose(np.sum(report["confusion_normalized"], axis=1), 1.0)
    assert sum(map(sum, report["confusion_counts"])) == 70


def test_rerunning_a_finished_run_keeps_its_speed_figures(finished_run, tmp_path):
    """A finished run trains no step when run again; its results keep the figures of the call
    that trained, and the same selected model's report."""
    from configs import synthetic
    from fer_jax.training import train

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    with open(workdir / "results.json") as f:
        before = json.load(f)
    config = synthetic.get_config()
    config.num_epochs, config.checkpoint_every_steps, config.steps_per_dispatch = 3, 4, 3
    config.ema_decay = 0.9  # RUN_FLAGS
    results = train.train_and_evaluate(config, str(workdir))
    assert before["performance"]["steps_timed"] == 42
    assert results["performance"] == before["performance"]
    assert results["selected_step"] == before["selected_step"]
    assert results["private_test"]["accuracy"] == before["private_test"]["accuracy"]


def test_cli_writes_checkpoints_events_metrics_and_plots(finished_run):
    steps = sorted(
        int(os.path.basename(p))
        for p in glob.glob(os.path.join(finished_run, "checkpoints", "*"))
        if os.path.basename(p).isdigit()
    )
    assert steps[-1] == 42 and len(steps) == 2  # 3 epochs x 14 steps; keep_checkpoints=2
    assert len(os.listdir(os.path.join(finished_run, "best"))) >= 1
    assert glob.glob(os.path.join(finished_run, "events.out.tfevents.*"))
    for epoch in (1, 2, 3):
        base = os.path.join(finished_run, "eval", f"public_test_epoch{epoch:03d}")
        assert os.path.getsize(base + ".json") > 0 and os.path.getsize(base + "_confusion.png") > 0
    assert os.path.exists(os.path.join(finished_run, "eval", "private_test_selected.json"))


def test_main_job_cross_validates_every_fold(finished_run):
    with open(os.path.join(finished_run, "cross_validation", "summary.json")) as f:
        summary = json.load(f)
    assert summary["folds"] == 5 and len(summary["fold_accuracy"]) == 5
    assert summary["pooled"]["num_examples"] == 70  # each image tested in exactly one fold
    assert summary["mean_accuracy"] > 0.6
    tested = sorted(
        i
        for k in range(5)
        for i in json.load(
            open(os.path.join(finished_run, "cross_validation", f"fold_{k}", "result.json"))
        )["test_indices"]
    )
    assert tested == list(range(70))


def _wait_for_checkpoint(proc, workdir, step):
    """Waits until `workdir` holds checkpoint `step`; the run must still be going."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(os.path.join(workdir, "checkpoints", str(step))):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before step {step}: " + proc.stderr.read()[-2000:]


def test_sigterm_then_kill_9_then_resume_ends_bit_identical(finished_run, tmp_path):
    # SIGTERM mid-epoch: the step in flight is checkpointed and the run exits 128 + 15.
    workdir = str(tmp_path / "interrupted")
    proc = _cli(workdir, "--config.cross_validate=False", wait=False)
    _wait_for_checkpoint(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stderr.splitlines()[-1]
    stopped = int(stderr.splitlines()[-1].split("after step ")[1].split(",")[0])
    step_saved, _, meta = _final_state(workdir)
    assert step_saved == stopped and 4 < stopped < 42
    assert meta["step_in_epoch"] == stopped % 14

    # Resumed from there, then killed outright (-9) after its next periodic checkpoint.
    proc = _cli(workdir, "--config.cross_validate=False", wait=False)
    _wait_for_checkpoint(proc, workdir, min(stopped // 4 + 1, 10) * 4)  # (42 ends the run)
    os.kill(proc.pid, signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert f"Resuming from step {stopped}" in stderr
    assert _final_state(workdir)[0] < 42

    resumed = _cli(workdir, "--config.cross_validate=False")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step" in resumed.stderr
    step, tree, meta = _final_state(workdir)
    ref_step, ref_tree, _ = _final_state(finished_run)
    assert step == ref_step == 42 and meta["epoch"] == 3 and meta["step_in_epoch"] == 0
    jax.tree.map(np.testing.assert_array_equal, tree, ref_tree)


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_used(finished_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "corrupt")
    shutil.copytree(finished_run, workdir)
    latest = os.path.join(workdir, "checkpoints", "42")
    for path in glob.glob(os.path.join(latest, "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    from configs import synthetic

    config = synthetic.get_config()
    config.ema_decay = 0.9  # RUN_FLAGS
    model = create_model(config)
    template = create_train_state(config, model, 14)
    restored = checkpoint.Checkpoints(workdir, config).restore_latest(template)
    assert restored is not None and restored.step == 40


def test_unknown_config_field_is_rejected_by_name(tmp_path):
    proc = _cli(str(tmp_path), "--config.no_such_field=3")
    assert proc.returncode != 0
    assert "no_such_field" in proc.stderr


def test_missing_dataset_error_gives_instructions(tmp_path):
    proc = _cli(
        str(tmp_path / "w"), "--config.dataset=fer2013", f"--config.data_dir={tmp_path / 'empty'}"
    )
    assert proc.returncode != 0
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no built TFDS 'fer2013'" in proc.stderr and "fer2013.csv" in proc.stderr


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli(str(blocker / "sub"))
    assert proc.returncode != 0 and "not writable" in proc.stderr


def test_checkpoint_from_an_incompatible_model_is_refused(finished_run, tmp_path):
    proc = _cli(
        str(tmp_path), "--mode=evaluate", f"--checkpoint={finished_run}", "--config.model.width=16"
    )
    assert proc.returncode != 0
    assert "incompatible model" in proc.stderr and "width" in proc.stderr


def test_evaluate_mode_with_tf_data_reproduces_the_device_evaluation(finished_run, tmp_path):
    # The run evaluated on the device; the tf.data ten crops must give the same accuracy.
    proc = _cli(
        str(tmp_path),
        "--mode=evaluate",
        f"--checkpoint={finished_run}",
        "--split=private_test",
        "--config.input_pipeline=tf_data",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "eval" / "private_test_evaluate.json") as f:
        metrics = json.load(f)
    with open(os.path.join(finished_run, "results.json")) as f:
        assert metrics["accuracy"] == json.load(f)["private_test"]["accuracy"]


def test_the_runs_checkpoints_hold_the_average_and_every_read_gets_it(finished_run):
    """With `ema_decay` the checkpoints hold the average beside the weights; every read of a
    run's weights (evaluate, predict, export, init_from: `load_variables`) gets the average,
    which is what the run selected and reported (the evaluate-mode test reproduces its report),
    and a run started from it starts its own average there."""
    step, tree, _ = _final_state(finished_run)
    assert set(tree) == {*checkpoint.STATE_FIELDS, "ema"}
    kernels = [t["params"]["linear"]["kernel"] for t in (tree, tree["ema"])]
    assert not np.array_equal(*kernels)
    path = os.path.join(finished_run, "checkpoints", str(step))
    variables, meta, _ = checkpoint.load_variables(path)
    assert meta["ema"] is True
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, variables[collection], tree["ema"][collection])
    raw, raw_meta, _ = checkpoint.load_variables(path, average=False)  # experiments.ema_effect
    assert raw_meta["has_ema"] is True and "ema" not in raw_meta
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, raw[collection], tree[collection])
    from configs import synthetic

    config = synthetic.get_config()
    config.ema_decay = 0.99
    template = create_train_state(config, create_model(config), 14)
    state = checkpoint.init_from(finished_run, template, config)
    jax.tree.map(np.testing.assert_array_equal, state.ema["params"], state.params)
    best, _, _ = checkpoint.load_variables(finished_run)
    jax.tree.map(np.testing.assert_array_equal, state.params, best["params"])
