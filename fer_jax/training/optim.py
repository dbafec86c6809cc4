"""Optimizers: the reference FER recipe's SGD, with PyTorch semantics, and alternatives."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fer_jax.training import replicas


def sgd_pytorch(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: Any = 0.9,
    weight_decay: Any = 5e-4,
    clip: Any = 0.1,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)` preceded by element-wise gradient clipping.

    Order as in the reference training script: clip each gradient element to [-clip, clip]
    (`clip_gradient(optimizer, 0.1)`), add `weight_decay * param` to the gradient (PyTorch's
    coupled weight decay, on every parameter), then heavy-ball momentum `buf = m * buf + g`
    (the first step's buffer is g, as PyTorch's) and `param -= lr * buf`. None leaves a part
    out; values may be traced arrays (a replica's), and a clip <= 0 then passes gradients as
    they are.
    """
    parts = []
    if clip is not None:
        parts.append(_clip(clip))
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    return optax.chain(*parts)


NAMES = ("sgd", "adamw")  # config.optimizer.name
SCHEDULES = ("step", "cosine", "constant")  # config.optimizer.schedule


def _hparam(config, hparams, name: str):
    """`hparams[name]` (a replica's traced value) if given, else the config's value."""
    return replicas.field(config, name) if hparams is None else hparams[name]


def learning_rate_schedule(config, steps_per_epoch: int, hparams=None) -> optax.Schedule:
    """The learning rate as a function of the global step (config: `optimizer` section).

    - 'step' (the reference recipe): `lr * decay_rate ** ((epoch - decay_start) // decay_every)`
      once `epoch > decay_start` (0-based epochs), else `lr`: 0.01, x0.9 every 5 epochs after 80.
    - 'cosine': cosine decay to 0 over `num_epochs`, after `warmup_epochs` of linear warmup.
    - 'constant'.
    `hparams` (`fer_jax.training.replicas.hparams`, possibly traced) supply the learning rate and
    decay rate instead of the config.
    """
    opt = config.optimizer
    lr = _hparam(config, hparams, "optimizer.learning_rate")
    if opt.schedule == "step":
        decay_rate = _hparam(config, hparams, "optimizer.decay_rate")

        def schedule(step):
            epoch = step // steps_per_epoch
            decays = jnp.where(
                epoch > opt.decay_start_epoch,
                (epoch - opt.decay_start_epoch) // opt.decay_every_epochs,
                0,
            )
            return lr * jnp.asarray(decay_rate, jnp.float32) ** decays

        return schedule
    if opt.schedule == "cosine":
        warmup = int(opt.warmup_epochs * steps_per_epoch)
        total = config.num_epochs * steps_per_epoch
        # Of peak 1, scaled: optax's schedule branches on its (here possibly traced) values.
        unit = optax.warmup_cosine_decay_schedule(
            0.0 if warmup else 1.0, 1.0, warmup, max(total, warmup + 1), end_value=0.0
        )
        return lambda step: lr * unit(step)
    return optax.constant_schedule(lr)  # 'constant'


def optimizer_parts(configs) -> dict[str, bool]:
    """Which optional transformations the optimizer of these (replicas') configs includes:
    gradient clipping, weight decay, momentum: each where any config turns it on. The values
    themselves may then differ per replica without changing the optimizer state's structure."""
    opts = [c.optimizer for c in configs]
    return {
        "clip": any(o.grad_clip > 0 for o in opts),
        "decay": any(o.weight_decay != 0 for o in opts),
        "momentum": any(o.momentum != 0 for o in opts),
    }


def _clip(limit) -> optax.GradientTransformation:
    """`optax.clip(limit)` where `limit > 0`, identity elsewhere (`limit` may be traced)."""

    def clip(updates, params=None):
        del params
        return jax.tree.map(lambda g: jnp.where(limit > 0, jnp.clip(g, -limit, limit), g), updates)

    return optax.stateless(clip)


def create_optimizer(
    config, steps_per_epoch: int, hparams=None, parts: dict[str, bool] | None = None
) -> tuple[optax.GradientTransformation, Any]:
    """`(tx, schedule)` for `config.optimizer.name` in {'sgd', 'adamw'}.

    `hparams` (possibly traced, one replica's) override the config's scalar values; `parts`
    (`optimizer_parts`, default: of `config` alone) fixes the structure.
    """
    opt = config.optimizer
    parts = parts or optimizer_parts([config])
    schedule = learning_rate_schedule(config, steps_per_epoch, hparams)
    clip = _hparam(config, hparams, "optimizer.grad_clip") if parts["clip"] else None
    weight_decay = _hparam(config, hparams, "optimizer.weight_decay")
    if opt.name == "sgd":
        tx = sgd_pytorch(
            schedule,
            momentum=_hparam(config, hparams, "optimizer.momentum") if parts["momentum"] else None,
            weight_decay=weight_decay if parts["decay"] else None,
            clip=clip,
        )
    else:  # 'adamw'
        clips = [] if clip is None else [_clip(clip)]
        tx = optax.chain(*clips, optax.adamw(schedule, weight_decay=weight_decay))
    return tx, schedule
