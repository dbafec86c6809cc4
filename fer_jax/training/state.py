"""The training state and what the step computes from it: `TrainState`, the `Recipe` of
schedules and optimizer, `create_model`, `create_train_state`, and A-Softmax's lambda
schedule."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fer_jax.model import losses
from fer_jax.model.resnet import ResNet18, model_from_config
from fer_jax.training import (
    optim,
    replicas,
)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    `dropout_key` is the run's base key: step t uses `fold_in(dropout_key, t)` (and the device
    index), so no key needs to be split and stored per step.
    """

    step: jax.Array  # () int32, global optimizer steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    dropout_key: jax.Array  # (2,) uint32
    # `config.ema_decay > 0`: {'params', 'batch_stats'}, their exponential moving average
    # (`update_ema`), which evaluation uses (`ema_view`); else None.
    ema: Any
    # `fer_jax.training.replicas.OVERRIDABLE` values, float32 scalars: set from the config (not
    # checkpointed) and taken by the step as arrays, so replicas may differ in them.
    hparams: dict[str, jax.Array]
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    recipe: Recipe = flax.struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """The step's schedules and optimizer as functions of `(step, hparams)`.

    `parts` (`optim.optimizer_parts` of all replicas) fixes the optimizer's structure, so every
    replica's optimizer state has the same shape whatever its hyperparameter values.
    """

    config: ml_collections.ConfigDict
    steps_per_epoch: int
    parts: dict[str, bool]

    def tx(self, hparams: dict[str, Any]) -> optax.GradientTransformation:
        return optim.create_optimizer(self.config, self.steps_per_epoch, hparams, self.parts)[0]

    def learning_rate(self, step: jax.Array, hparams: dict[str, Any]) -> jax.Array:
        return optim.learning_rate_schedule(self.config, self.steps_per_epoch, hparams)(step)

    def lam(self, step: jax.Array, hparams: dict[str, Any]) -> jax.Array:
        """A-Softmax's lambda (`lambda_schedule`)."""
        schedule = lambda_schedule(self.config.loss, self.steps_per_epoch, self.config.num_epochs)
        return schedule(step, hparams)


def create_model(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> ResNet18:
    """The network of `config.model`; `axis_name` enables cross-device BatchNorm."""
    return model_from_config(
        config.model,
        bn_axis_name=axis_name if config.cross_device_bn else None,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
    )


def create_train_state(
    config: ml_collections.ConfigDict, model: ResNet18, steps_per_epoch: int
) -> TrainState:
    """Fresh state from `config.seed`: random init (the paper), the configured optimizer.

    With `config.replicas = K > 1`, K states (`fer_jax.training.replicas.replica_configs`: own seeds
    and hyperparameters), each exactly as a plain run of its config would start, stacked
    along a leading replica axis.
    """
    configs = replicas.replica_configs(config) if replicas.count(config) > 1 else [config]
    recipe = Recipe(config, steps_per_epoch, optim.optimizer_parts(configs))
    init = jax.jit(functools.partial(model.init, train=False))
    fields = []
    for one in configs:
        # The 'rbg' generator compiles the ~100 initialisers several times faster than
        # threefry on XLA:CPU; it is as deterministic for a given seed. (Replicas are
        # initialised one by one: a vmapped 'rbg' init would not match a plain run's.)
        variables = init(jax.random.key(one.seed, impl="rbg"), jnp.zeros((1, 44, 44, 1)))
        hparams = replicas.hparams(one)
        params = variables["params"]
        fields.append(
            {
                "step": jnp.zeros((), jnp.int32),
                "params": params,
                "batch_stats": variables["batch_stats"],
                "opt_state": recipe.tx(hparams).init(params),
                "dropout_key": jax.random.fold_in(jax.random.PRNGKey(one.seed), 1),
                "ema": start_ema(config, params, variables["batch_stats"]),
                "hparams": hparams,
            }
        )
    state = fields[0] if len(fields) == 1 else replicas.stack(fields)
    return TrainState(**state, apply_fn=model.apply, recipe=recipe)


def start_ema(config: ml_collections.ConfigDict, params: Any, batch_stats: Any) -> Any:
    """The moving average's start, a copy of the weights (None: `config.ema_decay` is 0)."""
    if not config.get("ema_decay", 0.0):
        return None
    return jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})


def update_ema(state: TrainState, decay: float) -> Any:
    """The average after a step: `ema <- d * ema + (1 - d) * new`, of the params and BatchNorm
    statistics, with `d = min(decay, (1 + t) / (10 + t))` at step t (a short memory early on,
    so an average from a random start does not linger there; timm's warm-up)."""
    if state.ema is None:
        return None
    t = state.step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    new = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.tree.map(lambda e, x: d * e + (1.0 - d) * x, state.ema, new)


def ema_view(state: TrainState) -> TrainState:
    """`state` with the moving average in place of the weights and statistics, for evaluation
    (as is, without an average). Works on stacked replica states too."""
    if state.ema is None:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


LAMBDA_UNITS = ("step", "epoch", "run")


# lambda_per='run': the per-epoch curve of a run this long (the reference recipe's 300 epochs)
# compressed into the run's own length, unless `loss.lambda_run_epochs` says otherwise.
DEFAULT_LAMBDA_RUN_EPOCHS = 300.0


def lambda_schedule(
    loss_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int | None = None
) -> Callable[..., jax.Array]:
    """A-Softmax's annealed lambda as a function of the global step (config: `loss` section).

    `max(lambda_min, lambda_base * (1 + lambda_gamma * t) ** -lambda_power)` (SphereFace), with
    t counted in optimizer steps (`lambda_per='step'`, as SphereFace and its PyTorch port), in
    epochs (`'epoch'`, t = step / steps_per_epoch, fractional), or over the run's own length
    (`'run'`, t = lambda_run_epochs * step / (num_epochs * steps_per_epoch): the per-epoch curve
    of a `lambda_run_epochs`-epoch run compressed into this one, so a short run ends at the
    lambda the long recipe ends at). `schedule(step, hparams)` takes the constants from
    `hparams` (a replica's, `fer_jax.training.replicas.hparams`) when given.
    """
    c = loss_config
    if c.lambda_per == "step":
        per = 1.0
    elif c.lambda_per == "epoch":
        per = 1.0 / steps_per_epoch
    else:  # 'run'
        if not num_epochs:
            raise ValueError("config.loss.lambda_per='run' needs the run's num_epochs")
        run_epochs = c.get("lambda_run_epochs", DEFAULT_LAMBDA_RUN_EPOCHS)
        per = run_epochs / (num_epochs * steps_per_epoch)

    def schedule(step: jax.Array, hparams: dict[str, Any] | None = None) -> jax.Array:
        t = jnp.asarray(step, jnp.float32) * per
        names = ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min")
        constants = [c[n] if hparams is None else hparams[f"loss.{n}"] for n in names]
        return losses.sphereface_lambda(t, *constants)

    return schedule
