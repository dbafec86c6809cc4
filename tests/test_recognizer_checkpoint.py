"""`Recognizer.from_checkpoint`, the predict CLI and the export CLI on a run the trainer wrote."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from configs import synthetic
from fer_jax.inference import export, predict
from fer_jax.inference.recognizer import Recognizer
from fer_jax.training import checkpoint
from fer_jax.training.step import create_model, create_train_state
from tests.test_recognizer import random_variables


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir with one checkpoint of the synthetic config's width-8 model, saved by
    `fer_jax.training.checkpoint`; returns `(workdir, model, variables)`."""
    config = synthetic.get_config()
    model = create_model(config)
    # The state's structure without compiling `model.init`; random weights (tests/test_recognizer).
    template = jax.eval_shape(lambda: create_train_state(config, model, steps_per_epoch=1))
    variables = random_variables(model, seed=2)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template).replace(**variables)
    workdir = str(tmp_path_factory.mktemp("run"))
    checkpoints = checkpoint.Checkpoints(workdir, config)
    checkpoints.save(7, state, {"epoch": 1})
    checkpoints.close()
    return workdir, model, variables


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return Recognizer.from_checkpoint(run_dir[0], batch_size=2)


def test_from_checkpoint_restores_the_saved_model_and_weights(run_dir, photo, loaded):
    _, model, variables = run_dir
    assert loaded.model.width == 8 and loaded.model.cbam == "channel_first"
    assert loaded.model.head == model.head and loaded.model.num_classes == 7
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)
    (face,) = loaded.predict(photo)
    np.testing.assert_allclose(face.probabilities.sum(), 1, atol=1e-5)


def test_predict_cli_with_a_run_directory(run_dir, photo, loaded, tmp_path):
    output = tmp_path / "out.json"
    argv = [f"--checkpoint={run_dir[0]}", "--json", "--batch_size=2", f"--output={output}", photo]
    assert predict.main(argv) == 0
    (record,) = json.loads(output.read_text())
    expected = loaded.predict(photo)[0]
    assert record["faces"][0]["box"] == list(expected.box)
    got = list(record["faces"][0]["probabilities"].values())
    np.testing.assert_allclose(got, expected.probabilities, rtol=1e-5, atol=1e-6)


def test_export_cli_with_a_run_directory(run_dir, tmp_path, capsys):
    assert export.main([f"--checkpoint={run_dir[0]}", f"--out_dir={tmp_path}"]) == 0
    assert f"stablehlo: {tmp_path / export.STABLEHLO_FILE}" in capsys.readouterr().out
    faces = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 1)).astype(np.float32) / 255
    with open(tmp_path / export.STABLEHLO_FILE, "rb") as f:
        got = jax.export.deserialize(bytearray(f.read())).call(faces)
    # The export computes in float32 (XLA's convolutions): the recogniser's float32 twin.
    float32 = Recognizer.from_checkpoint(run_dir[0], batch_size=2, matmul_dtype="float32")
    expected = float32.predict_faces(faces)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)  # Different faces differ.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert export.main([f"--checkpoint={tmp_path / 'none'}", f"--out_dir={tmp_path}"]) == 2
