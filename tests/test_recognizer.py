"""The Python API: image reading, face finding, ten-crop classification, attention maps.

One width-16 randomly initialised model (`random_variables`) is shared by these tests and
tests/test_predict.py, so each function compiles once.
"""

from __future__ import annotations

import functools
import logging

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image
from skimage import data as skimage_data

from data_pipelines.crops import ten_crop
from data_pipelines.faces import crop_face, detect_faces
from data_pipelines.labels import CLASS_NAMES
from fer_jax.inference import recognizer as rec
from fer_jax.model import conv, resnet
from fer_jax.model.resnet import ResNet18

ASTRONAUT_BOX = (177, 66, 95, 95)  # What the Haar cascade finds in skimage's astronaut.


def random_variables(model: ResNet18, seed: int = 0) -> dict:
    """Random `{'params', 'batch_stats'}` for `model`, without compiling `model.init` (~30 s on
    this CPU): He-normal kernels, random biases, BatchNorm affine terms and statistics. Unlike
    Flax's initialisers these give logits of a few units, so probabilities are far from uniform
    and comparisons between them mean something."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 44, 44, 1)))
    rng = np.random.default_rng(seed)

    def init(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        shape, name = leaf.shape, path[-1]
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)  # Biases, BatchNorm means.

    return {
        collection: traverse_util.unflatten_dict(
            {k: init(k, v) for k, v in traverse_util.flatten_dict(shapes[collection]).items()}
        )
        for collection in ("params", "batch_stats")
    }


@functools.cache
def small_model() -> tuple[ResNet18, dict]:
    model = ResNet18(width=16)
    return model, random_variables(model)


@functools.cache
def small_recognizer() -> rec.Recognizer:
    return rec.Recognizer(*small_model(), batch_size=2)


@pytest.fixture(scope="module")
def recognizer() -> rec.Recognizer:
    return small_recognizer()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8)


# ----------------------------------------------------------------------------- model functions


def test_ten_crop_of_a_jax_array_matches_the_evaluation_pipeline():
    faces = np.random.default_rng(0).random((3, 48, 48, 1), dtype=np.float32)
    crops = jax.jit(ten_crop)(jnp.asarray(faces))
    assert isinstance(crops, jax.Array)
    np.testing.assert_array_equal(crops, ten_crop(faces))


@functools.cache
def _reference_outputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray, dict]:
    """Faces `(2, 48, 48)` uint8, the model's logits `(2, 10, 7)` of their ten crops (numpy
    `ten_crop`) and its intermediates, computed without the recogniser's code."""
    model, variables = small_model()
    faces = _faces(2, seed)
    crops = ten_crop(faces[..., None].astype(np.float32) / 255).reshape(20, 44, 44, 1)
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
    logits, state = apply(variables, crops)
    return faces, np.asarray(logits).reshape(2, 10, 7), state["intermediates"]


def test_ten_crop_probabilities_average_logits_then_softmax(recognizer):
    faces, logits, _ = _reference_outputs()
    mean = logits.mean(axis=1)
    expected = np.exp(mean) / np.exp(mean).sum(axis=1, keepdims=True)
    got = recognizer.predict_faces(faces)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert got.max() > 0.3  # The scaled classifier is not near-uniform: comparisons mean something.
    softmax_then_mean = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).mean(axis=1)
    assert not np.allclose(got, softmax_then_mean, atol=1e-4)


def test_one_crop_classifies_the_centre_crop_alone():
    faces, logits, _ = _reference_outputs()
    centre = logits[:, 4]  # TenCrop order: the centre crop is the fifth
    expected = np.exp(centre) / np.exp(centre).sum(axis=1, keepdims=True)
    one = rec.Recognizer(*small_model(), crops=1)
    np.testing.assert_allclose(one.predict_faces(faces), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="crops"):
        rec.Recognizer(*small_model(), crops=5)


def test_padded_batch_sizes_are_powers_of_two_up_to_batch_size(recognizer):
    assert [recognizer.bucket(n) for n in (1, 2)] == [1, 2]
    by_four = rec.Recognizer(*small_model(), batch_size=4)
    assert [by_four.bucket(n) for n in range(1, 5)] == [1, 2, 4, 4]
    assert rec.Recognizer(*small_model(), batch_size=32).bucket(17) == 32
    assert rec.Recognizer(*small_model(), batch_size=24).bucket(17) == 24


def test_predict_faces_is_batched_padded_and_compiled_once_per_bucket(recognizer):
    faces = _faces(7)
    probabilities = recognizer.predict_faces(faces)  # 7 faces: chunks of 2, 2, 2 and 1.
    assert probabilities.shape == (7, 7) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    one_by_one = np.concatenate([recognizer.predict_faces(faces[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(probabilities, one_by_one, atol=1e-6)
    as_float = recognizer.predict_faces(faces[..., None].astype(np.float32) / 255)
    np.testing.assert_allclose(probabilities, as_float, atol=1e-6)
    assert recognizer.predict_faces(faces[:0]).shape == (0, 7)
    # Bucket 1 (the plain-XLA twin) and bucket 2 (the model's convolutions): compiled once each.
    assert [fn._cache_size() for fn in recognizer._probabilities] == [1, 1]


def test_one_face_chunks_run_plain_xla_convolutions_and_agree_with_the_cpu_forms():
    model, variables = small_model()
    cpu = model.clone(conv_impl="auto")
    recognizer = rec.Recognizer(cpu, variables, batch_size=2, matmul_dtype="float32")
    one, many = recognizer._probabilities
    assert one.__wrapped__.args[0].conv_impl == "xla"
    assert many.__wrapped__.args[0].conv_impl == "auto"
    faces = _faces(2)
    together = recognizer.predict_faces(faces)
    alone = np.concatenate([recognizer.predict_faces(faces[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert [fn._cache_size() for fn in recognizer._probabilities] == [1, 1]


def test_matmul_dtype_runs_the_bf16_forms_where_chosen_and_float32_as_before(monkeypatch):
    model, variables = small_model()
    cpu = model.clone(conv_impl="auto")  # the forms with matmuls, as the shipped model's
    faces = _faces(2)
    before = jax.jit(  # the recogniser's program before it had a matmul_dtype
        functools.partial(rec.ten_crop_probabilities, cpu),
        compiler_options=conv.cpu_compiler_options(),
    )
    expected = np.asarray(before(variables, rec.faces_to_input(faces)))
    runs = {}
    for dtype, impl in (("float32", "auto"), ("bfloat16", "auto:bf16")):
        recognizer = rec.Recognizer(cpu, variables, batch_size=2, matmul_dtype=dtype)
        assert recognizer.matmul_dtype == dtype
        assert recognizer._probabilities[1].__wrapped__.args[0].conv_impl == impl
        assert recognizer._probabilities[0].__wrapped__.args[0].conv_impl == "xla"  # one face
        runs[dtype] = recognizer.predict_faces(faces)
    np.testing.assert_array_equal(runs["float32"], expected)  # bit-identical
    assert not np.array_equal(runs["bfloat16"], expected)  # the bf16 operands did run
    # bf16 operands keep 8 significant bits (rounding <= 2^-9 relative) and accumulate in
    # float32: the logits (a few units) move by ~1e-2 through the 18 convolutions.
    np.testing.assert_allclose(runs["bfloat16"], expected, atol=0.02)
    for flags, resolved in (
        ({"avx512_bf16"}, "bfloat16"),
        ({"amx_bf16"}, "bfloat16"),
        (set(), "float32"),
    ):
        monkeypatch.setattr(resnet, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert rec.Recognizer(cpu, variables).matmul_dtype == resolved  # the default: 'auto'
    as_built = rec.Recognizer(cpu.clone(conv_impl="auto:bf16"), variables, matmul_dtype=None)
    assert as_built.matmul_dtype == "bfloat16"
    assert rec.Recognizer(model, variables, matmul_dtype="bfloat16").model.conv_impl == "xla"
    with pytest.raises(ValueError, match="matmul_dtype"):
        rec.Recognizer(cpu, variables, matmul_dtype="float16")


@pytest.mark.parametrize(
    "faces, match",
    [
        (np.zeros((2, 44, 44), np.uint8), r"\(N, 48, 48\)"),
        (np.zeros((48, 48), np.uint8), r"\(N, 48, 48\)"),
        (np.full((1, 48, 48), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((1, 48, 48), np.int32), "uint8 or float"),
    ],
)
def test_predict_faces_rejects_bad_batches(recognizer, faces, match):
    with pytest.raises(ValueError, match=match):
        recognizer.predict_faces(faces)


def _centre_crop_spatial_attention(intermediates: dict, block: str) -> np.ndarray:
    """`(2, H * W)` spatial attention of `block` on crop 4 of the ten: the centre crop."""
    maps = np.asarray(intermediates[block]["cbam"]["spatial_attention"][0])
    return maps.reshape(2, 10, -1)[:, 4]


def test_attention_maps_are_the_last_block_of_each_stage_on_the_centre_crop(recognizer):
    faces, _, intermediates = _reference_outputs()
    maps = recognizer.attention_maps(faces[:1])  # One face: the bucket the photos use.
    assert maps.shape == (1, 4, 44, 44) and maps.dtype == np.float32
    assert np.all((maps > 0) & (maps < 1))
    stage1 = _centre_crop_spatial_attention(intermediates, "layer1_1")[:1]
    np.testing.assert_allclose(maps[:, 0].reshape(1, -1), stage1, atol=1e-6)  # 44x44: identity.
    other_block = _centre_crop_spatial_attention(intermediates, "layer1_0")[:1]
    assert not np.allclose(maps[:, 0].reshape(1, -1), other_block, atol=1e-3)
    stage4 = _centre_crop_spatial_attention(intermediates, "layer4_1")[:1]
    assert stage4.shape == (1, 36)  # 6x6, resized to 44x44.
    np.testing.assert_allclose(maps[:, 3].mean(axis=(1, 2)), stage4.mean(axis=1), atol=0.05)


def test_attention_needs_cbam():
    model = ResNet18(width=8, cbam=None)
    x = jnp.zeros((1, 44, 44, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="no CBAM"):
        jax.eval_shape(
            functools.partial(rec.centre_crop_attention, model),
            variables,
            jnp.zeros((1, 48, 48, 1)),
        )


def test_recognizer_checks_its_arguments():
    model, variables = small_model()
    with pytest.raises(ValueError, match="3 class names for a model with 7 outputs"):
        rec.Recognizer(model, variables, class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="batch_stats"):
        rec.Recognizer(model, {"params": variables["params"]})


# ----------------------------------------------------------------------------- predict


def _check_astronaut(faces: list[rec.Face], reference: np.ndarray | None = None) -> None:
    assert len(faces) == 1
    face = faces[0]
    assert face.box == ASTRONAUT_BOX
    assert face.probabilities.shape == (7,)
    np.testing.assert_allclose(face.probabilities.sum(), 1, atol=1e-5)
    assert face.label == CLASS_NAMES[int(np.argmax(face.probabilities))]
    if reference is not None:
        np.testing.assert_allclose(face.probabilities, reference, atol=1e-6)


def test_predict_on_a_real_photo_matches_the_manual_pipeline(recognizer, astronaut):
    faces = recognizer.predict(astronaut)
    gray = _gray(astronaut)
    x, y, w, h = detect_faces(gray, min_size=(40, 40))[0]
    # By default the face is the detector's box itself (PHOTO_MARGIN: FER2013's framing).
    crop = cv2.resize(gray[y : y + h, x : x + w], (48, 48), interpolation=cv2.INTER_AREA)
    _check_astronaut(faces, recognizer.predict_faces(crop[None])[0])
    assert faces[0].attention is None


def test_predict_accepts_every_input_kind(recognizer, astronaut, tmp_path):
    reference = recognizer.predict(astronaut)[0].probabilities
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    rgba = np.concatenate([astronaut, np.full((*astronaut.shape[:2], 1), 255, np.uint8)], -1)
    inputs = {
        "str path": str(path),
        "pathlib path": path,
        "PIL image": Image.open(path),
        "gray uint8": _gray(astronaut),
        "gray (H, W, 1)": _gray(astronaut)[..., None],
        "RGBA uint8": rgba,
        "RGB uint16": astronaut.astype(np.uint16) * 257,
        "RGB float": astronaut.astype(np.float64) / 255,
    }
    for kind, image in inputs.items():
        faces = recognizer.predict(image)
        assert len(faces) == 1, kind
        _check_astronaut(faces, reference)


def test_exif_orientation_is_honoured(recognizer, astronaut, tmp_path):
    stored = Image.fromarray(astronaut).transpose(Image.Transpose.ROTATE_90)  # Lying on its side.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    np.testing.assert_array_equal(rec.read_image(path), astronaut)
    _check_astronaut(recognizer.predict(path))
    assert recognizer.predict(np.asarray(stored)) == []  # Without EXIF: a face on its side.


def test_16_bit_images_are_scaled_by_the_dtype_range(tmp_path):
    values = np.array([[0, 257, 128 * 257], [65535, 65534, 1000]], np.uint16)
    np.testing.assert_array_equal(rec.to_uint8(values), [[0, 1, 128], [255, 255, 4]])
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), np.tile(values, (4, 4)))
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(rec.read_image(path), rec.to_uint8(np.tile(values, (4, 4))))
    signed = np.array([[-32768, 32767]], np.int16)
    np.testing.assert_array_equal(rec.to_uint8(signed), [[0, 255]])


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # Opaque red-ish; the rest transparent.
    rgba[0, 1, 3] = 0
    rgba[1, :, 3] = 128
    out = rec.to_uint8(rgba)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 0], [227, 127, 127])  # 200 a + 255 (1 - a), a = 128/255.


def test_large_images_are_downscaled_for_detection(recognizer, astronaut):
    big = cv2.resize(astronaut, (3072, 3072), interpolation=cv2.INTER_LINEAR)  # 6x.
    faces = recognizer.predict(big)  # Largest first; the 6x image shows a few false positives.
    np.testing.assert_allclose(faces[0].box, np.multiply(ASTRONAUT_BOX, 6), atol=6 * 12)
    small_only = rec.find_faces(_gray(big), max_side=512)
    np.testing.assert_allclose(small_only[0], np.multiply(ASTRONAUT_BOX, 6), atol=6 * 2)


def test_given_boxes_replace_detection(recognizer, astronaut):
    reference = recognizer.predict(astronaut)[0].probabilities
    faces = recognizer.predict(astronaut, boxes=[ASTRONAUT_BOX, (0, 0, 100, 120)])
    assert [f.box for f in faces] == [ASTRONAUT_BOX, (0, 0, 100, 120)]
    np.testing.assert_allclose(faces[0].probabilities, reference, atol=1e-6)
    assert not np.allclose(faces[1].probabilities, reference, atol=1e-3)
    for bad in ([(600, 0, 10, 10)], [(0, 0, 0, 10)], [[1, 2, 3]]):
        with pytest.raises(rec.ImageError, match="<numpy.ndarray>: face box"):
            recognizer.predict(astronaut, boxes=bad)


def test_attention_on_a_photo(recognizer, astronaut):
    faces = recognizer.predict(astronaut, attention=True)
    assert len(faces) == 1 and faces[0].attention.shape == (4, 44, 44)
    crop = crop_face(_gray(astronaut), faces[0].box, margin=recognizer.margin)
    np.testing.assert_allclose(faces[0].attention, recognizer.attention_maps(crop[None])[0])


def test_no_face_is_an_empty_result_and_a_message(recognizer, caplog):
    with caplog.at_level(logging.WARNING, logger="fer_jax.inference.recognizer"):
        assert recognizer.predict(np.full((300, 400), 128, np.uint8)) == []
    assert "<numpy.ndarray>: no face found" in caplog.text


# ----------------------------------------------------------------------------- bad input


def test_bad_files_are_reported_by_name(recognizer, astronaut, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    png = tmp_path / "cut.png"
    Image.fromarray(astronaut).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:5000])
    cases = {
        str(tmp_path / "missing.png"): "no such file",
        str(text): "not an image file",
        str(truncated): "cannot read the image",
        str(tmp_path): "is a directory",
    }
    for path, problem in cases.items():
        with pytest.raises(rec.ImageError) as info:
            recognizer.predict(path)
        assert str(info.value).startswith(f"{path}: {problem}")


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((8, 8, 5), np.uint8), "got shape"),
        (np.zeros((0, 8), np.uint8), "empty"),
        (np.full((8, 8), 3.0), r"float images must be in \[0, 1\]"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.zeros((8, 8), np.complex64), "unsupported pixel type"),
    ],
)
def test_bad_arrays_are_rejected(array, match):
    with pytest.raises(rec.ImageError, match=match):
        rec.read_image(array)


def test_unsupported_source_type():
    with pytest.raises(rec.ImageError, match="expected a path, a PIL image or a numpy array"):
        rec.read_image(12)
