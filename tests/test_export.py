"""Export round trips: StableHLO (also in a process without fer_jax), SavedModel, TFLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

from fer_jax.inference import export
from tests.test_recognizer import small_model, small_recognizer


def _faces(n: int, seed: int) -> np.ndarray:
    """`(n, 48, 48, 1)` float32 faces in [0, 1], on the uint8 grid."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 48, 48, 1)) / 255).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every format of the small CBAM model, and the in-process probabilities of 5 faces."""
    out_dir = str(tmp_path_factory.mktemp("exported"))
    model, variables = small_model()
    written = export.export_all(model, variables, out_dir, saved_model=True, tflite=True)
    faces = _faces(5, seed=3)
    return written, faces, small_recognizer().predict_faces(faces)


def test_stablehlo_round_trip_with_a_symbolic_batch(exported):
    written, faces, expected = exported
    with open(written["stablehlo"], "rb") as f:
        loaded = jax.export.deserialize(bytearray(f.read()))
    assert set(loaded.platforms) == set(export.DEFAULT_PLATFORMS)
    assert str(loaded.in_avals[0].shape[0]) == "b"
    # Batch 3 here, 5 in the next test: one compilation each.
    np.testing.assert_allclose(loaded.call(faces[:3]), expected[:3], rtol=1e-5, atol=1e-6)


def test_stablehlo_runs_without_fer_jax_flax_or_tensorflow(exported, tmp_path):
    written, faces, expected = exported
    np.save(tmp_path / "faces.npy", faces)
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("fer_jax", "data_pipelines", "flax", "tensorflow"):
            sys.modules[name] = None  # Any import of these now fails.
        import jax, numpy as np
        with open({written["stablehlo"]!r}, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        faces = np.load({str(tmp_path / "faces.npy")!r})
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(exported.call(faces)))
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_saved_model_round_trip(exported):
    import tensorflow as tf

    written, faces, expected = exported
    serve = tf.saved_model.load(written["saved_model"]).signatures["serving_default"]
    spec = serve.structured_input_signature[1][export.INPUT_NAME]
    assert spec.shape.as_list() == [None, 48, 48, 1]  # Any batch size.
    got = serve(faces=tf.constant(faces[:4]))[export.OUTPUT_NAME].numpy()
    np.testing.assert_allclose(got, expected[:4], rtol=1e-5, atol=1e-6)


def test_metadata(exported):
    written, _, _ = exported
    with open(written["metadata"]) as f:
        meta = json.load(f)
    assert meta["class_names"][3] == "happy" and meta["input"]["shape"] == ["batch", 48, 48, 1]
    assert meta["model"] == {"width": 16, "cbam": "channel_first", "head": "softmax"}


def _run_tflite(path: str, faces: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": still in TF 2.21.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    return runner(**{export.INPUT_NAME: faces})[export.OUTPUT_NAME]


def test_tflite_round_trip_with_a_fixed_batch(exported):
    written, faces, expected = exported
    for face, probabilities in zip(faces[:2], expected[:2], strict=True):  # Batch size 1.
        got = _run_tflite(written["tflite"], face[None])
        np.testing.assert_allclose(got, probabilities[None], rtol=1e-4, atol=1e-6)


def test_tflite_needs_a_fixed_batch_size(tmp_path):
    model, variables = small_model()
    with pytest.raises(ValueError, match="batch_size"):
        export.export_tflite(model, variables, str(tmp_path / "m.tflite"), batch_size=0)


def test_exported_program_uses_xla_convolutions_whatever_the_models_conv_impl():
    # 'auto' picks CPU-only forms at trace time (CBAM's 7x7 as shifted sums); a program exported
    # for several platforms keeps XLA's convolutions, one per convolution of the network.
    model, variables = small_model()
    texts = {
        impl: export.export_stablehlo(
            model.clone(conv_impl=impl), variables, platforms=("cpu",)
        ).mlir_module()
        for impl in ("auto", "xla")
    }
    count = texts["xla"].count("stablehlo.convolution")
    assert count == 1 + 8 * 3 + 3  # stem, per block 2 + CBAM's 7x7, 3 shortcuts
    assert texts["auto"].count("stablehlo.convolution") == count
