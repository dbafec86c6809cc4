"""User errors through the real command lines: exit status 2 and one `error:` line, no traceback
(`--verbose` / FER_JAX_VERBOSE=1 shows it); bugs keep theirs (`fer_jax.user_errors`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fer_jax import user_errors
from fer_jax.user_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = ["--config=configs/synthetic.py", "--config.cross_validate=False"]


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _user_error(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that failed with a user error."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    "flag, message",
    [
        (  # a choice
            "--config.model.cbam=bogus",
            "error: config.model.cbam is 'bogus'; allowed: one of 'channel_first', "
            "'spatial_first', 'parallel', 'none'",
        ),
        ("--config.num_epochs=-1", "error: config.num_epochs is -1; allowed: an integer >= 1"),
        ("--config.num_epochs=abc", "error: config.num_epochs is 'abc'; allowed: an integer >= 1"),
        (
            "--config.modle.width=8",
            "error: --config.modle.width=8: config.modle is not a known field; the closest "
            "known field is config.model",
        ),
    ],
)
def test_config_mistakes_are_one_line_before_any_work(flag, message, tmp_path):
    workdir = tmp_path / "run"
    result = _run("fer_jax.main", f"--workdir={workdir}", *SYNTHETIC, flag)
    assert _user_error(result) == message
    assert result.stderr.strip() == message  # nothing else: no logs, no work done
    assert not workdir.exists()


def test_a_fold_protocol_that_is_none_is_refused_naming_the_field(tmp_path):
    workdir = tmp_path / "run"
    result = _run(
        "fer_jax.main",
        "--mode=cross_validate",
        "--config=configs/jaffe.py",
        f"--workdir={workdir}",
        "--config.init_from=pretrained",
        "--config.fold_protocol=all",
    )
    message = "error: config.fold_protocol is 'all'; allowed: one of 'random', 'subject', 'both'"
    assert result.stderr.strip() == message
    assert not workdir.exists()


def test_missing_dataset_files(tmp_path):
    empty = tmp_path / "downloads"
    empty.mkdir()
    result = _run(
        "fer_jax.main",
        "--config=configs/fer2013.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.data_source=files",
        f"--config.manual_dir={empty}",
        "--config.cross_validate=False",
    )
    line = _user_error(result)  # before any work (fer_jax.training.data_check)
    assert line.startswith("error: FER2013 (training) not found: no FER2013 file (fer2013.csv, ")
    assert f"in config.manual_dir={empty}" in line
    assert "Kaggle's \"Challenges in Representation Learning" in line  # where to get it
    assert not (tmp_path / "run").exists()


def test_unbuilt_tfds_dataset_leads_with_the_files_source(tmp_path):
    import data_pipelines

    with pytest.raises(FileNotFoundError) as e:
        data_pipelines.load_arrays("fer2013", "train", tmp_path)
    first = str(e.value).splitlines()[0]
    assert first.startswith("dataset 'fer2013' is not built")
    assert first.index("--config.data_source=files --config.manual_dir=") < first.index(
        "tfds build"
    )


def test_corrupt_checkpoint_for_predict_and_verbose(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "3"
    for part in ("state", "meta"):
        (step / part).mkdir(parents=True)
        (step / part / "manifest.ocdbt").write_text("not a checkpoint")
    args = [f"--checkpoint={tmp_path / 'run'}", str(tmp_path / "photo.jpg")]
    line = _user_error(_run("fer_jax.predict", *args))
    run = tmp_path / "run"
    assert line == f"error: cannot load the checkpoint {run}: no readable checkpoint at {run}"
    verbose = _run("fer_jax.predict", *args, FER_JAX_VERBOSE="1")
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert "CheckpointError" in verbose.stderr and verbose.stderr.rstrip().endswith(line[7:])


def test_export_of_a_missing_checkpoint(tmp_path):
    result = _run("fer_jax.export", f"--checkpoint={tmp_path / 'none'}", f"--out_dir={tmp_path}")
    assert _user_error(result).startswith(f"error: cannot load the checkpoint {tmp_path / 'none'}")


def test_verbose_flag_shows_the_traceback(tmp_path):
    result = _run(
        "fer_jax.main", f"--workdir={tmp_path}", *SYNTHETIC, "--config.num_epochs=0", "--verbose"
    )
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith(
        "error: config.num_epochs is 0; allowed: an integer >= 1"
    )


def test_bugs_keep_their_traceback_and_user_errors_do_not(capsys):
    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        user_errors.run_cli(bug, [])

    def mistake():
        raise UserError("config.x is 1; allowed: 2")

    assert user_errors.run_cli(mistake, []) == 2
    assert capsys.readouterr().err == "error: config.x is 1; allowed: 2\n"
    assert user_errors.run_cli(lambda: None, []) == 0
    missing = FileNotFoundError(2, "No such file or directory", "/data/x.csv")
    assert user_errors.user_message(missing) == "/data/x.csv: No such file or directory"
    assert user_errors.user_message(ValueError("a bug")) is None
