"""CIFAR-style ResNet18 with a CBAM module in every residual block (Wen et al., ICAIS 2020).

Input `(B, 44, 44, C)` float (C = 1 by default), NHWC. Stem 3x3 conv -> BN -> ReLU at width w,
then 4 stages of 2 BasicBlocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2; 44 -> 44 -> 22 -> 11
-> 6), a 4x4/4 VALID average pool (top-left 4x4 of the 6x6 map, as PyTorch's
`avg_pool2d(out, 4)`), dropout, and a Dense (softmax) or AngleLinear (A-Softmax) classifier.
Submodule names mirror the PyTorch reference so that `fer_jax.model.convert` is a renaming.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fer_jax.model import conv, onednn_conv
from fer_jax.model.batch_norm import BatchNorm
from fer_jax.model.cbam import CBAM
from fer_jax.model.layers import AngleLinear, Conv

HEADS = ("softmax", "a_softmax")
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """conv3x3(s) -> BN -> ReLU -> conv3x3 -> BN -> [CBAM] -> + shortcut -> ReLU."""

    features: int
    strides: int = 1
    cbam: str | None = "channel_first"
    train: bool = False
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, p, name: Conv(  # noqa: E731
            f, kernel_size=k, strides=s, padding=p, impl=self.conv_impl, dtype=self.dtype, name=name
        )
        norm = lambda name: BatchNorm(  # noqa: E731
            use_running_average=not self.train,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            name=name,
        )
        out = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, 1, "conv1")(x)))
        out = norm("bn2")(conv(self.features, 3, 1, 1, "conv2")(out))
        if self.cbam is not None:
            out = CBAM(
                order=self.cbam,
                train=self.train,
                bn_axis_name=self.bn_axis_name,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name="cbam",
            )(out)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm("shortcut_bn")(conv(self.features, 1, self.strides, 0, "shortcut_conv")(x))
        return nn.relu(out + x)


class ResNet18(nn.Module):
    """The paper's network; returns `(B, num_classes)` float32 logits.

    Attributes:
      num_classes: 7 for FER2013/JAFFE.
      width: w, the stem width (64 in the paper; smaller for fast tests).
      cbam: CBAM ordering ('channel_first', 'spatial_first', 'parallel') or None (plain ResNet18).
      head: 'softmax' (Dense with bias) or 'a_softmax' (AngleLinear; logits `|x| cos(theta_j)`).
      dropout_rate: dropout before the classifier. Default 0.5, the reference PyTorch FER
        ResNet18's `F.dropout(out, p=0.5)`; the paper does not state it.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics, or None.
      conv_impl: implementation of the convolutions, see `fer_jax.model.conv.conv2d`.
      dtype: computation dtype (e.g. bfloat16); parameters and BatchNorm statistics stay float32.
    """

    num_classes: int = 7
    width: int = 64
    cbam: str | None = "channel_first"
    head: str = "softmax"
    dropout_rate: float = 0.5
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        return_features: bool = False,
        dropout_rate: float | jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`x`: `(B, 44, 44, C)` float images (e.g. in [0, 1]).

        With `return_features`, also returns the `(B, 8w)` float32 classifier inputs (the pooled
        features, after dropout in training), which the A-Softmax loss takes. `dropout_rate`
        (possibly traced) replaces the module's `dropout_rate` in training.
        """
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        x = x.astype(self.dtype)
        x = Conv(self.width, impl=self.conv_impl, dtype=self.dtype, name="conv1")(x)
        x = BatchNorm(
            use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype, name="bn1"
        )(x)
        x = nn.relu(x)
        for stage, stage_stride in enumerate(STAGE_STRIDES):
            for block in range(BLOCKS_PER_STAGE):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    strides=stage_stride if block == 0 else 1,
                    cbam=self.cbam,
                    train=train,
                    bn_axis_name=self.bn_axis_name,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x)
        x = nn.avg_pool(x, window_shape=(4, 4), strides=(4, 4), padding="VALID")
        features = x.reshape(x.shape[0], -1).astype(jnp.float32)
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        features = Dropout()(features, rate, deterministic=not train)
        if self.head == "softmax":
            logits = nn.Dense(self.num_classes, name="linear")(features)
        else:
            logits = AngleLinear(self.num_classes, name="linear")(features)
        return (logits, features) if return_features else logits


class Dropout(nn.Module):
    """`flax.linen.Dropout` (same mask, same random key) whose rate, given at call time, may be
    a traced array."""

    @nn.compact
    def __call__(self, x: jax.Array, rate: float | jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or (isinstance(rate, int | float) and rate == 0.0):
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep, shape=x.shape)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


MATMUL_DTYPES = ("float32", "bfloat16", "auto")


def matmul_bf16(matmul_dtype: str, backend: str | None = None) -> bool:
    """Whether the CPU convolution forms take bfloat16 matmul operands (`model.matmul_dtype`):
    'bfloat16' always, 'float32' never, 'auto' on a CPU with native bf16 multiplies (AMX-BF16
    or AVX512-BF16): up to 5x float32's matmul rate with AMX, slower (0.58-0.69x) without
    native bf16 multiplies (measurements: docs/cpu_performance.md, "bfloat16 on a CPU").
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    if matmul_dtype != "auto":
        return matmul_dtype == "bfloat16"
    backend = jax.default_backend() if backend is None else backend
    return backend == "cpu" and bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def with_matmul_dtype(model: ResNet18, matmul_dtype: str) -> ResNet18:
    """`model` whose CPU convolution forms take the matmul operands `matmul_dtype` names
    ('float32', 'bfloat16' or 'auto': `matmul_bf16`): `conv.BF16_SUFFIX` added to or removed
    from a `conv_impl` that has matmuls; a model with another impl ('xla', ...) as it is."""
    base, _ = conv.split_impl(model.conv_impl)
    if base not in conv.BF16_IMPLS:
        matmul_bf16(matmul_dtype)  # still checks the value
        return model
    return model.clone(conv_impl=base + (conv.BF16_SUFFIX if matmul_bf16(matmul_dtype) else ""))


_ONEDNN_WARNED: list[bool] = []  # non-empty once warn_if_onednn_missing has warned


def warn_if_onednn_missing(model: ResNet18, backend: str | None = None) -> bool:
    """Logs a warning (once per process; returns whether it applies) where `model` runs
    ``"auto:bf16"`` on a CPU with native bfloat16 multiplies but oneDNN's convolutions are not
    built (or do not load): its training would run ~1.7x faster with them
    (docs/cpu_performance.md, "oneDNN convolutions"). Training calls it at start. Silent where
    they are off on purpose (``FER_JAX_ONEDNN_CONV=0``).
    """
    backend = jax.default_backend() if backend is None else backend
    if (
        conv.split_impl(model.conv_impl) != ("auto", True)
        or backend != "cpu"
        or not {"amx_bf16", "avx512_bf16"} & cpu_flags()
        or onednn_conv.available(backend)
        or onednn_conv.unavailable_reason().startswith("off")
    ):
        return False
    if _ONEDNN_WARNED:
        return True
    _ONEDNN_WARNED.append(True)
    logging.getLogger(__name__).warning(
        "oneDNN convolutions are not available (%s): training on this CPU runs ~1.7x slower "
        "without them. Build them once with: apt-get install libdnnl-dev && %s",
        onednn_conv.unavailable_reason(),
        onednn_conv.BUILD_COMMAND,
    )
    return True


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def model_from_config(model_config: Mapping[str, Any], **overrides: Any) -> ResNet18:
    """`ResNet18` from a config's `model` section (`cbam='none'` is the plain baseline).

    `overrides` set fields that are not part of the saved model description, such as
    `dtype`, `bn_axis_name` or `conv_impl`. `matmul_dtype` (`matmul_bf16`; 'float32' when
    absent) becomes the `conv.BF16_SUFFIX` of a `conv_impl` that has matmuls.
    """
    fields = dict(model_config)
    if fields.get("cbam") == "none":
        fields["cbam"] = None
    fields.update(overrides)
    bf16 = matmul_bf16(fields.pop("matmul_dtype", "float32"))
    impl = fields.get("conv_impl", "xla")
    if bf16 and impl in conv.BF16_IMPLS:
        fields["conv_impl"] = impl + conv.BF16_SUFFIX
    known = {f.name for f in dataclasses.fields(ResNet18)} - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model fields {unknown}; known: {sorted(known)}")
    return ResNet18(**fields)


def variable_shapes(model: ResNet18) -> Any:
    """`{'params', 'batch_stats'}` of `model` as `jax.ShapeDtypeStruct`s, without computing any.

    Traced with the plain XLA convolutions: every `conv_impl` holds the same variables, and the
    CPU forms' tracing cost ~0.5 s of a `predict` start (2-core Zen 4).
    """
    x = jax.ShapeDtypeStruct((1, 44, 44, 1), jnp.float32)
    return jax.eval_shape(model.clone(conv_impl="xla").init, jax.random.PRNGKey(0), x)
