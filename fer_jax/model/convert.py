"""PyTorch state dicts <-> Flax variables for `fer_jax.model.resnet.ResNet18`.

The PyTorch layout is the public CIFAR-style ResNet18 for FER with the official CBAM module in
each block: `conv1.weight`, `bn1.*`, `layer{1-4}.{0,1}.{conv1,bn1,conv2,bn2}.*`,
`.shortcut.{0,1}.*`, `.cbam.ChannelGate.mlp.{1,3}.*`, `.cbam.SpatialGate.spatial.{conv,bn}.*`,
`linear.weight` (+ `linear.bias` for softmax; an AngleLinear weight is `(in, out)` in both).
Conv weights are OIHW there and HWIO here; Dense weights `(out, in)` there, `(in, out)` here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fer_jax.model.resnet import ResNet18, variable_shapes

# Flax module name -> PyTorch module name; anything else maps to itself.
_MODULE_NAMES = {
    "shortcut_conv": "shortcut.0",
    "shortcut_bn": "shortcut.1",
    "mlp_1": "mlp.1",
    "mlp_3": "mlp.3",
}
_SPATIAL_GATE_NAMES = {"conv": "spatial.conv", "bn": "spatial.bn"}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_name(collection: str, path: tuple[str, ...]) -> str:
    """Name in the PyTorch state dict of the Flax leaf `variables[collection][path...]`."""
    parts = []
    for i, name in enumerate(path[:-1]):
        if name.startswith("layer") and "_" in name:
            parts.append(name.replace("_", "."))
        elif i > 0 and path[i - 1] == "SpatialGate":
            parts.append(_SPATIAL_GATE_NAMES[name])
        else:
            parts.append(_MODULE_NAMES.get(name, name))
    parts.append(_LEAF_NAMES[(collection, path[-1])])
    return ".".join(parts)


def _transpose_for_torch(path: tuple[str, ...], ndim: int, head: str) -> tuple[int, ...] | None:
    """Axis permutation Flax -> PyTorch for a `params` leaf, or None to keep it."""
    if path[-1] != "kernel":
        return None
    if ndim == 4:
        return (3, 2, 0, 1)  # HWIO -> OIHW
    if path[0] == "linear" and head == "a_softmax":
        return None  # AngleLinear stores (in, out) in both frameworks
    return (1, 0)  # Dense (in, out) -> (out, in)


def to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` -> PyTorch-named dict of numpy arrays."""
    head = "softmax" if "bias" in variables["params"]["linear"] else "a_softmax"
    out = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(dict(variables[collection])).items():
            value = np.asarray(value)
            perm = _transpose_for_torch(path, value.ndim, head) if collection == "params" else None
            out[torch_name(collection, path)] = (
                np.ascontiguousarray(value.transpose(perm)) if perm else value
            )
    return out


def _clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps `{'net': ...}`, drops `num_batches_tracked`, strips DataParallel's `module.`."""
    if "net" in state_dict and isinstance(state_dict["net"], Mapping):
        state_dict = state_dict["net"]
    cleaned = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
            value = value.detach().cpu().numpy()
        cleaned[key.removeprefix("module.")] = np.asarray(value)
    return cleaned


def from_torch(
    state_dict: Mapping[str, Any],
    *,
    cbam: str | None = "channel_first",
    head: str = "softmax",
    **model_kwargs: Any,
) -> tuple[ResNet18, dict[str, Any]]:
    """`(model, variables)` of a PyTorch state dict (docs/prediction_and_export.md, PyTorch
    weights): width and classes from the weights, `model_kwargs` to `ResNet18`; KeyError for a
    missing or unexpected key, ValueError for a shape mismatch, naming the key and shapes."""
    sd = _clean_state_dict(state_dict)
    for required in ("conv1.weight", "linear.weight"):
        if required not in sd:
            raise KeyError(f"state dict has no {required!r}: not a fer_jax/FER ResNet18 checkpoint")
    width = sd["conv1.weight"].shape[0]
    linear = sd["linear.weight"]
    num_classes = linear.shape[0] if head == "softmax" else linear.shape[-1]
    model = ResNet18(num_classes=num_classes, width=width, cbam=cbam, head=head, **model_kwargs)
    shapes = variable_shapes(model)

    expected, missing, variables = set(), [], {}
    for collection in ("params", "batch_stats"):
        flat = {}
        for path, leaf in traverse_util.flatten_dict(dict(shapes[collection])).items():
            name = torch_name(collection, path)
            expected.add(name)
            perm = _transpose_for_torch(path, leaf.ndim, head) if collection == "params" else None
            want = tuple(leaf.shape[i] for i in perm) if perm else tuple(leaf.shape)
            if name not in sd:
                missing.append(f"{name} (expected shape {want})")
                continue
            value = sd[name]
            if name == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3 != want[1]:
                value = value.sum(axis=1, keepdims=True)
            if tuple(value.shape) != want:
                raise ValueError(
                    f"shape mismatch for {name!r}: state dict has {tuple(value.shape)}, "
                    f"the model (width {width}, cbam={cbam}, head={head}) expects {want}"
                )
            if perm:
                value = value.transpose(np.argsort(perm))
            flat[path] = jnp.asarray(value, dtype=leaf.dtype)
        variables[collection] = traverse_util.unflatten_dict(flat)
    if missing:
        raise KeyError(f"state dict is missing {len(missing)} keys: " + ", ".join(missing))
    unexpected = sorted(set(sd) - expected)
    if unexpected:
        raise KeyError(
            f"state dict has {len(unexpected)} unexpected keys for cbam={cbam!r}, head={head!r}: "
            + ", ".join(unexpected)
        )
    return model, variables
