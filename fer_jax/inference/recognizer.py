"""Expression recognition on photos: find the faces, crop them to 48x48, classify ten crops.

The steps (docs/prediction_and_export.md, What happens to a photo): `read_image`, `find_faces`
(or the caller's boxes), `crop_face` at `PHOTO_MARGIN`, `ten_crop_probabilities`. Attention
(`centre_crop_attention`): the CBAM spatial gate of each stage's last block on the centre 44x44
crop, resized to 44x44; pixel (r, c) covers pixel (r + 2, c + 2) of the 48x48 face.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.crops import (
    CENTRE_CROP_INDEX,
    CROP_CHOICES,
    CROP_SIZE,
    NUM_CROPS,
    ten_crop,
)
from data_pipelines.faces import crop_face, detect_faces
from data_pipelines.labels import CLASS_NAMES
from fer_jax.model import conv
from fer_jax.model.resnet import (
    BLOCKS_PER_STAGE,
    STAGE_STRIDES,
    ResNet18,
    with_matmul_dtype,
)

FACE_SIZE = 48
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_SIDE = 1024
DEFAULT_MIN_FACE = 40
# Operands of the CPU convolution forms' matmuls (`Recognizer(matmul_dtype=...)`): bfloat16 where
# the CPU multiplies it natively (docs/prediction_and_export.md, float32 or bfloat16).
DEFAULT_MATMUL_DTYPE = "auto"
# The photo path's crop margin: the detector's box as it is, the framing the model learned (the
# box covers 0.97-0.98 of FER2013's own frame: docs/prediction_and_export.md, On faces outside
# FER2013; `experiments/photo_framing.py`).
PHOTO_MARGIN = 0.0
NUM_STAGES = len(STAGE_STRIDES)

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input image cannot be read or used; the message names the image and the problem."""


@dataclasses.dataclass(frozen=True)
class Face:
    """One face: `box` (x, y, w, h) in pixels of the EXIF-rotated image, `probabilities`
    `(num_classes,)` float32, the top `label`, `attention` `(4, 44, 44)` in (0, 1) or None."""

    box: tuple[int, int, int, int]
    probabilities: np.ndarray
    label: str
    attention: np.ndarray | None = None


# ----------------------------------------------------------------------------- image input


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__module__}.{type(source).__name__}>"


def to_uint8(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """`(H, W)` gray or `(H, W, 3)` RGB uint8 of a gray (+ alpha), RGB or RGBA array: integers
    scaled by their dtype's range, bool to {0, 255}, floats in [0, 1]; alpha onto white."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ImageError(
            f"{name}: expected an (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA image, "
            f"got shape {array.shape}"
        )
    if min(array.shape[:2]) == 0:
        raise ImageError(f"{name}: the image is empty (shape {array.shape})")
    has_alpha = array.ndim == 3 and array.shape[-1] in (2, 4)
    if array.dtype == np.uint8 and not has_alpha:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        unit = array.astype(np.float64)
    elif np.issubdtype(array.dtype, np.integer):  # uint8 with alpha too
        info = np.iinfo(array.dtype)
        unit = (array.astype(np.float64) - info.min) / (float(info.max) - info.min)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError(f"{name}: the float image has NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ImageError(
                f"{name}: float images must be in [0, 1], got values in "
                f"[{array.min():g}, {array.max():g}]"
            )
        unit = array.astype(np.float64)
    else:
        raise ImageError(f"{name}: unsupported pixel type {array.dtype}")
    if has_alpha:
        colour, alpha = unit[..., :-1], unit[..., -1:]
        unit = colour * alpha + (1 - alpha)
        if unit.shape[-1] == 1:
            unit = unit[..., 0]
    return np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """The pixels of a PIL image, in a layout `to_uint8` accepts."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("1", "L", "LA", "RGB", "RGBA", "F") or image.mode.startswith("I;16"):
        return np.asarray(image)
    if image.mode == "I":  # 32-bit integers; older Pillows read 16-bit PNGs this way.
        array = np.asarray(image)
        if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
            return array.astype(np.uint16)
        return array
    has_alpha = "A" in image.mode or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))


def read_image(source: ImageLike) -> np.ndarray:
    """`(H, W)` gray or `(H, W, 3)` RGB uint8 (`to_uint8`) of a path (any format Pillow reads),
    a PIL image or an array, EXIF orientation applied; ImageError naming what cannot be read."""
    name = _describe(source)
    if isinstance(source, np.ndarray):
        return to_uint8(source, name)
    if isinstance(source, Image.Image):
        return to_uint8(_pil_to_array(source), name)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"{name}: expected a path, a PIL image or a numpy array")
    if not os.path.exists(source):
        raise ImageError(f"{name}: no such file")
    if os.path.isdir(source):
        raise ImageError(f"{name}: is a directory, not an image")
    try:
        with Image.open(source) as image:
            image.load()
            array = _pil_to_array(image)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot read the image: {e}") from e
    return to_uint8(array, name)


def to_gray(image: np.ndarray) -> np.ndarray:
    """`(H, W)` or `(H, W, 3)` RGB uint8 -> `(H, W)` uint8 (ITU-R 601 luma, as OpenCV)."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ----------------------------------------------------------------------------- faces


def find_faces(
    gray: np.ndarray, *, max_side: int = DEFAULT_MAX_SIDE, min_face: int = DEFAULT_MIN_FACE
) -> np.ndarray:
    """Face boxes `(N, 4)` int64 `[x, y, w, h]` in `gray`'s pixels, largest first, detected on a
    copy at most `max_side` pixels long; `min_face`: smallest side in full-image pixels."""
    if max_side < 24 or min_face < 1:
        raise ValueError(f"need max_side >= 24 and min_face >= 1, got {max_side}, {min_face}")
    scale = min(1.0, max_side / max(gray.shape))
    small = gray
    if scale < 1:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    side = max(24, round(min_face * scale))
    boxes = detect_faces(small, min_size=(side, side))
    return np.round(boxes / scale).astype(np.int64).reshape(-1, 4)


def check_boxes(boxes: Any, shape: tuple[int, ...], name: str = "<array>") -> np.ndarray:
    """Validates caller-given boxes `[[x, y, w, h], ...]` against an image of `shape`."""
    try:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    except (TypeError, ValueError):
        raise ImageError(f"{name}: face boxes must be [x, y, w, h] rows, got {boxes!r}") from None
    height, width = shape[:2]
    for x, y, w, h in boxes:
        if w <= 0 or h <= 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise ImageError(
                f"{name}: face box {[x, y, w, h]} is empty or outside the {width}x{height} image"
            )
    return np.round(boxes).astype(np.int64)


# ----------------------------------------------------------------------------- model functions


def ten_crop_probabilities(
    model: ResNet18, variables: Any, faces: jax.Array, crops: int = NUM_CROPS
) -> jax.Array:
    """`(B, num_classes)` softmax of the ten crops' mean logits of `(B, 48, 48, 1)` float32
    faces in [0, 1]; `crops=1`: the centre crop alone, a tenth of the compute."""
    images = ten_crop(faces)  # (B, 10, 44, 44, C); the centre crop is the fifth
    images = images if crops == NUM_CROPS else images[:, CENTRE_CROP_INDEX, None]
    batch = images.shape[0]
    flat = images.reshape((batch * crops, CROP_SIZE, CROP_SIZE, images.shape[-1]))
    logits = model.apply(variables, flat, train=False)
    logits = logits.reshape((batch, crops, logits.shape[-1])).mean(axis=1)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def ensemble_probabilities(
    model: ResNet18, variables: Any, faces: jax.Array, crops: int = NUM_CROPS
) -> jax.Array:
    """`ten_crop_probabilities` averaged over K models stacked `(K, ...)` in `variables`."""
    one = functools.partial(ten_crop_probabilities, model, crops=crops)
    per_model = jax.vmap(one, in_axes=(0, None))(variables, faces)
    return per_model.mean(axis=0)


def centre_crop_attention(model: ResNet18, variables: Any, faces: jax.Array) -> jax.Array:
    """`(B, 4, 44, 44)` spatial attention of `(B, 48, 48, 1)` faces (module docstring)."""
    if model.cbam is None:
        raise ValueError("the model has no CBAM modules, hence no attention maps")
    centre = ten_crop(faces)[:, CENTRE_CROP_INDEX]
    _, state = model.apply(variables, centre, train=False, mutable=["intermediates"])
    blocks = state["intermediates"]
    maps = []
    for stage in range(1, NUM_STAGES + 1):
        gate = blocks[f"layer{stage}_{BLOCKS_PER_STAGE - 1}"]["cbam"]["spatial_attention"][0]
        resized = jax.image.resize(
            gate[..., 0].astype(jnp.float32), (gate.shape[0], CROP_SIZE, CROP_SIZE), "linear"
        )
        maps.append(resized)
    return jnp.stack(maps, axis=1)


def faces_to_input(faces: np.ndarray) -> np.ndarray:
    """`(N, 48, 48)` or `(N, 48, 48, 1)` uint8, or float in [0, 1] -> `(N, 48, 48, 1)` float32."""
    faces = np.asarray(faces)
    if faces.ndim == 3:
        faces = faces[..., None]
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 1):
        raise ValueError(f"expected (N, 48, 48) or (N, 48, 48, 1) faces, got shape {faces.shape}")
    if faces.dtype == np.uint8:
        return faces.astype(np.float32) / 255
    if not np.issubdtype(faces.dtype, np.floating):
        raise ValueError(f"faces must be uint8 or float in [0, 1], got {faces.dtype}")
    if faces.size and (faces.min() < 0 or faces.max() > 1):
        raise ValueError("float faces must be in [0, 1]")
    return faces.astype(np.float32)


def label_faces(
    boxes: Any, probabilities: np.ndarray, class_names: Sequence[str], maps: Any = None
) -> list[Face]:
    """A `Face` per box `(x, y, w, h)`: its probabilities, top label and attention maps."""
    maps = [None] * len(boxes) if maps is None else maps
    return [
        Face(tuple(int(v) for v in box), p, class_names[int(np.argmax(p))], m)
        for box, p, m in zip(boxes, probabilities, maps, strict=True)
    ]


# ----------------------------------------------------------------------------- the recogniser


class Recognizer:
    """Facial expression recogniser around a trained `ResNet18` (module docstring).

    Faces go through the model in chunks of at most `batch_size`, each zero-padded to the next
    power of two: at most `log2(batch_size) + 1` compilations, and one face costs one face.
    """

    def __init__(
        self,
        model: ResNet18,
        variables: Any,
        *,
        class_names: Sequence[str] = CLASS_NAMES,
        batch_size: int = DEFAULT_BATCH_SIZE,
        margin: float = PHOTO_MARGIN,
        max_side: int = DEFAULT_MAX_SIDE,
        min_face: int = DEFAULT_MIN_FACE,
        ensemble: bool = False,
        crops: int = NUM_CROPS,
        logit_offsets: Sequence[float] | None = None,
        matmul_dtype: str | None = DEFAULT_MATMUL_DTYPE,
    ):
        """Wraps `model` and its `{'params', 'batch_stats'}`; compiles nothing until first used.

        `ensemble`: `variables` stack K models `(K, ...)`, their probabilities averaged.
        `logit_offsets`: `(num_classes,)` added to the logits (`prior_adjustment`), or None.
        `matmul_dtype`: 'float32', 'bfloat16' or 'auto' (`resnet.with_matmul_dtype`); None: as
        `model` was built. The rest: docs/prediction_and_export.md, Python: the Recognizer.
        """
        if len(class_names) != model.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {model.num_classes} outputs"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crops not in CROP_CHOICES:
            raise ValueError(f"crops must be one of {CROP_CHOICES}, got {crops!r}")
        missing = {"params", "batch_stats"} - set(variables)
        if missing:
            raise ValueError(f"variables lack the collections {sorted(missing)}")
        if logit_offsets is not None:
            logit_offsets = np.asarray(logit_offsets, np.float32)
            if logit_offsets.shape != (model.num_classes,):
                raise ValueError(f"logit_offsets: shape {logit_offsets.shape}, not (num_classes,)")
        if matmul_dtype is not None:
            model = with_matmul_dtype(model, matmul_dtype)
        self.model, self.class_names, self.logit_offsets = model, tuple(class_names), logit_offsets
        self.batch_size, self.crops, self.ensemble = batch_size, crops, ensemble
        self.margin, self.max_side, self.min_face = margin, max_side, min_face
        # What the model's matmul operands are: 'bfloat16' or 'float32'.
        self.matmul_dtype = "bfloat16" if conv.split_impl(model.conv_impl)[1] else "float32"
        self.variables = jax.device_put(  # Once, not at every call.
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        )
        options = conv.cpu_compiler_options()  # Eigen convolutions on CPU
        probabilities = ensemble_probabilities if ensemble else ten_crop_probabilities
        # Chunks of one face (a photo's, a video frame's) run the plain XLA convolutions, which
        # trace in ~0.15 s instead of the CPU forms' ~0.5 s and run as fast at that size; bigger
        # chunks keep the model's forms (32 faces: 3.9 s vs 4.6 s). 2-core AMD EPYC Zen 4.
        light = model.clone(conv_impl="xla")

        def jitted(fn: Any, **kwargs: Any) -> tuple[Any, ...]:
            return tuple(
                jax.jit(functools.partial(fn, m, **kwargs), compiler_options=options)
                for m in (light, model)
            )

        self._probabilities = jitted(probabilities, crops=crops)
        self._attention = jitted(centre_crop_attention)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        replica: int | str | None = None,
        *,
        adjust: bool = True,
        **kwargs: Any,
    ) -> Recognizer:
        """Loads a run directory (best, else latest checkpoint), a checkpoint directory or
        `'pretrained'`; `replica`: k or 'ensemble' (None: the run's choice); `adjust`: apply the
        class-prior logit adjustment a shipped model's manifest records (`prior_adjustment`)."""
        from fer_jax.inference import prior_adjustment
        from fer_jax.model import pretrained
        from fer_jax.training.checkpoint import load_for_inference  # Orbax etc. only when needed.

        is_pretrained, name = pretrained.parse_reference(path)
        if is_pretrained:
            manifest = pretrained.read_manifest(name)
            if "class_names" not in kwargs:  # those the weights file records
                kwargs["class_names"] = manifest["meta"]["class_names"]
            if adjust and "logit_offsets" not in kwargs:
                kwargs["logit_offsets"] = prior_adjustment.from_manifest(manifest)
        ensemble = replica == "ensemble"
        model, variables = load_for_inference(os.fspath(path), "all" if ensemble else replica)
        return cls(model, variables, ensemble=ensemble, **kwargs)

    @classmethod
    def pretrained(cls, name: str | None = None, **kwargs: Any) -> Recognizer:
        """`from_checkpoint('pretrained')`: the shipped model, or `name` (a model name or `.npz`
        path); `PretrainedError` when the weights are not installed or corrupt."""
        from fer_jax.model import pretrained

        reference = pretrained.REFERENCE if name is None else f"{pretrained.REFERENCE}:{name}"
        return cls.from_checkpoint(reference, **kwargs)

    def bucket(self, n: int) -> int:
        """The padded batch size of a chunk of `1 <= n <= batch_size` faces."""
        return min(self.batch_size, 1 << (n - 1).bit_length())

    def _batched(self, fns: tuple[Any, Any], faces: np.ndarray) -> np.ndarray:
        """`fns[0]` on chunks of one face, `fns[1]` on bigger ones (`__init__`)."""
        inputs = faces_to_input(faces)
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            padded = np.zeros((self.bucket(len(chunk)), *chunk.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            fn = fns[0] if len(padded) == 1 else fns[1]
            outputs.append(np.asarray(fn(self.variables, padded))[: len(chunk)])
        if not outputs:
            zeros = np.zeros((1, *inputs.shape[1:]), np.float32)
            shape = jax.eval_shape(fns[0], self.variables, zeros)
            return np.zeros((0, *shape.shape[1:]), np.float32)
        return np.concatenate(outputs)

    def predict_faces(self, faces: np.ndarray) -> np.ndarray:
        """Probabilities `(N, num_classes)` float32 of cropped faces (`faces_to_input` layouts),
        with `logit_offsets` applied where set."""
        from fer_jax.inference.prior_adjustment import adjust

        return adjust(self._batched(self._probabilities, faces), self.logit_offsets)

    def attention_maps(self, faces: np.ndarray) -> np.ndarray:
        """Spatial-attention maps `(N, 4, 44, 44)` float32 of cropped faces (module docstring)."""
        if self.ensemble:
            raise ValueError("attention maps are one model's: load one replica, not the ensemble")
        return self._batched(self._attention, faces)

    def crop_faces(self, gray: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """`(N, 48, 48)` uint8 face crops of `gray` around `boxes` (`crop_face`, `self.margin`)."""
        crops = [crop_face(gray, box, margin=self.margin, size=FACE_SIZE) for box in boxes]
        return np.stack(crops) if crops else np.zeros((0, FACE_SIZE, FACE_SIZE), np.uint8)

    def locate(self, gray: np.ndarray, boxes: Any | None = None, name: str = "<array>"):
        """`(N, 4)` int64 face boxes of a gray image: `boxes` checked (ImageError naming `name`
        if one is empty or outside it), or those `find_faces` detects."""
        if boxes is not None:
            return check_boxes(boxes, gray.shape, name)
        return find_faces(gray, max_side=self.max_side, min_face=self.min_face)

    def predict(
        self, image: ImageLike, *, boxes: Any | None = None, attention: bool = False
    ) -> list[Face]:
        """The faces of `image` (a path, PIL image or array), largest first or in `boxes` order
        (`[[x, y, w, h], ...]`: no detection); a warning when there is none."""
        name = _describe(image)
        faces = self.recognize(
            to_gray(read_image(image)), boxes=boxes, attention=attention, name=name
        )
        if not faces:
            logging.getLogger(__name__).warning("%s: no face found", name)
        return faces

    def recognize(
        self, gray: np.ndarray, *, boxes: Any = None, attention: bool = False, name: str = "<array>"
    ) -> list[Face]:
        """`predict` on a `(H, W)` uint8 gray image, silent when there is no face."""
        boxes = self.locate(gray, boxes, name)
        if not len(boxes):
            return []
        crops = self.crop_faces(gray, boxes)
        maps = self.attention_maps(crops) if attention else None
        return label_faces(boxes, self.predict_faces(crops), self.class_names, maps)
