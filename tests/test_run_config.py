"""The run's config is kept (`fer_jax.training.run_config`): a resume with another recipe is refused
listing the fields, fields that do not change the result may change, and
`--allow_config_changes` lets the recipe change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import synthetic
from fer_jax.training import run_config
from fer_jax.user_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One short run of a plain ResNet18 (compiles fastest) that the CLI tests resume.
RUN_FLAGS = [
    "--config=configs/synthetic.py:cbam=none",
    "--config.num_epochs=1",
    "--config.cross_validate=False",
]


def test_which_fields_change_the_result():
    for path in ("model.width", "loss.margin", "optimizer.learning_rate", "seed", "num_epochs"):
        assert run_config.changes_result(path)
    for path in ("replicas", "replica_seeds", "batch_size", "normalize", "half_precision"):
        assert run_config.changes_result(path)
    for path in ("init_from", "dataset", "train_split", "synthetic.train", "eval_every_epochs"):
        assert run_config.changes_result(path)
    for path in ("jaffe.num_epochs", "jaffe.optimizer.learning_rate", "jaffe.folds"):
        assert run_config.changes_result(path)
    for name in run_config.RESULT_NEUTRAL:
        assert not run_config.changes_result(name)
        assert not run_config.changes_result(f"jaffe.{name}")
    assert run_config.changes_result("model.log_every_steps")  # only at the run level


def test_differences():
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "added": {"e": 2}}
    assert run_config.differences(old, new) == [
        ("added.e", run_config.ABSENT, 2),
        ("b.c", [1, 2], [1, 3]),
        ("gone", 0, run_config.ABSENT),
    ]


def test_save_or_compare(tmp_path):
    config = synthetic.get_config()
    path = tmp_path / run_config.CONFIG_FILE
    run_config.save_or_compare(config, str(tmp_path))  # first start: written
    assert json.loads(path.read_text()) == json.loads(run_config.to_json(config))
    run_config.save_or_compare(config, str(tmp_path))  # same config
    config.log_every_steps, config.jaffe.manual_dir = 3, "/data/jaffe"
    run_config.save_or_compare(config, str(tmp_path))  # may change; recorded
    assert json.loads(path.read_text())["log_every_steps"] == 3
    config.model.width, config.jaffe.num_epochs = 16, 7
    with pytest.raises(UserError) as e:
        run_config.save_or_compare(config, str(tmp_path))
    assert "config.jaffe.num_epochs 2 -> 7, config.model.width 8 -> 16;" in str(e.value)
    assert "--allow_config_changes" in str(e.value)
    assert json.loads(path.read_text())["model"]["width"] == 8  # unchanged
    run_config.save_or_compare(config, str(tmp_path), allow_changes=True)
    assert json.loads(path.read_text())["model"]["width"] == 16
    path.write_text("{not json")
    with pytest.raises(UserError, match="is unreadable"):
        run_config.save_or_compare(config, str(tmp_path))


def _main(workdir, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={workdir}", *RUN_FLAGS, *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("run"))
    result = _main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released after the run
    return workdir


def _saved(workdir: str) -> dict:
    with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
        return json.load(f)


def test_resume_with_another_recipe_is_refused(finished_run):
    result = _main(finished_run, "--config.num_epochs=2", "--config.loss.margin=2")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the run in {finished_run} was started with a different recipe: "
        "config.loss.margin 4 -> 2, config.num_epochs 1 -> 2; resume with the same values, use "
        "another --workdir, or pass --allow_config_changes to train on with the new ones"
    ]
    assert _saved(finished_run)["num_epochs"] == 1


def test_resume_with_other_logging_is_accepted(finished_run):
    result = _main(finished_run, "--config.log_every_steps=3", "--config.keep_checkpoints=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training already finished" in result.stderr
    assert _saved(finished_run)["log_every_steps"] == 3


def test_allow_config_changes(finished_run):
    result = _main(finished_run, "--config.seed=3", "--allow_config_changes")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Config changes allowed (--allow_config_changes): config.seed 0 -> 3" in result.stderr
    assert _saved(finished_run)["seed"] == 3


def test_fields_added_since_an_old_run_count_as_their_old_meaning():
    from fer_jax.training import run_config

    old = {"seed": 0, "model": {"width": 8}}
    same = {**old, "replicas": 1, "replica_seeds": [], "replica_overrides": [], "replica_map": ""}
    assert run_config.differences(old, same) == []
    assert run_config.differences(old, {**old, "replicas": 2}) == [("replicas", 1, 2)]
    off = {**old, "augment": {"zoom": 0.0, "rotate": 0.0}}  # a run from before config.augment
    assert run_config.differences(old, off) == []
    on = {**old, "augment": {"zoom": 0.2, "rotate": 0.0}}
    assert run_config.differences(old, on) == [("augment.zoom", 0.0, 0.2)]
    assert run_config.changes_result("augment.zoom")
