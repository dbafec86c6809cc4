"""FLOPs of the network counted from the model (its jaxpr) and by XLA, and accelerator peaks.

`model_flops_per_image` walks the jaxpr of one forward pass and adds up 2 x multiply-adds of every
convolution and matrix product (elementwise work, BatchNorm, pooling, CBAM's gating are not
counted: they are < 1% here); a training step is counted as `TRAIN_FACTOR` = 3 x forward
(forward, input gradient, weight gradient), the usual convention. `lowered_flops` asks XLA's
cost analysis of a lowered function instead (it counts only the non-padding taps of a
convolution: ~10% lower here). For the paper's CBAM-ResNet18 at 44x44: 2.19 GFLOP forward,
6.58 GFLOP per training image (analytic); XLA: 1.99 GFLOP forward.

Model FLOP utilisation (MFU) = images/s x FLOPs per image / (`peak_tflops(device_kind)` x 1e12).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

TRAIN_FACTOR = 3  # forward + input gradient + weight gradient

# Dense (no structured sparsity) bf16 tensor-core peak, TFLOP/s per device, from the vendors'
# datasheets (V100: fp16, it has no bf16), keyed by a case-insensitive substring of
# `jax.Device.device_kind` (e.g. 'NVIDIA H200', 'NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB',
# 'Tesla V100-SXM2-16GB', 'TPU v5 lite'). The longest matching key wins: 'H100 PCIe' before
# 'H100', 'L40S' before 'L40' before 'L4', 'TPU v5 lite' before 'TPU v5' (v5p reports 'TPU v5').
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200 NVL": 835.0,
    "H200": 989.0,  # also GH200
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM ('NVIDIA H100 80GB HBM3')
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v4": 275.0,
    "TPU v3": 123.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device from its `device_kind`; None for CPUs and unknowns."""
    kind = device_kind.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in kind:
            return PEAK_TFLOPS[key]
    return None


def _conv_flops(eqn: Any) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    cin = rhs.shape[rhs_spec[1]]  # already divided by feature_group_count
    # A transposed (lhs-dilated) convolution multiplies by the inserted zeros too: skip them.
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out.shape) * window * cin / dilation


def _dot_flops(eqn: Any) -> float:
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr: Any) -> float:
    """2 x multiply-adds of the convolutions and dot products in `jaxpr` (scans x length)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        else:
            inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "cond":  # branches are alternatives: count the largest
                inner = max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
            total += inner
    return total


def model_flops_per_image(model_config: Any, crop: int = 44) -> dict[str, float]:
    """`{'forward': FLOPs per image, 'train': TRAIN_FACTOR x forward}` of a config's `model`.

    `crop` is the (square) input side in pixels. Counted with `conv_impl='xla'` (every impl does
    the same arithmetic); no parameters are materialised (`jax.eval_shape`).
    """
    from fer_jax.model.resnet import model_from_config

    model = model_from_config(model_config, conv_impl="xla")
    x = jnp.zeros((1, crop, crop, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    fwd = jaxpr_flops(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables).jaxpr)
    return {"forward": fwd, "train": TRAIN_FACTOR * fwd}


def lowered_flops(fn: Callable, *args: Any) -> float | None:
    """XLA's cost-analysis FLOPs of `jax.jit(fn)` on `args`, lowered without a backend compile;
    None where it fails or the backend does not implement it (a count must not stop a run)."""
    try:
        analysis = jax.jit(fn).lower(*args).cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
