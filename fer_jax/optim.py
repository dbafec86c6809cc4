"""Optimizers: the reference FER recipe's SGD, with PyTorch semantics, and alternatives."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
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


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the global step (config: `optimizer` section).

    - 'step' (the reference recipe): `lr * decay_rate ** ((epoch - decay_start) // decay_every)`
      once `epoch > decay_start` (0-based epochs), else `lr`: 0.01, x0.9 every 5 epochs after 80.
    - 'cosine': cosine decay to 0 over `num_epochs`, after `warmup_epochs` of linear warmup.
    - 'constant'.
    """
    opt = config.optimizer
    lr = opt.learning_rate
    if opt.schedule == "step":

        def schedule(step):
            epoch = step // steps_per_epoch
            decays = jnp.where(
                epoch > opt.decay_start_epoch,
                (epoch - opt.decay_start_epoch) // opt.decay_every_epochs,
                0,
            )
            return lr * jnp.asarray(opt.decay_rate, jnp.float32) ** decays

        return schedule
    if opt.schedule == "cosine":
        warmup = int(opt.warmup_epochs * steps_per_epoch)
        total = config.num_epochs * steps_per_epoch
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else lr, lr, warmup, max(total, warmup + 1), end_value=0.0
        )
    if opt.schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(
        f"config.optimizer.schedule must be 'step', 'cosine' or 'constant', got {opt.schedule!r}"
    )


def create_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
    """`(tx, schedule)` for `config.optimizer.name` in {'sgd', 'adamw'}."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config, steps_per_epoch)
    clip = opt.grad_clip if opt.grad_clip > 0 else None
    if opt.name == "sgd":
        tx = sgd_pytorch(schedule, momentum=opt.momentum, weight_decay=opt.weight_decay, clip=clip)
    elif opt.name == "adamw":
        parts = [optax.clip(clip)] if clip else []
        tx = optax.chain(*parts, optax.adamw(schedule, weight_decay=opt.weight_decay))
    else:
        raise ValueError(f"config.optimizer.name must be 'sgd' or 'adamw', got {opt.name!r}")
    return tx, schedule
