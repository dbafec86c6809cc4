"""The pretrained model shipped in the package (`fer_jax.model.pretrained`) and the word
`pretrained` wherever a checkpoint goes, with a width-8 model's weights saved to a temporary weights
directory (`$FER_JAX_WEIGHTS_DIR`), and the bundled example photo."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import fer2013, synthetic
from data_pipelines import synthetic as synthetic_files
from data_pipelines.labels import CLASS_NAMES
from fer_jax.inference.predict import EXAMPLE_IMAGE
from fer_jax.inference.recognizer import Recognizer, find_faces, read_image, to_gray
from fer_jax.inference.save_pretrained import main as convert_main
from fer_jax.model import pretrained
from fer_jax.training import checkpoint
from fer_jax.training.step import create_model, create_train_state
from fer_jax.user_errors import UserError
from tests.test_cli_errors import _run
from tests.test_recognizer import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVENANCE = {"source": "runs/test", "step": 42, "accuracies": {"private_test_accuracy": 0.5}}
SHIPPED_EXAMPLE_LABEL = "happy"  # the shipped model on the bundled photo: p = 0.977


def _config():
    return synthetic.get_config()  # the width-8 model


def _bf16(tree):
    return jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`(weights dir, model config, variables)`: the width-8 model's random weights saved as
    the default model in a weights directory of their own."""
    config = _config()
    variables = random_variables(create_model(config), seed=3)
    directory = tmp_path_factory.mktemp("weights")
    path = directory / f"{pretrained.DEFAULT_NAME}.npz"
    pretrained.save(variables, config.model.to_dict(), path, meta=PROVENANCE)
    return directory, config.model.to_dict(), variables


@pytest.fixture
def weights_env(saved, monkeypatch):
    """`$FER_JAX_WEIGHTS_DIR` pointing at `saved`'s directory; returns the default model's path."""
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(saved[0]))
    return pretrained.resolve(None)


def _copy(saved, tmp_path, name="copy"):
    """The saved model's two files copied into `tmp_path`; returns the `.npz` path."""
    source = saved[0] / pretrained.DEFAULT_NAME
    for suffix in (".npz", ".json"):
        (tmp_path / f"{name}{suffix}").write_bytes(source.with_suffix(suffix).read_bytes())
    return tmp_path / f"{name}.npz"


# ----------------------------------------------------------------------------- the file


def test_save_then_load_rounds_params_to_bfloat16_keeps_bn_stats_and_metadata(saved, weights_env):
    _, model_config, variables = saved
    loaded_config, loaded, meta = pretrained.load()
    assert loaded_config == model_config
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], _bf16(variables["params"]))
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], variables["batch_stats"])
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(loaded))
    rounded = jax.tree.map(np.array_equal, loaded["params"], variables["params"])
    assert not all(jax.tree.leaves(rounded))  # bfloat16 did round: the test compares something
    assert meta["provenance"] == PROVENANCE and meta["class_names"] == list(CLASS_NAMES)
    assert meta["leaves"]["params/conv1/kernel"]["dtype"] == "bfloat16"
    assert meta["leaves"]["batch_stats/bn1/var"] == {"shape": [8], "dtype": "float32"}
    manifest = pretrained.read_manifest()
    assert manifest["bytes"] == os.path.getsize(weights_env) and manifest["meta"]["model"] == (
        model_config
    )
    assert pretrained.available() and pretrained.names() == [pretrained.DEFAULT_NAME]


def test_saving_the_same_variables_gives_the_same_bytes(saved, tmp_path):
    _, model_config, variables = saved
    for sub in ("a", "b"):
        pretrained.save(variables, model_config, tmp_path / sub / "m.npz", meta=PROVENANCE)
    assert (tmp_path / "a/m.npz").read_bytes() == (tmp_path / "b/m.npz").read_bytes()


def test_a_flipped_byte_is_a_sha256_mismatch_naming_the_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load(path)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith(f"{path}: sha256 mismatch (corrupt or incomplete file); ")


def test_a_truncated_file_is_a_size_mismatch_naming_the_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 3])
    with pytest.raises(pretrained.PretrainedError, match="truncated or incomplete") as e:
        pretrained.load(path)
    assert str(e.value).startswith(f"{path}: {size // 3} bytes, its manifest says {size} ")


def test_missing_file_or_manifest_names_the_file(saved, tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="no such pretrained weights file"):
        pretrained.load(tmp_path / "absent.npz")
    path = _copy(saved, tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load(path)
    assert str(e.value).startswith(f"{path}: its manifest copy.json is missing")


def test_missing_arrays_and_wrong_shapes_are_reported_against_the_model(saved, tmp_path):
    _, model_config, variables = saved
    lacking = jax.tree.map(lambda a: a, variables)
    del lacking["params"]["linear"]
    path = pretrained.save(lacking, model_config, tmp_path / "lacking.npz", meta={})
    with pytest.raises(pretrained.PretrainedError, match=r"missing \[.params/linear/"):
        pretrained.load(path)
    wide = {**model_config, "width": 16}  # the arrays of width 8 under a width-16 description
    path = pretrained.save(variables, wide, tmp_path / "wide.npz", meta={})
    with pytest.raises(pretrained.PretrainedError, match="has shape .*, its model needs"):
        pretrained.load(path)


def test_default_weights_not_installed_is_one_error_pointing_to_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path))
    assert not pretrained.available()
    for load in (pretrained.load, lambda: checkpoint.load_variables("pretrained")):
        with pytest.raises(pretrained.NotInstalledError) as e:
            load()
        assert "no pretrained model is installed" in str(e.value)
        assert "--checkpoint=RUN_DIR" in str(e.value)
    with pytest.raises(pretrained.NotInstalledError):
        Recognizer.pretrained()


def test_the_shipped_weights_directory_is_package_data():
    assert pretrained.weights_dir().endswith(os.path.join("fer_jax", "weights"))
    assert os.path.isfile(os.path.join(pretrained.weights_dir(), "README.md"))
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    for pattern in ("weights/*.npz", "weights/*.json", "examples/*.jpg"):
        assert f'"{pattern}"' in text


# ----------------------------------------------------------------------------- as a checkpoint


def test_pretrained_names_a_checkpoint_in_load_variables(saved, weights_env, tmp_path):
    _, model_config, variables = saved
    other = _copy(saved, tmp_path, "other")
    for reference in ("pretrained", f"pretrained:{pretrained.DEFAULT_NAME}", str(other)):
        loaded, meta, source = checkpoint.load_variables(reference)
        assert meta["model"] == model_config and meta["step"] == 42
        assert checkpoint.replica_count(meta) == 1
        jax.tree.map(np.testing.assert_array_equal, loaded["params"], _bf16(variables["params"]))
    assert source == str(other)


def test_init_from_pretrained_loads_into_a_fresh_train_state(saved, weights_env):
    _, _, variables = saved
    config = fer2013.get_config()
    config.model.width = 8
    model = create_model(config)
    shapes = jax.eval_shape(lambda: create_train_state(config, model, steps_per_epoch=1))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = checkpoint.init_from("pretrained", template, config)
    jax.tree.map(np.testing.assert_array_equal, state.params, _bf16(variables["params"]))
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, variables["batch_stats"])
    assert int(state.step) == 0  # a fresh optimizer and step
    config.model.width = 16
    with pytest.raises(checkpoint.CheckpointError, match="incompatible model"):
        checkpoint.init_from("pretrained", template, config)


def _write_run(tmp_path, config, variables, step=7):
    """A run directory whose best checkpoint (at `step`) holds `variables`; returns its path."""
    model = create_model(config)
    shapes = jax.eval_shape(lambda: create_train_state(config, model, steps_per_epoch=1))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes).replace(**variables)
    run = tmp_path / "run"
    checkpoints = checkpoint.Checkpoints(str(run), config)
    checkpoints.maybe_save_best(step, state, {"epoch": 1}, {"accuracy": 0.4})
    checkpoints.close()
    return run


def test_converter_writes_a_runs_selected_checkpoint_with_its_accuracies(saved, tmp_path):
    _, _, variables = saved
    config = _config()
    run = _write_run(tmp_path, config, variables)
    results = {"selected_step": 7, "selected_on": "public_test", "select_accuracy": 0.4}
    results |= {"report_split": "private_test", "private_test": {"accuracy": 0.35}}
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "weights" / "mine.npz"
    assert convert_main([f"--from={run}", f"--out={out}"]) == 0
    model_config, loaded, meta = pretrained.load(out)
    assert model_config == config.model.to_dict()
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], _bf16(variables["params"]))
    provenance = meta["provenance"]
    assert provenance["step"] == 7 and provenance["epoch"] == 1
    assert "trained_matmul_dtype" not in provenance
    assert provenance["accuracies"] == {
        "selected_on": "public_test",
        "select_accuracy": 0.4,
        "private_test_accuracy": 0.35,
    }
    (run / "results.json").write_text(json.dumps({**results, "selected_step": 9}))
    assert convert_main([f"--from={run}", f"--out={out}"]) == 2  # results of another step


def test_a_run_trained_with_bfloat16_matmuls_ships_float32_ones_unless_asked(saved, tmp_path):
    _, _, variables = saved
    config = _config()
    config.model.matmul_dtype = "bfloat16"
    run = _write_run(tmp_path, config, variables)
    out = tmp_path / "weights" / "mine.npz"
    assert convert_main([f"--from={run}", f"--out={out}"]) == 0
    model_config, _, meta = pretrained.load(out)
    assert model_config == {**config.model.to_dict(), "matmul_dtype": "float32"}
    assert meta["provenance"]["trained_matmul_dtype"] == "bfloat16"
    assert convert_main([f"--from={run}", f"--out={out}", "--matmul_dtype=bfloat16"]) == 0
    model_config, _, meta = pretrained.load(out)
    assert model_config["matmul_dtype"] == "bfloat16"
    assert "trained_matmul_dtype" not in meta["provenance"]


def test_the_shipped_file_records_what_auto_resolved_to_and_the_loss_it_ended_at(saved, tmp_path):
    _, _, variables = saved
    config = _config()
    config.model.matmul_dtype = "auto"
    config.loss.lambda_base, config.loss.lambda_min = 48.0, 48.0
    run = _write_run(tmp_path, config, variables)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    results = {"selected_step": 7, "matmul_dtype_resolved": "bfloat16"}
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "weights" / "mine.npz"
    assert convert_main([f"--from={run}", f"--out={out}"]) == 0
    provenance = pretrained.load(out)[2]["provenance"]
    assert provenance["trained_matmul_dtype"] == "bfloat16"  # not 'auto'
    assert provenance["loss"] == {"margin": 4, "lambda": 48.0}


# ----------------------------------------------------------------------------- the example photo


def test_the_bundled_example_photo_is_small_and_has_a_face():
    assert os.path.getsize(EXAMPLE_IMAGE) < 150_000
    assert len(find_faces(to_gray(read_image(EXAMPLE_IMAGE)))) == 1


def test_recognizer_pretrained_reads_the_example(saved, weights_env):
    recognizer = Recognizer.pretrained(batch_size=2)
    assert recognizer.model.width == 8 and recognizer.class_names == CLASS_NAMES
    (face,) = recognizer.predict(EXAMPLE_IMAGE)
    assert face.label in CLASS_NAMES
    np.testing.assert_allclose(face.probabilities.sum(), 1, atol=1e-5)


# ----------------------------------------------------------------------------- command lines


def test_predict_example_without_checkpoint_uses_the_pretrained_model(saved):
    result = _run(
        "fer_jax.predict", "--example", "--batch_size=2", FER_JAX_WEIGHTS_DIR=str(saved[0])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{EXAMPLE_IMAGE}: 1 face"
    assert lines[2].split()[-1] in CLASS_NAMES  # the face's row ends with its label


def test_predict_with_corrupt_weights_is_one_error_line(saved, tmp_path):
    path = _copy(saved, tmp_path, pretrained.DEFAULT_NAME)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    result = _run("fer_jax.predict", "--example", FER_JAX_WEIGHTS_DIR=str(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {path}: sha256 mismatch (corrupt or incomplete file); reinstall fer_jax"
    ], result.stderr[-3000:]


@pytest.mark.parametrize("crops, report", [("10", "private_test_evaluate"), ("1", None)])
def test_evaluate_pretrained_on_a_files_split_writes_its_report(saved, tmp_path, crops, report):
    report = report or "private_test_evaluate_centre_crop"
    rows = synthetic_files.fer2013_rows((4, 4, 12), seed=1)
    text = synthetic_files.fer2013_csv_text(rows["images"], rows["labels"], rows["usages"])
    synthetic_files.write_fer2013(tmp_path / "fer2013", text)
    workdir = tmp_path / "eval_run"
    result = _run(
        "fer_jax.main",
        f"--crops={crops}",
        "--mode=evaluate",
        "--checkpoint=pretrained",
        "--config=configs/fer2013.py",
        "--config.model.width=8",
        "--config.data_source=files",
        f"--config.manual_dir={tmp_path / 'fer2013'}",
        "--config.eval_batch_size=16",
        f"--workdir={workdir}",
        "--split=private_test",
        FER_JAX_WEIGHTS_DIR=str(saved[0]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "eval" / f"{report}.json").read_text())
    assert metrics["num_examples"] == 12
    assert f"{report}: " in result.stdout


# ----------------------------------------------------------------------------- the shipped model


def test_the_shipped_model_matches_its_manifest_and_reads_the_example_photo(monkeypatch):
    """The real weights in `fer_jax/weights/` (full width): size within the package budget,
    checksum verified on load, provenance from a run chosen on PublicTest, and the same label
    on the bundled photo as when they were made."""
    monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV, raising=False)
    path = pretrained.resolve(None)
    assert os.path.getsize(path) <= 25 * 2**20
    meta = pretrained.read_manifest(None)["meta"]
    assert meta["model"]["width"] == 64 and meta["class_names"] == list(CLASS_NAMES)
    assert meta["provenance"]["accuracies"]["selected_on"] == "public_test"
    recognizer = Recognizer.pretrained()
    (face,) = recognizer.predict(EXAMPLE_IMAGE)
    assert face.label == SHIPPED_EXAMPLE_LABEL, face.probabilities
    np.testing.assert_allclose(face.probabilities.sum(), 1, atol=1e-5)
