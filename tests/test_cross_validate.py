"""JAFFE cross-validation as users run it: `--mode=cross_validate --config.init_from=pretrained`.

The fine-tuning takes the model fields, A-Softmax's margin and lambda from the model it starts
from unless the command line sets them (`fer_jax.training.cross_validate`); end to end on 213
synthetic TIFFs in JAFFE's format, from a width-8 model saved as the shipped one is
(`$FER_JAX_WEIGHTS_DIR`): `--mode=check` (both protocols' 5 folds), then both protocols, two
folds of one epoch each, and the one-protocol layout of older runs resumed or refused.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import fer2013, fer2013_cpu, jaffe
from data_pipelines import synthetic as synthetic_files
from fer_jax.model import pretrained
from fer_jax.training import cross_validate, data_check, run_config
from fer_jax.training.step import create_model
from fer_jax.user_errors import UserError
from tests.test_recognizer import random_variables

REPO = pathlib.Path(__file__).resolve().parents[1]
SUBJECTS = ("KA", "KL", "KM", "KR", "MK", "NA", "NM", "TM", "UY", "YM")  # JAFFE's ten
EXPRESSIONS = ("AN", "DI", "FE", "HA", "SA", "SU", "NE")
EXTRA = (("KA", "AN"), ("KL", "DI"), ("YM", "SU"))  # a 4th photo: 10 x 7 x 3 + 3 = 213
# The tiny model's metadata: as the shipped model's, no loss recorded, trained with 'auto'.
PROVENANCE = {"source": "runs/tiny", "step": 10, "epoch": 1, "trained_matmul_dtype": "auto"}


def write_jaffe_213(directory: pathlib.Path) -> pathlib.Path:
    """JAFFE's layout: 213 256x256 gray TIFFs named like KA.AN1.39.tiff (every other one with a
    gray palette), a README beside them; each expression a pattern of its own."""
    rng = np.random.default_rng(0)
    ramp = np.tile(np.arange(256, dtype=np.float32)[None] / 2, (256, 1))
    image_id = 0
    for s, subject in enumerate(SUBJECTS):
        for e, code in enumerate(EXPRESSIONS):
            for repeat in range(1, 4 + ((subject, code) in EXTRA)):
                image_id += 1
                gray = ramp + 8 * s + rng.normal(0, 6, (256, 256))
                gray[64 + 16 * e : 96 + 16 * e, 64:192] += 60  # the expression's band
                name = f"{subject}.{code}{repeat}.{image_id}.tiff"
                gray = np.clip(gray, 0, 255).astype(np.uint8)
                synthetic_files.write_jaffe_image(directory / name, gray, palette=image_id % 2 == 0)
    (directory / "README").write_text("JAFFE: for non-commercial research only.")
    return directory


def _tiny_config():
    config = jaffe.get_config()
    config.model.width, config.model.dropout_rate = 8, 0.0
    return config


def _tiny_model() -> dict:
    return _tiny_config().model.to_dict()


def _save(directory: pathlib.Path, name: str, provenance: dict) -> None:
    config = _tiny_config()
    variables = random_variables(create_model(config), seed=1)
    pretrained.save(variables, config.model.to_dict(), directory / f"{name}.npz", meta=provenance)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    """A weights directory holding the width-8 model as the default model, and `recorded`: the
    same with its loss in the provenance."""
    directory = tmp_path_factory.mktemp("weights")
    _save(directory, pretrained.DEFAULT_NAME, PROVENANCE)
    _save(directory, "recorded", {**PROVENANCE, "loss": {"margin": 3, "lambda": 20.0}})
    return directory


@pytest.fixture
def weights_env(weights, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(weights))
    return weights


def test_pretrained_source_reads_the_metadata_and_the_shipped_recipe(weights_env):
    source = cross_validate.read_source("pretrained")
    assert source.model == {**_tiny_model(), "matmul_dtype": "auto"}
    assert (source.margin, source.lam) == (4, 48.0)
    assert source.origin["matmul_dtype"].startswith("its provenance's trained_matmul_dtype")
    assert "does not record its loss" in source.origin["loss"]
    recorded = cross_validate.read_source("pretrained:recorded")
    assert (recorded.margin, recorded.lam, recorded.origin["loss"]) == (
        3,
        20.0,
        "its provenance's loss",
    )


def _write_run(directory: pathlib.Path, **fields) -> pathlib.Path:
    config = fer2013_cpu.get_config()
    config.update_from_flattened_dict(fields)
    directory.mkdir(parents=True)
    (directory / run_config.CONFIG_FILE).write_text(run_config.to_json(config))
    return directory


def test_run_source_is_its_config_json_where_its_lambda_schedule_ends(tmp_path):
    # The CPU recipe: the 300-epoch curve compressed into the run, 1500 -> 1500 / 31.
    run = _write_run(tmp_path / "cpu", **{"model.width": 16})
    (run / "best" / "2688").mkdir(parents=True)
    for init_from in (str(run), str(run / "best" / "2688")):
        source = cross_validate.read_source(init_from)
        assert source.model["width"] == 16 and source.model["matmul_dtype"] == "auto"
        assert source.lam == pytest.approx(1500 / 31, rel=1e-6) and source.margin == 4
        assert source.origin["loss"].startswith(str(run / "config.json"))
    per_epoch = _write_run(tmp_path / "epoch", **{"loss.lambda_per": "epoch", "num_epochs": 10})
    assert cross_validate.read_source(str(per_epoch)).lam == pytest.approx(750.0)
    bare = tmp_path / "bare" / "checkpoints" / "7"
    bare.mkdir(parents=True)
    source = cross_validate.read_source(str(bare))
    assert (source.model, source.lam) == ({}, cross_validate.SHIPPED_LAMBDA)
    with pytest.raises(UserError, match=r"^config.init_from=.*nowhere does not exist"):
        cross_validate.read_source(str(tmp_path / "nowhere"))


def test_fine_tuning_config_takes_from_the_source_what_the_command_line_does_not_set(
    weights_env,
):
    config, source = jaffe.get_config(), cross_validate.read_source("pretrained")
    tuned, settings = cross_validate.fine_tuning_config(config, source)
    assert tuned.model.to_dict() == {**_tiny_model(), "matmul_dtype": "auto"}
    assert (tuned.loss.margin, tuned.loss.lambda_base, tuned.loss.lambda_min) == (4, 48.0, 48.0)
    assert config.loss.lambda_base == 1500.0  # the caller's config is left as it was
    assert settings["loss"]["lambda_held"] == 48.0 and settings["origin"]["model.width"]
    # The command line's values stay, and a lambda field set there keeps the config's schedule.
    config.model.matmul_dtype, config.loss.lambda_base = "float32", 100.0
    user_set = ["model.matmul_dtype", "loss.lambda_base"]
    tuned, settings = cross_validate.fine_tuning_config(config, source, user_set)
    assert (tuned.model.matmul_dtype, tuned.model.width) == ("float32", 8)
    assert (tuned.loss.lambda_base, tuned.loss.lambda_min) == (100.0, 5.0)
    assert settings["loss"]["lambda_held"] is None and "loss.lambda" not in settings["origin"]
    lines = cross_validate.settings_lines(settings, tuned)
    assert "  loss.lambda_base 100, model.matmul_dtype float32: the command line" in lines
    config.model.width = 16
    with pytest.raises(UserError, match=r"^config.model.width=16 \(set on the command line\)"):
        cross_validate.fine_tuning_config(config, source, ["model.width"])


def test_check_mode_lines_of_the_stage_after_training_hold_lambda_where_stage_1_ends(tmp_path):
    from configs import synthetic

    config = synthetic.get_config()  # 4 epochs, lambda per epoch: 1500 / 1.4 at the end
    config.jaffe.loss.margin = 2
    lines = data_check.cross_validation_lines(config, "train", str(tmp_path), ["jaffe.loss.margin"])
    assert lines[0].startswith("fine-tuning the model selected in stage 1; ")
    assert "  lambda held at 1071.43 (loss.lambda_base = loss.lambda_min = 1071.43): the " in (
        "\n".join(lines)
    )
    assert "  loss.margin 2: the command line" in lines
    assert lines[-1] == "fold plan: 5 folds (random), made when the data is read"
    assert data_check.cross_validation_lines(config, "evaluate", str(tmp_path)) == []
    config.jaffe.fold_protocol = "both"
    lines = data_check.cross_validation_lines(config, "train", str(tmp_path))
    assert lines[-1] == (
        "fold plan: 5 folds of each protocol (random, subject), made when the data is read"
    )


def test_the_stage_after_training_runs_both_protocols_by_default(monkeypatch, tmp_path):
    """`fer_jax.main --mode=train`'s JAFFE stage (configs/fer2013.py) is `run` with the FER2013
    config's `jaffe` section: both protocols, its messages naming `config.jaffe.*`."""
    calls = []
    monkeypatch.setattr(cross_validate, "train_and_evaluate", lambda *a, **k: {})
    monkeypatch.setattr(cross_validate, "run", lambda c, w, **k: calls.append((c, w, k)) or {})
    config = fer2013.get_config()
    results = cross_validate.train_then_cross_validate(config, str(tmp_path / "run"))
    ((cv, workdir, kwargs),) = calls
    assert cv.fold_protocol == "both" and cv.init_from == str(tmp_path / "run")
    assert workdir == str(tmp_path / "run" / "cross_validation")
    assert kwargs["field"] == "config.jaffe" and results["cross_validation"] == {}


def _main(*args: str, weights: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, pretrained.WEIGHTS_DIR_ENV: str(weights)}
    return subprocess.run(
        [sys.executable, "-m", "fer_jax.main", "--config=configs/jaffe.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_cross_validation_from_pretrained_end_to_end(weights, tmp_path):
    manual = write_jaffe_213(tmp_path / "jaffedbase")
    workdir = tmp_path / "jaffe_run"
    flags = [
        f"--workdir={workdir}",
        "--config.init_from=pretrained",
        "--config.data_source=files",
        f"--config.manual_dir={manual}",
    ]
    check = _main("--mode=check", *flags, weights=weights)  # both protocols, the default
    assert check.returncode == 0, check.stderr[-3000:]
    lines = check.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("fine-tuning pretrained")))
    assert lines[start + 1].endswith("model.width 8: its metadata")
    assert lines[start + 2] == (
        "  model.matmul_dtype auto: its provenance's trained_matmul_dtype, what it trained with"
    )
    assert lines[start + 3].startswith("  loss.margin 4, lambda held at 48 (loss.lambda_base = ")
    assert any(
        line.startswith("  1. JAFFE cross-validation: 5 folds of each protocol (random, ")
        for line in lines
    )
    random_plan = lines.index("fold plan: 5 folds (random, seed 0) of 213 images, 10 subjects:")
    subject_plan = lines.index("fold plan: 5 folds (subject, seed 0) of 213 images, 10 subjects:")
    assert subject_plan == random_plan + 6
    plan = lines[subject_plan + 1 : subject_plan + 6]
    assert all(line.startswith("  fold ") for line in lines[random_plan + 1 : random_plan + 6])
    assert all(line.startswith("  fold ") for line in plan)
    assert all(len(line.rsplit("; ", 1)[1].rstrip(")").split(", ")) == 2 for line in plan)
    assert lines[-1] == "check passed: nothing was compiled, trained or written"
    assert not workdir.exists()
    wrong = _main("--mode=check", *flags, "--config.model.head=softmax", weights=weights)
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("error: config.model.head='softmax' (set on the command line)")

    # Both protocols, two folds of one epoch each (every image is still tested once per
    # protocol), to keep the test short.
    short = ["--config.folds=2", "--config.num_epochs=1"]
    run = _main("--mode=cross_validate", *flags, *short, weights=weights)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "lambda held at 48 (loss.lambda_base = loss.lambda_min = 48)" in run.stderr
    assert "train_lambda=48," in run.stderr  # what the training steps used
    assert "Cross-validation (random): " in run.stderr
    assert "Cross-validation (subject): " in run.stderr
    log = [line.split("] ", 1)[-1] for line in run.stderr.splitlines()]
    side = log.index("Cross-validation, 2 protocols:")
    assert log[side + 1].startswith("  random : ") and log[side + 2].startswith("  subject: ")
    assert log[side + 3].startswith("Pooled confusion matrices (rows: true class, columns: ")
    assert log[side + 3].endswith(
        "random: ang dis fea hap sad sur neu | subject: ang dis fea hap sad sur neu):"
    )
    assert all(line.count(" | ") == 1 for line in log[side + 4 : side + 11])
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary["protocols"]) == ["random", "subject"]
    for protocol, figures in summary["protocols"].items():
        assert figures["protocol"] == protocol and figures["folds"] == 2
        accuracies = figures["fold_accuracy"]
        assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
        assert figures["mean_accuracy"] == pytest.approx(np.mean(accuracies))
        assert figures["std_accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
        confusion = np.asarray(figures["pooled"]["confusion_counts"])
        assert confusion.shape == (7, 7) and confusion.sum() == 213
        np.testing.assert_array_equal(confusion.sum(axis=1), [31, 31, 30, 30, 30, 31, 30])
        assert f"  {protocol:<7}: {100 * figures['mean_accuracy']:.2f}% ± " in "\n".join(log)
        sub = json.loads((workdir / protocol / "summary.json").read_text())
        assert {k: sub[k] for k in figures} == figures and sub["protocols"] == {protocol: figures}
        saved = json.loads((workdir / protocol / run_config.CONFIG_FILE).read_text())
        assert saved["fold_protocol"] == protocol
        assert (workdir / protocol / "confusion.png").stat().st_size > 0
        for k in range(2):
            assert (workdir / protocol / f"fold_{k}" / "result.json").is_file()
    # The paper's protocol leads: its figures at the top, as a one-protocol summary has them.
    assert {k: summary[k] for k in summary["protocols"]["random"]} == (
        summary["protocols"]["random"]
    )
    tuning = summary["fine_tuning"]
    assert tuning["model"]["width"] == 8 and tuning["model"]["matmul_dtype"] == "auto"
    assert tuning["model"]["head"] == "a_softmax" and tuning["loss"]["lambda_held"] == 48.0
    saved = json.loads((workdir / run_config.CONFIG_FILE).read_text())
    assert saved["model"]["width"] == 8 and saved["loss"]["lambda_min"] == 48.0
    assert saved["fold_protocol"] == "both"

    # `random/` is a one-protocol workdir, laid out as an older run (default 'random') left
    # one: it resumes as one (every fold done, none trained again) ...
    alone = [f"--workdir={workdir / 'random'}", *flags[1:], *short]
    resumed = _main(
        "--mode=cross_validate", *alone, "--config.fold_protocol=random", weights=weights
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Fold 1/2 (random)" not in resumed.stderr and "train_lambda=" not in resumed.stderr
    again = json.loads((workdir / "random" / "summary.json").read_text())
    assert again["fold_accuracy"] == summary["protocols"]["random"]["fold_accuracy"]
    assert list(again["protocols"]) == ["random"]
    # ... and is refused, with the way to resume it, by a run of both protocols.
    refused = _main("--mode=cross_validate", *alone, weights=weights)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"error: workdir {workdir / 'random'} holds a one-protocol cross-validation "
        f"(config.fold_protocol=random, its folds in {workdir / 'random'}/fold_<k>/), not both "
        "protocols' (in random/ and subject/): resume it with --config.fold_protocol=random, "
        "or run both protocols in another --workdir"
    )
    assert not (workdir / "random" / "subject").exists()


def test_a_workdir_of_the_other_layout_is_refused(tmp_path):
    one, both = tmp_path / "one", tmp_path / "both"
    (one / "fold_0").mkdir(parents=True)  # an older run's, without its config.json
    (both / "subject").mkdir(parents=True)
    cross_validate.check_layout(str(one), "random")
    cross_validate.check_layout(str(both), "both")
    cross_validate.check_layout(str(tmp_path / "new"), "both")
    with pytest.raises(UserError, match=r"holds a one-protocol .*--config.jaffe.fold_protocol="):
        cross_validate.check_layout(str(one), "both", "config.jaffe")
    with pytest.raises(UserError) as e:
        cross_validate.check_layout(str(both), "subject")
    assert str(e.value) == (
        f"workdir {both} holds a cross-validation of both protocols (config.fold_protocol=both, "
        f"in {both}/random/ and {both}/subject/): resume it with --config.fold_protocol=both, "
        f"or --workdir={both}/subject (that protocol's own), or use another --workdir"
    )
    # --mode=check says so too, before anything runs.
    config = jaffe.get_config()
    config.init_from = "pretrained"
    with pytest.raises(UserError, match=r"^workdir .*one holds a one-protocol"):
        data_check._workdir_lines(config, "cross_validate", str(one), False)
    lines = data_check._workdir_lines(config, "cross_validate", str(both), False)
    assert lines == [
        f"workdir: {both}: random: 0 fold(s) done, subject: 0 fold(s) done, the others resume "
        "or start"
    ]


def test_summary_lines_put_the_protocols_side_by_side():
    from fer_jax.training import evaluate

    def figures(protocol, accuracies, diagonal):
        counts = np.full((7, 7), 1) + np.diag(np.full(7, diagonal))
        return {
            "protocol": protocol,
            "folds": 2,
            "fold_accuracy": accuracies,
            "mean_accuracy": float(np.mean(accuracies)),
            "std_accuracy": float(np.std(accuracies, ddof=1)),
            "pooled": evaluate.metrics_from_confusion(counts),
        }

    by_protocol = {
        "random": figures("random", [0.9, 1.0], 20),
        "subject": figures("subject", [0.5, 0.7], 3),
    }
    lines = cross_validate.summary_lines({**by_protocol["random"], "protocols": by_protocol})
    assert lines[0] == "Cross-validation, 2 protocols:"
    assert lines[1].startswith("  random : 95.00% ± 7.07 over 2 folds (90.00, 100.00); ")
    assert lines[2].startswith("  subject: 60.00% ± 14.14 over 2 folds (50.00, 70.00); ")
    assert lines[4] == "     angry  21   1   1   1   1   1   1 |   4   1   1   1   1   1   1"
    assert len(lines) == 11
    one = cross_validate.summary_lines(by_protocol["subject"])
    assert one[0].startswith("Cross-validation (subject): 60.00% ± 14.14 over 2 folds")
    assert one[2] == "     angry   4   1   1   1   1   1   1"
