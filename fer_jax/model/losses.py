"""Losses: softmax cross-entropy and A-Softmax (SphereFace, Liu et al., CVPR 2017).

A-Softmax follows the widely used PyTorch port (clcarwin/sphereface_pytorch): the
AngleLinear kernel `(D, classes)` is column-normalised on every call, the target logit is
`|x| (lam cos(theta_y) + psi(theta_y)) / (1 + lam)` with
`psi(theta) = (-1)^k cos(m theta) - 2k`, and every other logit is `|x| cos(theta_j)`.
`cos(m theta)` is the Chebyshev polynomial `T_m(cos theta)`, whose gradient stays finite at
cos = +-1 (unlike `cos(m * arccos(c))`). All functions are pure: the annealed `lam` comes from an
explicit step argument.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

# |x| = sqrt(sum x^2 + eps): keeps the norm's gradient finite at x = 0.
FEATURE_NORM_EPS = 1e-12


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of `(B, K)` logits against `(B,)` integer labels; float32 scalar."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def feature_norm(features: jax.Array) -> jax.Array:
    """`(B, D)` -> `(B,)` Euclidean norms, `sqrt(sum x^2 + eps)`."""
    return jnp.sqrt(jnp.sum(jnp.square(features), axis=-1) + FEATURE_NORM_EPS)


def normalize_columns(kernel: jax.Array) -> jax.Array:
    """Scales each column of a `(D, K)` kernel to unit L2 norm."""
    return kernel / jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0, keepdims=True))


def cosine(features: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`cos(theta_j)` between `(B, D)` features and the columns of a `(D, K)` kernel.

    Returns `(cos (B, K) clipped to [-1, 1], |x| (B,))`, both float32.
    """
    features = features.astype(jnp.float32)
    w = normalize_columns(kernel.astype(jnp.float32))
    norm = feature_norm(features)
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=0))
    cos = (features @ w) / norm[:, None] / w_norm[None, :]
    # Clipped as torch.clamp(-1, 1): the gradient passes where -1 <= cos <= 1 (inclusive) and
    # is zero outside (jnp.clip splits the gradient at ties instead).
    return jnp.where(cos > 1.0, 1.0, jnp.where(cos < -1.0, -1.0, cos)), norm


def angular_logits(features: jax.Array, kernel: jax.Array) -> jax.Array:
    """Inference logits of an A-Softmax model: `|x| cos(theta_j)`, `(B, K)` float32."""
    cos, norm = cosine(features, kernel)
    return cos * norm[:, None]


def run_time(*values: float | jax.Array) -> tuple[jax.Array, ...]:
    """Python numbers as float32 run-time values (`optimization_barrier`), arrays as they are.

    A run's margin, lambda constants and dropout rate are Python numbers or
    traced arrays; as run-time values both compile to the same program. Folded as constants
    they would change the rounding (XLA selects T_m alone, rewrites `x ** -1` and `x / 0.7` as
    other operations: the last bits of losses, BatchNorm statistics and weights move), and so
    a plain run's results.
    """
    numbers = [i for i, v in enumerate(values) if not isinstance(v, jax.Array | np.ndarray)]
    held = jax.lax.optimization_barrier(tuple(jnp.float32(values[i]) for i in numbers))
    out = list(values)
    for i, v in zip(numbers, held, strict=True):
        out[i] = v
    return tuple(out)


MARGINS = (1, 5)  # the A-Softmax margins m, lowest and highest, that `psi` computes

_CHEBYSHEV = (
    lambda c: jnp.ones_like(c),
    lambda c: c,
    lambda c: 2 * c**2 - 1,
    lambda c: 4 * c**3 - 3 * c,
    lambda c: 8 * c**4 - 8 * c**2 + 1,
    lambda c: 16 * c**5 - 20 * c**3 + 5 * c,
)


def chebyshev(cos: jax.Array, m: int | jax.Array) -> jax.Array:
    """`cos(m theta)` as the Chebyshev polynomial `T_m(cos theta)`, m in 0..5.

    One form for every margin: each polynomial is computed and the one of degree m selected.
    """
    m = jnp.asarray(m)
    return jnp.select([m == d for d in range(len(_CHEBYSHEV))], [p(cos) for p in _CHEBYSHEV])


def psi(cos: jax.Array, m: int) -> jax.Array:
    """SphereFace's monotonic `psi(theta) = (-1)^k cos(m theta) - 2k`, k = floor(m theta / pi).

    k is piecewise constant, so it is computed on `stop_gradient(cos)`.
    """
    theta = jnp.arccos(jax.lax.stop_gradient(cos))
    k = jnp.floor(m * theta / math.pi)
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    return sign * chebyshev(cos, m) - 2.0 * k


def a_softmax_loss(
    features: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    margin: int | jax.Array,
    lam: jax.Array | float,
) -> jax.Array:
    """Mean A-Softmax loss, float32 scalar: cross-entropy of the logits whose target column
    takes the margin.

    Args:
      features: `(B, D)` inputs of the AngleLinear layer.
      kernel: `(D, K)` un-normalised AngleLinear kernel (normalised here, as on every call).
      labels: `(B,)` integer labels in [0, K).
      margin: the integer angular margin m in `MARGINS` (1 gives the "modified softmax"), or an
        array holding one (traced); an int enters as a run-time value (`run_time`).
      lam: annealing weight, see `sphereface_lambda`.
    """
    (margin,) = run_time(margin)
    cos, norm = cosine(features, kernel)
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    target = (lam * cos + psi(cos, margin)) / (1.0 + lam)
    mixed = cos + onehot * (target - cos)
    return softmax_cross_entropy(mixed * norm[:, None], labels)


def sphereface_lambda(
    t: jax.Array | float,
    base: float = 1500.0,
    gamma: float = 0.1,
    power: float = 1.0,
    lam_min: float = 5.0,
) -> jax.Array:
    """Annealed A-Softmax weight `max(lam_min, base * (1 + gamma * t) ** -power)`.

    `t` is the annealing clock: optimizer steps in SphereFace (see
    `fer_jax.training.step.lambda_schedule`).
    """
    t = jnp.asarray(t, jnp.float32)
    base, gamma, power, lam_min = run_time(base, gamma, power, lam_min)
    return jnp.maximum(lam_min, base * (1.0 + gamma * t) ** (-power))
