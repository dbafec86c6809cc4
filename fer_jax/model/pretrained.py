r"""The pretrained model shipped inside the package: one weights file, its manifest, the loader.

`fer_jax/weights/<name>.npz` (uncompressed, no pickles, fixed zip timestamps: the same variables
give the same bytes) holds `params/<module>/.../<leaf>` as bfloat16 bit patterns (uint16),
`batch_stats/...` as float32 and `__meta__`, the metadata as UTF-8 JSON (`model`, `class_names`,
`provenance`, `leaves`, `format_version`); `<name>.json`, the manifest, adds its size and sha256
(fer_jax/weights/README.md). `load` verifies both; anything wrong is one `PretrainedError` naming
the file. A checkpoint argument `pretrained` is `DEFAULT_NAME`, `pretrained:NAME` a name (looked
up in `$FER_JAX_WEIGHTS_DIR` or `fer_jax/weights/`) or path, `*.npz` that file. Written by
`python -m fer_jax.inference.save_pretrained`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from fer_jax.user_errors import UserError

DEFAULT_NAME = "cbam_resnet18_fer2013"
WEIGHTS_DIR_ENV = "FER_JAX_WEIGHTS_DIR"
REFERENCE = "pretrained"  # the word that names the shipped model where a checkpoint goes
FORMAT_VERSION = 1
META_KEY = "__meta__"
COLLECTIONS = ("params", "batch_stats")
PARAM_DTYPES = ("bfloat16", "float32")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the same variables give the same bytes


class PretrainedError(UserError):
    """A pretrained weights file that cannot be used: missing, corrupt, truncated, or not
    matching its metadata. The message names the file and what to do."""


class NotInstalledError(PretrainedError):
    """The default pretrained model is not in this installation."""


# ----------------------------------------------------------------------------- locations


def weights_dir() -> str:
    """Where model names are looked up: `$FER_JAX_WEIGHTS_DIR`, else `fer_jax/weights/`."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fer_jax/
    return os.environ.get(WEIGHTS_DIR_ENV) or os.path.join(package, "weights")


def resolve(name_or_path: str | os.PathLike | None = None) -> str:
    """The `.npz` path of a model name (in `weights_dir()`), or of an explicit path; None is
    `DEFAULT_NAME`."""
    name = DEFAULT_NAME if name_or_path is None else os.fspath(name_or_path)
    if name.endswith(".npz") or "/" in name or os.sep in name:
        return os.path.abspath(os.path.expanduser(name))
    return os.path.join(weights_dir(), f"{name}.npz")


def manifest_path(npz_path: str) -> str:
    """The manifest next to a weights file: `<name>.json`."""
    return os.path.splitext(npz_path)[0] + ".json"


def available(name_or_path: str | os.PathLike | None = None) -> bool:
    """Whether the model's weights file and manifest are installed (not verified: `load` does)."""
    path = resolve(name_or_path)
    return os.path.isfile(path) and os.path.isfile(manifest_path(path))


def names() -> list[str]:
    """The model names in `weights_dir()` that have both files."""
    try:
        files = sorted(os.listdir(weights_dir()))
    except OSError:
        return []
    stems = [f[:-4] for f in files if f.endswith(".npz")]
    return [s for s in stems if f"{s}.json" in files]


def parse_reference(path: str | os.PathLike) -> tuple[bool, str | None]:
    """`(is a pretrained reference, name or path)` of a checkpoint argument: `pretrained`
    (None: the default model), `pretrained:NAME` (a name or an `.npz` path) or a path ending
    in `.npz`."""
    text = os.fspath(path)
    if text == REFERENCE:
        return True, None
    if text.startswith(REFERENCE + ":"):
        return True, text[len(REFERENCE) + 1 :] or None
    if text.endswith(".npz"):
        return True, text
    return False, None


def is_reference(path: str | os.PathLike) -> bool:
    """Whether a checkpoint argument names pretrained weights (`parse_reference`)."""
    return parse_reference(path)[0]


# ----------------------------------------------------------------------------- saving


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
    """`{'params/a/b': leaf}` of both collections of nested variables."""
    return {
        f"{collection}/{key}": value
        for collection in COLLECTIONS
        for key, value in traverse_util.flatten_dict(dict(variables[collection]), sep="/").items()
    }


def _jsonable(value: Any) -> Any:
    """`value` with NumPy scalars and arrays, tuples and ConfigDicts turned into JSON types."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _encode(key: str, value: np.ndarray, param_dtype: str) -> tuple[np.ndarray, str]:
    """The stored array of one leaf and its dtype name."""
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{key}: expected floating-point values, got {value.dtype}")
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{key}: has NaN or infinite values (a diverged checkpoint?)")
    if key.startswith("params/") and param_dtype == "bfloat16":
        return value.astype(ml_dtypes.bfloat16).view(np.uint16), "bfloat16"
    return value, "float32"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An `np.load`-able zip of `.npy` members (uncompressed), with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _write_atomic(final: str, data: bytes) -> None:
    """Writes `data` to a temporary file next to `final`, then renames it to `final`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=f".{os.path.basename(final)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(
    variables: Mapping[str, Any],
    model_config: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    meta: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    param_dtype: str = "bfloat16",
) -> str:
    """Writes `path` (`<name>.npz`, then its manifest `<name>.json`, each renamed into place
    when complete); returns the `.npz` path.

    `variables`: one model's `{'params', 'batch_stats'}`; `model_config`: the config's `model`
    section; `meta`: the provenance (JSON types); `param_dtype`: of the params, 'bfloat16' (half
    the bytes) or 'float32' (BatchNorm statistics are float32). ValueError for a missing
    collection, a leaf that is not finite, or class names that do not fit.
    """
    from data_pipelines.labels import CLASS_NAMES

    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: the weights file name must end in .npz")
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {param_dtype!r}")
    missing = [c for c in COLLECTIONS if c not in variables]
    if missing:
        raise ValueError(f"variables lack the collections {missing}")
    model_config = _jsonable(dict(model_config))
    class_names = list(CLASS_NAMES if class_names is None else class_names)
    if "num_classes" in model_config and len(class_names) != model_config["num_classes"]:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model_config['num_classes']} outputs"
        )
    arrays, leaves = {}, {}
    for key, value in _flatten(variables).items():
        value = np.asarray(value)
        arrays[key], dtype = _encode(key, value, param_dtype)
        leaves[key] = {"shape": list(value.shape), "dtype": dtype}
    name = os.path.splitext(os.path.basename(path))[0]
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": model_config,
        "class_names": class_names,
        "provenance": _jsonable(dict(meta)),
        "leaves": leaves,
    }
    blob = json.dumps(metadata, sort_keys=True).encode("utf-8")
    arrays[META_KEY] = np.frombuffer(blob, np.uint8)
    data = _npz_bytes(arrays)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomic(path, data)
    manifest = {
        "file": os.path.basename(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "meta": metadata,
    }
    _write_manifest(path, manifest)
    return path


def _write_manifest(npz_path: str, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write_atomic(manifest_path(npz_path), text.encode("utf-8"))


def set_logit_adjustment(
    name_or_path: str | os.PathLike | None, adjustment: Mapping[str, Any] | None
) -> str:
    """Records (or with None removes) a model's post-hoc logit adjustment in its manifest:
    `{'tau', 'prior', ...provenance}` (`fer_jax.inference.prior_adjustment`). The weights file
    and its checked metadata are unchanged; returns the manifest's path."""
    path = resolve(name_or_path)
    manifest = read_manifest(name_or_path)
    if adjustment is None:
        manifest.pop("logit_adjustment", None)
    else:
        if not {"tau", "prior"} <= set(adjustment):
            raise ValueError(f"a logit adjustment needs tau and prior, got {sorted(adjustment)}")
        manifest["logit_adjustment"] = _jsonable(dict(adjustment))
    _write_manifest(path, manifest)
    return manifest_path(path)


# ----------------------------------------------------------------------------- loading


def _hint(path: str) -> str:
    """What to do about a bad file: reinstall a packaged one, rewrite one of the user's."""
    if os.path.dirname(path) == os.path.abspath(weights_dir()):
        return "reinstall fer_jax"
    return (
        "write it again: python -m fer_jax.inference.save_pretrained --from=RUN_DIR --out=" + path
    )


def read_manifest(name_or_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest of a model (its `meta` holds the metadata) without reading the weights;
    PretrainedError if the model is not installed or its manifest is unreadable."""
    path = resolve(name_or_path)
    manifest = manifest_path(path)
    if not os.path.isfile(path):
        if path == resolve(None):
            raise NotInstalledError(
                f"no pretrained model is installed: {path} does not exist (the trained weights "
                "are not shipped with this copy of fer_jax); use a trained run instead: "
                "--checkpoint=RUN_DIR (--config.init_from=RUN_DIR when training)"
            )
        found = names()
        listed = f"; installed: {', '.join(found)}" if found else ""
        raise PretrainedError(f"{path}: no such pretrained weights file{listed}")
    try:
        with open(manifest) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PretrainedError(
            f"{path}: its manifest {os.path.basename(manifest)} is missing (incomplete "
            f"install or copy); {_hint(path)}"
        ) from None
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{manifest}: unreadable manifest ({e}); {_hint(path)}") from e
    if not isinstance(data, dict) or not {"bytes", "sha256"} <= set(data):
        raise PretrainedError(f"{manifest}: not a weights manifest (no bytes/sha256)")
    return data


def _decode(path: str, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (float32) and metadata of a verified file's bytes: its sha256 is the
    manifest's, so the arrays are those `save` wrote with the metadata (`leaves`: each one's
    stored dtype); whether they fit the model is `_check_against_model`'s."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            stored = {k: npz[k] for k in npz.files}
        metadata = json.loads(stored.pop(META_KEY).tobytes().decode("utf-8"))
        dtypes = {key: leaf["dtype"] for key, leaf in metadata["leaves"].items()}
        arrays = {key: stored[key] for key in dtypes}
    except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise PretrainedError(f"{path}: not a fer_jax weights file ({e}); {_hint(path)}") from e
    for key, value in arrays.items():
        if dtypes[key] == "bfloat16":
            arrays[key] = value.view(ml_dtypes.bfloat16).astype(np.float32)
    return arrays, metadata


def _check_against_model(path: str, metadata: Mapping[str, Any], arrays: Mapping) -> None:
    """Raises unless the arrays are exactly the variables of the model in the metadata."""
    from fer_jax.model.resnet import model_from_config, variable_shapes

    try:
        model = model_from_config(metadata["model"], dropout_rate=0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{path}: its model description is unusable ({e})") from e
    want = {key: tuple(leaf.shape) for key, leaf in _flatten(variable_shapes(model)).items()}
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise PretrainedError(
            f"{path}: does not hold the variables of its model ({metadata['model']}): missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}"
        )
    for key, shape in want.items():
        if tuple(arrays[key].shape) != shape:
            raise PretrainedError(
                f"{path}: {key} has shape {tuple(arrays[key].shape)}, its model needs {shape}"
            )


def load(
    name_or_path: str | os.PathLike | None = None, *, check_model: bool = True
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`(model_config, variables, meta)` of a model name (None: `DEFAULT_NAME`) or `.npz` path,
    its size and sha256 checked against the manifest and its arrays against the metadata (and,
    with `check_model`, ~0.5 s, against the model it describes); float32 numpy variables; the
    metadata with the file's `path` and `sha256`. PretrainedError (NotInstalledError) if not."""
    path = resolve(name_or_path)
    manifest = read_manifest(name_or_path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PretrainedError(f"{path}: cannot read the weights file: {e}") from e
    if len(data) != manifest["bytes"]:
        raise PretrainedError(
            f"{path}: {len(data)} bytes, its manifest says {manifest['bytes']} (truncated or "
            f"incomplete file); {_hint(path)}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise PretrainedError(
            f"{path}: sha256 mismatch (corrupt or incomplete file); {_hint(path)}"
        )
    arrays, metadata = _decode(path, data)
    if check_model:
        _check_against_model(path, metadata, arrays)
    variables = {c: {} for c in COLLECTIONS} | traverse_util.unflatten_dict(arrays, sep="/")
    return dict(metadata["model"]), variables, {**metadata, "path": path, "sha256": digest}


def load_as_checkpoint(reference: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """`(variables, meta, source)` as `fer_jax.training.checkpoint.load_variables` returns them, for
    a checkpoint argument naming pretrained weights (`parse_reference`). `meta` has the
    checkpoint fields its callers read (`model`, `step`, `epoch`) and `pretrained`: the file's
    metadata."""
    _, name_or_path = parse_reference(reference)
    model_config, variables, metadata = load(name_or_path, check_model=False)
    provenance = metadata.get("provenance", {})
    meta = {
        "model": model_config,
        "step": provenance.get("step"),
        "epoch": provenance.get("epoch"),
        "pretrained": metadata,
    }
    return variables, meta, metadata["path"]
