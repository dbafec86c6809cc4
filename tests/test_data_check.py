"""`fer_jax.training.data_check` and `fer_jax.main --mode=check`: every stage's data is looked for
before any work, a missing one is one line naming it and the ways out, and check mode reports the
run.

The data fixtures here (`fer2013_dir`, `jaffe_dir`: tiny files in the publishers' formats) are
also those of tests/test_readme_commands.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import fer2013, fer2013_cpu, jaffe, synthetic
from data_pipelines import files
from data_pipelines import synthetic as synthetic_files
from fer_jax.training import data_check
from fer_jax.user_errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
FER2013_ROWS = (70, 10, 10)  # Training, PublicTest, PrivateTest: one batch of 64 to train on
JAFFE_SUBJECTS = ("KA", "KL", "KM", "NA", "YM")  # x 7: 5 folds of 28 training images, each
# protocol (the subject-independent one needs a subject per fold)
EXPRESSIONS = ("AN", "DI", "FE", "HA", "SA", "SU", "NE")


def write_fer2013_dir(directory: pathlib.Path, layout: str = "csv") -> pathlib.Path:
    """A folder holding a tiny FER2013 in Kaggle's format (`fer2013.csv` by default)."""
    rows = synthetic_files.fer2013_rows(FER2013_ROWS, seed=0)
    icml = layout == "icml"
    text = synthetic_files.fer2013_csv_text(
        rows["images"], rows["labels"], rows["usages"], icml=icml
    )
    synthetic_files.write_fer2013(directory, text, layout)
    return directory


def write_jaffe_dir(
    directory: pathlib.Path, subjects: tuple[str, ...] = JAFFE_SUBJECTS
) -> pathlib.Path:
    """A jaffedbase-like folder: 256x256 gray TIFFs named like KA.AN1.39.tiff, and a README."""
    gray = np.tile(np.arange(256, dtype=np.uint8)[None] // 2, (256, 1))
    for s, subject in enumerate(subjects):
        for e, code in enumerate(EXPRESSIONS):
            name = f"{subject}.{code}1.{10 * s + e}.tiff"
            synthetic_files.write_jaffe_image(directory / name, gray, palette=bool(e % 2))
    (directory / "README").write_text("JAFFE: for non-commercial research only.")
    return directory


@pytest.fixture(scope="session")
def fer2013_dir(tmp_path_factory) -> pathlib.Path:
    return write_fer2013_dir(tmp_path_factory.mktemp("fer2013"))


@pytest.fixture(scope="session")
def jaffe_dir(tmp_path_factory) -> pathlib.Path:
    return write_jaffe_dir(tmp_path_factory.mktemp("jaffe") / "jaffedbase")


def _config(source="files", fer="", jaffe_dir="", data_dir="", **fields):
    config = fer2013.get_config()
    config.data_source = source
    config.manual_dir = str(fer)
    config.data_dir = str(data_dir)
    config.jaffe.manual_dir = str(jaffe_dir)
    config.update(fields)
    return config


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("source", ["files", "tfds"])
def test_a_good_config_finds_every_stage(source, fer2013_dir, jaffe_dir, tmp_path):
    config = _config(source, fer2013_dir, jaffe_dir, data_dir=tmp_path / "tfds")
    found = data_check.check(config, "train", str(tmp_path / "run"), count=True)
    assert [f.stage.label for f in found] == [
        "FER2013 (training)",
        "JAFFE (cross-validation after FER2013)",
    ]
    assert found[0].path == str(fer2013_dir / "fer2013.csv")
    assert found[0].sizes == dict(zip(files.SPLITS["fer2013"], FER2013_ROWS, strict=True))
    assert found[1].path == str(jaffe_dir) and found[1].sizes == {"train": 35}
    for f in found:
        assert f.source == "files" if source == "files" else f.source.startswith("tfds, built")
    assert not (tmp_path / "tfds").exists() and not (tmp_path / "run").exists()


def test_evaluate_and_cross_validate_check_their_own_data(fer2013_dir, jaffe_dir, tmp_path):
    config = _config("files", fer2013_dir)  # no JAFFE: evaluating needs none
    (found,) = data_check.check(config, "evaluate", str(tmp_path), "public_test", count=True)
    assert found.stage.label == "FER2013 (public_test)" and found.sizes["public_test"] == 10
    cv = jaffe.get_config()
    cv.data_source, cv.init_from = "files", str(tmp_path)
    assert "config.manual_dir is empty" in _error(data_check.check, cv, "cross_validate", "w")
    cv.manual_dir = str(jaffe_dir.parent)  # the folder above jaffedbase works too
    (found,) = data_check.check(cv, "cross_validate", "w")
    assert found.stage.label == "JAFFE (cross-validation)" and found.sizes == {"train": 35}


@pytest.mark.parametrize("source", ["files", "tfds"])
def test_missing_jaffe_names_it_and_both_ways_out(source, fer2013_dir, tmp_path):
    config = _config(source, fer2013_dir, data_dir=tmp_path)
    message = _error(data_check.check, config, "train", "run")
    assert message.startswith(
        "JAFFE (cross-validation after FER2013) not found: config.jaffe.manual_dir is empty"
    )
    if source == "tfds":
        assert f"and no built TFDS 'jaffe' in {tmp_path};" in message
    assert message.endswith(
        "pass --config.jaffe.manual_dir=DIR (the jaffedbase folder of TIFFs, from "
        "https://zenodo.org/record/3451524) or --config.cross_validate=False"
    )
    config.jaffe.manual_dir = str(tmp_path / "nowhere")
    assert f"config.jaffe.manual_dir={tmp_path / 'nowhere'} does not exist" in _error(
        data_check.check, config, "train", "run"
    )
    config.cross_validate = False
    data_check.check(config, "train", "run")


def test_missing_fer2013_names_the_folder_and_where_to_get_it(fer2013_dir, tmp_path):
    message = _error(data_check.check, _config("tfds", data_dir=tmp_path), "train", "run")
    assert message == (
        "FER2013 (training) not found: config.manual_dir is empty and no built TFDS 'fer2013' in "
        f"{tmp_path}; pass --config.manual_dir=DIR (a folder holding fer2013.csv or "
        "fer2013.tar.gz, from Kaggle's \"Challenges in Representation Learning: Facial "
        "Expression Recognition Challenge\") or --config.data_dir=DIR (where TFDS 'fer2013' is "
        "built)"
    )
    csv_file = fer2013_dir / "fer2013.csv"
    message = _error(data_check.check, _config("files", csv_file), "train", "run")
    assert f"config.manual_dir={csv_file} is a file, not the folder holding it" in message
    assert message.endswith("or try the tool without data: --config=configs/synthetic.py")
    message = _error(data_check.check, _config("files", tmp_path), "train", "run")
    assert "no FER2013 file (fer2013.csv, fer2013/fer2013.csv, fer2013.tar.gz, " in message


def test_a_built_tfds_dataset_is_found_as_tfds_sees_it(fer2013_dir, tmp_path):
    import tensorflow_datasets as tfds

    import data_pipelines

    config = _config("tfds", data_dir=tmp_path, cross_validate=False)
    with pytest.raises(UserError):
        data_check.check(config, "train", "run")
    data_pipelines.build("fer2013", data_dir=tmp_path, manual_dir=fer2013_dir)
    builder = tfds.builder("fer2013", data_dir=str(tmp_path))
    assert builder.is_prepared()
    (found,) = data_check.check(config, "train", "run")  # no manual_dir needed now
    assert found.source == "tfds (built)" and found.path == str(builder.data_path)
    assert found.sizes == dict(zip(files.SPLITS["fer2013"], FER2013_ROWS, strict=True))


@pytest.mark.parametrize("layout", ["tar.gz", "icml", "unpacked"])
def test_rows_are_counted_in_every_layout(layout, tmp_path):
    write_fer2013_dir(tmp_path, layout)
    (found,) = data_check.check(
        _config("files", tmp_path, cross_validate=False), "train", "run", count=True
    )
    assert found.sizes == dict(zip(files.SPLITS["fer2013"], FER2013_ROWS, strict=True))


def test_folds_too_small_for_a_batch_are_refused(fer2013_dir, tmp_path):
    small = write_jaffe_dir(tmp_path / "jaffe", subjects=("KA", "KL"))  # 14 images
    config = _config("files", fer2013_dir, small)
    message = _error(data_check.check, config, "train", "run")  # both protocols: 2 subjects
    assert message == (
        "JAFFE (cross-validation after FER2013): cannot split 2 subjects into 5 folds for the "
        "subject folds (config.jaffe.fold_protocol='both'): use more images, fewer "
        "config.jaffe.folds or config.jaffe.fold_protocol='random'"
    )
    config.jaffe.fold_protocol = "random"
    message = _error(data_check.check, config, "train", "run")
    assert message.startswith("JAFFE (cross-validation after FER2013): fold 0 has 11 training")
    assert "fewer than config.jaffe.batch_size=16" in message


@pytest.mark.parametrize(
    "get_config, mode, first",
    [
        (fer2013_cpu.get_config, "train", "  1. FER2013 training: 20 epochs, batch 64, 1 steps"),
        (
            jaffe.get_config,
            "cross_validate",
            "  1. JAFFE cross-validation: 5 folds of each protocol (random, subject), 30 epochs",
        ),
        (synthetic.get_config, "train", "  1. synthetic data training: 4 epochs, batch 32, 14"),
    ],
)
def test_describe_each_config(get_config, mode, first, fer2013_dir, jaffe_dir, tmp_path):
    config = get_config()
    config.data_source = "files"
    config.manual_dir = str(jaffe_dir if mode == "cross_validate" else fer2013_dir)
    if mode == "cross_validate":
        config.init_from = str(tmp_path / "fer2013")
    lines = data_check.describe(config, mode, str(tmp_path / "run"))
    assert lines[1].startswith(first)
    assert any(line.startswith("devices: 1 x cpu") for line in lines)
    assert lines[-1] == "check passed: nothing was compiled, trained or written"
    assert not (tmp_path / "run").exists()
    assert len([line for line in lines if line.startswith("  2. ")]) == (
        get_config is synthetic.get_config
    )


def test_describe_a_workdir_to_resume_refuses_a_changed_recipe_or_a_busy_one(fer2013_dir, tmp_path):
    from fer_jax.training import run_config

    config = _config("files", fer2013_dir, cross_validate=False)
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "7").mkdir(parents=True)
    (workdir / "checkpoints" / "3").mkdir()
    (workdir / run_config.CONFIG_FILE).write_text(run_config.to_json(config))
    lines = data_check.describe(config, "train", str(workdir))
    assert f"workdir: {workdir}: resumes from the checkpoint of step 7" in lines
    config.num_epochs = 5
    message = _error(data_check.describe, config, "train", str(workdir))
    assert "was started with a different recipe: config.num_epochs 300 -> 5" in message
    data_check.describe(config, "train", str(workdir), allow_config_changes=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}
    (workdir / ".lock").write_text(json.dumps(holder))
    message = _error(data_check.describe, config, "train", str(workdir), allow_config_changes=True)
    assert message.startswith(f"workdir {workdir} is in use by process {os.getpid()}")


# The command line. TensorFlow is blocked where the data source is 'files': it must not need it.
_BLOCK_TENSORFLOW = (
    "import runpy, sys\n"
    "sys.modules.update(dict.fromkeys(('tensorflow', 'tensorflow_datasets')))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module('fer_jax.main', run_name='__main__', alter_sys=True)\n"
)


def _main(*args: str, home: pathlib.Path, block_tensorflow: bool = False):
    prefix = ["-c", _BLOCK_TENSORFLOW] if block_tensorflow else ["-m"]
    return subprocess.run(
        [sys.executable, *prefix, "fer_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": str(home)},  # no ~/tensorflow_datasets of the user's
    )


@pytest.mark.parametrize("source", ["tfds", "files"])
def test_missing_jaffe_is_refused_before_any_fer2013_step(source, fer2013_dir, tmp_path):
    workdir = tmp_path / "run"
    result = _main(
        "--config=configs/fer2013.py",
        f"--workdir={workdir}",
        f"--config.data_source={source}",
        f"--config.manual_dir={fer2013_dir}",
        home=tmp_path,
        block_tensorflow=source == "files",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.splitlines()  # one line, nothing else: no work was done
    assert line.startswith("error: JAFFE (cross-validation after FER2013) not found: ")
    assert "--config.jaffe.manual_dir=DIR" in line and "--config.cross_validate=False" in line
    assert not workdir.exists()


def test_check_mode_prints_the_stages_and_exits_0(fer2013_dir, jaffe_dir, tmp_path):
    workdir = tmp_path / "run"
    common = [
        "--config=configs/fer2013.py",
        f"--workdir={workdir}",
        "--config.data_source=files",
        f"--config.manual_dir={fer2013_dir}",
    ]
    jaffe_flag = f"--config.jaffe.manual_dir={jaffe_dir}"
    result = _main(*common, jaffe_flag, "--mode=check", home=tmp_path, block_tensorflow=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "fer_jax.main --mode=train: the config is valid; stages:"
    assert lines[1].startswith("  1. FER2013 training: 300 epochs, batch 64, 1 steps/epoch;")
    assert lines[2] == (
        f"     data (files): {fer2013_dir / 'fer2013.csv'}: train 70, public_test 10, "
        "private_test 10"
    )
    assert lines[3].startswith(
        "  2. JAFFE cross-validation: 5 folds of each protocol (random, subject), 30 epochs a fold"
    )
    assert lines[4] == f"     data (files): {jaffe_dir}: train 35 images, 5 subjects"
    assert not workdir.exists()
    tfds = [*common, jaffe_flag, "--config.data_source=tfds", "--mode=check"]
    result = _main(*tfds, home=tmp_path, block_tensorflow=True)
    assert result.returncode == 2 and result.stderr == (
        "error: FER2013 (training): data_source 'tfds' needs tensorflow_datasets, which is not "
        "installed: pip install -e '.[tfds]', or --config.data_source=files\n"
    )
