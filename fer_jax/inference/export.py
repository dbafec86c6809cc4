"""Export the face classifier to run without this code: StableHLO, TF SavedModel, TFLite.

    python -m fer_jax.export --checkpoint=runs/fer2013 --out_dir=exported [--saved_model] [--tflite]

The function is `ten_crop_probabilities` with the weights baked in: `(B, 48, 48, 1)` float32
faces in [0, 1] -> `(B, num_classes)` float32 probabilities. The files, how to run them and the
XLA flag that makes StableHLO fast on a CPU: docs/prediction_and_export.md, Export.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from data_pipelines.labels import CLASS_NAMES
from fer_jax.inference.recognizer import FACE_SIZE, ten_crop_probabilities
from fer_jax.model.resnet import ResNet18
from fer_jax.training.evaluate import write_json
from fer_jax.user_errors import UserError, run_cli

STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
METADATA_FILE = "export.json"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME = "faces"
OUTPUT_NAME = "probabilities"


class ExportError(RuntimeError):
    """The model cannot be exported to the requested format; the message says why."""


def inference_fn(model: ResNet18, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """`faces (B, 48, 48, 1) float32 in [0, 1] -> probabilities (B, C)`, weights closed over.

    The model runs XLA's own convolutions (`conv_impl='xla'`): what `'auto'` picks depends on
    the backend at trace time, and an exported program is for every platform it names.
    """
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    variables = jax.tree.map(jnp.asarray, variables)
    return functools.partial(ten_crop_probabilities, model.clone(conv_impl="xla"), variables)


def export_stablehlo(
    model: ResNet18,
    variables: Any,
    *,
    batch_size: int | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """The inference function exported with `jax.export` (batch symbolic if `batch_size` None)."""
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
    spec = jax.ShapeDtypeStruct((batch, FACE_SIZE, FACE_SIZE, 1), jnp.float32)
    return jax.export.export(jax.jit(inference_fn(model, variables)), platforms=platforms)(spec)


def export_saved_model(
    model: ResNet18,
    variables: Any,
    directory: str,
    *,
    batch_size: int | None = None,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> None:
    """Writes a TensorFlow SavedModel whose `serving_default` signature maps `faces` to
    `probabilities` (jax2tf, native serialisation; `batch_size` None = any batch)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    shape = "(b, 48, 48, 1)" if batch_size is None else None
    converted = jax2tf.convert(
        inference_fn(model, variables),
        polymorphic_shapes=[shape],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    spec = tf.TensorSpec([batch_size, FACE_SIZE, FACE_SIZE, 1], tf.float32, name=INPUT_NAME)

    @tf.function(autograph=False, input_signature=[spec])
    def serve(faces):
        return {OUTPUT_NAME: converted(faces)}

    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, directory, signatures={"serving_default": serve})


def export_tflite(model: ResNet18, variables: Any, path: str, *, batch_size: int = 1) -> None:
    """Writes a TFLite flatbuffer for a fixed `batch_size` (signature as the SavedModel's; with
    a symbolic batch the converter cannot legalise CBAM's arg-max nor the batch-polymorphic
    slices); ExportError with the converter's reason when it cannot translate the model."""
    import tempfile

    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"TFLite needs a fixed batch_size >= 1, got {batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        export_saved_model(model, variables, tmp, batch_size=batch_size, platforms=("cpu",))
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        try:
            flatbuffer = converter.convert()
        except Exception as e:  # noqa: BLE001 - ConverterError and friends
            reason = next((line for line in str(e).splitlines() if "error:" in line), str(e))
            raise ExportError(f"the TFLite converter cannot translate the model: {reason}") from e
    with open(path, "wb") as f:
        f.write(flatbuffer)


def metadata(model: ResNet18, class_names: Sequence[str]) -> dict[str, Any]:
    """What `export.json` records about the exported function."""
    return {
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", FACE_SIZE, FACE_SIZE, 1],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "description": "gray 48x48 face crops (uint8 / 255), data_pipelines.faces.crop_face",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", model.num_classes],
            "dtype": "float32",
            "description": "softmax of the ten-crop averaged logits",
        },
        "class_names": list(class_names),
        "model": {"width": model.width, "cbam": model.cbam, "head": model.head},
        "jax_version": jax.__version__,
    }


def export_all(
    model: ResNet18,
    variables: Any,
    out_dir: str,
    *,
    saved_model: bool = False,
    tflite: bool = False,
    tflite_batch_size: int = 1,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict[str, str]:
    """Writes the requested formats under `out_dir`; returns {format: path} of those written,
    and `{format}_error`: the reason of one that failed (the others are still written)."""
    os.makedirs(out_dir, exist_ok=True)
    written = {
        "stablehlo": os.path.join(out_dir, STABLEHLO_FILE),
        "metadata": os.path.join(out_dir, METADATA_FILE),
    }
    with open(written["stablehlo"], "wb") as f:
        f.write(export_stablehlo(model, variables).serialize())
    write_json(written["metadata"], metadata(model, class_names), indent=1)
    if saved_model:
        written["saved_model"] = os.path.join(out_dir, SAVED_MODEL_DIR)
        export_saved_model(model, variables, written["saved_model"])
    if tflite:
        path = os.path.join(out_dir, TFLITE_FILE)
        try:
            export_tflite(model, variables, path, batch_size=tflite_batch_size)
            written["tflite"] = path
        except ExportError as e:
            written["tflite_error"] = str(e)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fer_jax.export", description="Export the expression classifier."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, checkpoint directory, or 'pretrained' (the model shipped in the "
        "package, fer_jax.model.pretrained)",
    )
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--saved_model", action="store_true", help="also a TF SavedModel")
    parser.add_argument("--tflite", action="store_true", help="also a TFLite file")
    parser.add_argument("--tflite_batch_size", type=int, default=1)
    parser.add_argument(
        "--verbose", action="store_true", help="show the traceback of an error in the input"
    )
    args = parser.parse_args(argv)

    def export() -> int:
        from fer_jax.training.checkpoint import load_for_inference

        try:
            model, variables = load_for_inference(args.checkpoint)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load the checkpoint {args.checkpoint}: {e}") from e
        written = export_all(
            model,
            variables,
            args.out_dir,
            saved_model=args.saved_model,
            tflite=args.tflite,
            tflite_batch_size=args.tflite_batch_size,
        )
        for kind, path in written.items():
            stream = sys.stderr if kind.endswith("_error") else sys.stdout
            stream.write(f"{kind}: {path}\n")
        return 1 if any(k.endswith("_error") for k in written) else 0

    return run_cli(export, sys.argv[1:] if argv is None else argv)
