"""Optimizers: the reference FER recipe's SGD, with PyTorch semantics, and alternatives."""

from __future__ import annotations

import optax


def sgd_pytorch(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    clip: float | None = 0.1,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)` preceded by element-wise gradient clipping.

    Order as in the reference training script: clip each gradient element to [-clip, clip]
    (`clip_gradient(optimizer, 0.1)`), add `weight_decay * param` to the gradient (PyTorch's
    coupled weight decay, on every parameter), then heavy-ball momentum `buf = m * buf + g`
    (the first step's buffer is g, as PyTorch's) and `param -= lr * buf`.
    """
    parts = []
    if clip is not None:
        parts.append(optax.clip(clip))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)
