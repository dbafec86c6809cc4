"""One training step and everything it reads: the train state with its optimizer (built once),
the learning-rate and A-Softmax lambda schedules, the pure `train_step` and `eval_step`, and
their compilation for one device (`OneDevice`): a plain run's path, which the options wrap.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fer_jax.model import conv, losses
from fer_jax.model.resnet import ResNet18, model_from_config
from fer_jax.training.metrics import EvalMetrics, eval_metrics, report

NAMES = ("sgd", "adamw")  # config.optimizer.name
SCHEDULES = ("step", "cosine", "constant")  # config.optimizer.schedule
LAMBDA_UNITS = ("step", "epoch", "run")  # config.loss.lambda_per
DEFAULT_LAMBDA_RUN_EPOCHS = 300.0  # lambda_per='run' without `loss.lambda_run_epochs`


def sgd_pytorch(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: Any = 0.9,
    weight_decay: Any = 5e-4,
    clip: Any = 0.1,
) -> optax.GradientTransformation:
    """`torch.optim.SGD(lr, momentum, weight_decay)` after the reference script's element-wise
    clipping to [-clip, clip]: PyTorch's coupled weight decay (`g + wd * param`), then
    heavy-ball momentum (the first buffer is g). None leaves a part out; a clip <= 0 passes
    gradients as they are (values may be traced arrays).
    """
    parts = [] if clip is None else [_clip(clip)]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=momentum))
    return optax.chain(*parts)


def _clip(limit: Any) -> optax.GradientTransformation:
    """`optax.clip(limit)` where `limit > 0`, identity elsewhere (`limit` may be traced)."""

    def clip(updates, params=None):
        del params
        return jax.tree.map(lambda g: jnp.where(limit > 0, jnp.clip(g, -limit, limit), g), updates)

    return optax.stateless(clip)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate of the global step: 'step' (the reference recipe: `lr * decay_rate **
    ((epoch - decay_start) // decay_every)` once `epoch > decay_start`, 0-based), 'cosine' (to 0
    over the run after `warmup_epochs` of linear warmup) or 'constant'. The rate and decay may
    be traced arrays (replicas)."""
    opt = config.optimizer
    lr = opt.learning_rate
    if opt.schedule == "step":
        decay_rate = opt.decay_rate

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
        # Of peak 1, scaled: optax's schedule branches on its values, which may be traced.
        unit = optax.warmup_cosine_decay_schedule(
            0.0 if warmup else 1.0, 1.0, warmup, max(total, warmup + 1), end_value=0.0
        )
        return lambda step: lr * unit(step)
    return optax.constant_schedule(lr)  # 'constant'


def optimizer_parts(configs: list[ml_collections.ConfigDict]) -> dict[str, bool]:
    """Which optional transformations the optimizer includes, each where any of `configs` (runs
    in one program) turns it on: their values may then differ in one state structure."""
    opts = [c.optimizer for c in configs]
    return {
        "clip": any(o.grad_clip > 0 for o in opts),
        "decay": any(o.weight_decay != 0 for o in opts),
        "momentum": any(o.momentum != 0 for o in opts),
    }


def create_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    parts: dict[str, bool] | None = None,
) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer.name` ('sgd': `sgd_pytorch`, or 'adamw'), its
    scalars possibly traced; `parts` (`optimizer_parts`) fix its form."""
    opt = config.optimizer
    parts = parts or optimizer_parts([config])
    schedule = learning_rate_schedule(config, steps_per_epoch)
    clip = opt.grad_clip if parts["clip"] else None
    if opt.name == "sgd":
        return sgd_pytorch(
            schedule,
            momentum=opt.momentum if parts["momentum"] else None,
            weight_decay=opt.weight_decay if parts["decay"] else None,
            clip=clip,
        )
    clips = [] if clip is None else [_clip(clip)]  # 'adamw'
    return optax.chain(*clips, optax.adamw(schedule, weight_decay=opt.weight_decay))


def lambda_schedule(
    loss_config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    num_epochs: int | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """A-Softmax's lambda of the global step: `max(lambda_min, lambda_base * (1 + lambda_gamma *
    t) ** -lambda_power)` (SphereFace), t counted in steps (`lambda_per='step'`), epochs
    (`'epoch'`, fractional) or over the run (`'run'`: t = lambda_run_epochs * step / total steps,
    so a short run ends at the lambda the long recipe ends at). The constants may be traced.
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
    constants = [c[n] for n in ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min")]

    def schedule(step: jax.Array) -> jax.Array:
        return losses.sphereface_lambda(jnp.asarray(step, jnp.float32) * per, *constants)

    return schedule


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """What the step takes from the config besides the weights (`create_recipe`)."""

    tx: optax.GradientTransformation
    learning_rate: Callable[[jax.Array], jax.Array]
    lam: Callable[[jax.Array], jax.Array]  # A-Softmax's lambda (`lambda_schedule`)
    margin: int | jax.Array
    dropout_rate: float | jax.Array


def create_recipe(
    config: ml_collections.ConfigDict, steps_per_epoch: int, parts: dict[str, bool] | None = None
) -> Recipe:
    """The `Recipe` of `config` (its scalars possibly traced), the optimizer of `parts`
    (`optimizer_parts` of all the configs in one program)."""
    return Recipe(
        tx=create_optimizer(config, steps_per_epoch, parts),
        learning_rate=learning_rate_schedule(config, steps_per_epoch),
        lam=lambda_schedule(config.loss, steps_per_epoch, config.num_epochs),
        margin=config.loss.margin,
        dropout_rate=config.model.dropout_rate,
    )


@flax.struct.dataclass
class TrainState:
    """What a run carries from step to step (the checkpoint's fields), and the static
    `apply_fn` and `recipe`."""

    step: jax.Array  # () int32, global optimizer steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    dropout_key: jax.Array  # (2,) uint32; step t uses fold_in(dropout_key, t)
    ema: Any  # {'params', 'batch_stats'} moving average (`update_ema`), or None
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    recipe: Recipe = flax.struct.field(pytree_node=False)


def create_model(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> ResNet18:
    """The network of `config.model`; `axis_name` enables cross-device BatchNorm."""
    return model_from_config(
        config.model,
        bn_axis_name=axis_name if config.cross_device_bn else None,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
    )


def init_fields(
    config: ml_collections.ConfigDict, model: ResNet18, tx: optax.GradientTransformation
) -> dict[str, Any]:
    """The checkpointed fields of a fresh state from `config.seed`."""
    # 'rbg' compiles the ~100 initialisers several times faster than threefry on XLA:CPU.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(config.seed, impl="rbg"), jnp.zeros((1, 44, 44, 1)))
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(params),
        "dropout_key": jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
        "ema": start_ema(config, params, variables["batch_stats"]),
    }


def create_train_state(
    config: ml_collections.ConfigDict, model: ResNet18, steps_per_epoch: int
) -> TrainState:
    """Fresh state of `config`."""
    recipe = create_recipe(config, steps_per_epoch)
    return TrainState(**init_fields(config, model, recipe.tx), apply_fn=model.apply, recipe=recipe)


def start_ema(config: ml_collections.ConfigDict, params: Any, batch_stats: Any) -> Any:
    """The moving average's start, a copy of the weights (None: `config.ema_decay` is 0)."""
    if not config.get("ema_decay", 0.0):
        return None
    return jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})


def update_ema(state: TrainState, decay: float) -> Any:
    """`ema <- d * ema + (1 - d) * new` with `d = min(decay, (1 + t) / (10 + t))` at step t
    (timm's warm-up: a random start does not linger)."""
    if state.ema is None:
        return None
    t = state.step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    new = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.tree.map(lambda e, x: d * e + (1.0 - d) * x, state.ema, new)


def ema_view(state: TrainState) -> TrainState:
    """`state` with the moving average (if any) in place of the weights, for evaluation."""
    if state.ema is None:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `{'image': (B, 44, 44, 1) float32, 'label': (B,) int32}` (B per
    device; gradients, metrics and local BatchNorm statistics averaged over `axis_name`)."""
    recipe = state.recipe
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    labels = batch["label"]
    lam = recipe.lam(state.step)
    (dropout_rate,) = losses.run_time(recipe.dropout_rate)  # as the margin: not folded

    def loss_fn(params):
        (logits, features), mutated = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            return_features=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
            dropout_rate=dropout_rate,
        )
        if config.model.head == "a_softmax":
            kernel = params["linear"]["kernel"]
            loss = losses.a_softmax_loss(features, kernel, labels, margin=recipe.margin, lam=lam)
        else:
            loss = losses.softmax_cross_entropy(logits, labels)
        return loss, (logits, features, mutated["batch_stats"])

    (loss, (logits, features, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    metrics = {  # the training metrics, named here only: `metrics.train_summaries` averages each
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # A-Softmax's failure mode drives the features to 0 (loss -> log K): this shows it.
        "feature_norm": jnp.mean(losses.feature_norm(features.astype(jnp.float32))),
    }
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
        if not config.cross_device_bn:
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
    updates, opt_state = recipe.tx.update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = recipe.learning_rate(state.step)
    metrics["lambda"] = lam
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    new_state = new_state.replace(ema=update_ema(new_state, config.get("ema_decay", 0.0)))
    return new_state, metrics


def tencrop_logits(state: TrainState, images: jax.Array) -> jax.Array:
    """`(B, crops, 44, 44, 1)` -> `(B, classes)` logits, the mean of the crops'."""
    b, crops = images.shape[:2]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        images.reshape((b * crops,) + images.shape[2:]),
        train=False,
    )
    return logits.reshape(b, crops, -1).mean(axis=1)


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None
) -> EvalMetrics:
    """The `EvalMetrics` (summed over devices) of `{'image': (B, crops, 44, 44, 1), 'label':
    (B,), 'mask': (B,)}`, each image's crops' logits averaged."""
    logits = tencrop_logits(state, batch["image"])
    out = eval_metrics(logits, batch["label"], batch["mask"])
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


@dataclasses.dataclass(frozen=True)
class OneModel:
    """The model the steps train: one (the options may train K in one program)."""

    config: ml_collections.ConfigDict
    count: int = 1

    def create_state(self, model: ResNet18, steps_per_epoch: int) -> TrainState:
        return create_train_state(self.config, model, steps_per_epoch)

    def train_step(self) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
        """`step(state, batch, *, axis_name) -> (state, metrics)`."""
        return functools.partial(train_step, config=self.config)

    def eval_step(self) -> Callable[..., Any]:
        """`step(state, batch, *, axis_name) -> summed metrics`."""
        return eval_step

    def gather(self, fn: Callable[..., Any]) -> Callable[..., Any]:

        return fn

    def epoch_plan(self, plan_of: Callable[[int], dict[str, np.ndarray]]):

        return plan_of(self.config.seed)

    def batches(self, stream_of: Callable[[int], Iterator[Any]]) -> Iterator[Any]:

        return stream_of(self.config.seed)

    report = staticmethod(report)  # `metrics.report` of the eval step's host-side totals


class Compiled:
    """A jitted (or pmapped) function compiled ahead of time once per argument shape, so that
    `compile_seconds` (all shapes so far) is kept apart from the time spent running."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.compile_seconds = 0.0
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            start = time.perf_counter()
            compiled = self.fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self._compiled[key] = compiled
        return compiled(*args)


class OneDevice:
    """Step functions compiled for one device, and their arrays placed there."""

    axis_name = None
    num_devices = 1

    def __init__(self, device: jax.Device | None = None):
        self.devices = [device or jax.devices()[0]]

    def compile(self, step: Callable[..., Any], *, donate_state: bool = True, **_: Any) -> Compiled:
        """`step(state, *data, *, axis_name)` -> compiled `fn(state, *data)`, donating the
        state (on CPU: `conv.cpu_compiler_options`)."""
        options = conv.cpu_compiler_options(self.devices[0].platform)
        fn = functools.partial(step, axis_name=None)
        donate = (0,) if donate_state else ()
        return Compiled(jax.jit(fn, donate_argnums=donate, compiler_options=options))

    def replicate(self, tree: Any) -> Any:
        """A fresh device copy of a host or device pytree (the step donates its state)."""
        return jax.device_put(jax.device_get(tree), self.devices[0])

    def unreplicate(self, tree: Any) -> Any:
        return jax.device_get(tree)

    def place(self, tree: Any, split_axis: int | None) -> Any:
        """A host pytree -> device arrays, as the compiled steps take them."""
        del split_axis  # one device holds it all
        return jax.device_put(tree, self.devices[0])
