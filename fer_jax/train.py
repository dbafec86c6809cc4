"""Training and evaluation steps, and the training loop (in the style of flax/examples/imagenet).

`create_train_state` builds the state; `train_step` and `eval_step` are pure functions of
(state, batch) that `fer_jax.parallel.DataParallel` compiles for one or many devices;
`train_and_evaluate(config, workdir)` runs a whole training job and resumes it after any
interruption from the checkpoints in `workdir`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from data_pipelines.crops import NUM_CROPS
from data_pipelines.plan import epoch_plan
from data_pipelines.plan import steps_per_epoch as plan_steps_per_epoch
from fer_jax import (
    checkpoint,
    device_input,
    evaluate,
    flops,
    input_data,
    losses,
    optim,
    replicas,
    run_config,
)
from fer_jax.device_input import plan_chunk
from fer_jax.parallel import Compiled, DataParallel
from fer_jax.resnet import ResNet18, model_from_config
from fer_jax.summary_writer import SummaryWriter


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
    # `fer_jax.replicas.OVERRIDABLE` values, float32 scalars: set from the config (not
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

    With `config.replicas = K > 1`, K states (`fer_jax.replicas.replica_configs`: own seeds
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
                "hparams": hparams,
            }
        )
    state = fields[0] if len(fields) == 1 else replicas.stack(fields)
    return TrainState(**state, apply_fn=model.apply, recipe=recipe)


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
    `hparams` (a replica's, `fer_jax.replicas.hparams`) when given.
    """
    c = loss_config
    if c.lambda_per not in LAMBDA_UNITS:
        raise ValueError(
            f"config.loss.lambda_per must be one of {LAMBDA_UNITS}, got {c.lambda_per!r}"
        )
    if c.lambda_per == "step":
        per = 1.0
    elif c.lambda_per == "epoch":
        per = 1.0 / steps_per_epoch
    else:
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


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    axis_name: str | None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on `{'image': (B, 44, 44, 1) float32, 'label': (B,) int32}`.

    Under data parallelism B is the per-device batch; gradients and metrics are averaged over
    `axis_name`, and BatchNorm statistics too when they are not already global.
    """
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    labels = batch["label"]
    hparams = state.hparams
    lam = state.recipe.lam(state.step, hparams)

    def loss_fn(params):
        (logits, features), mutated = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            return_features=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
            dropout_rate=hparams["model.dropout_rate"],
        )
        if config.model.head == "a_softmax":
            kernel = params["linear"]["kernel"]
            margin = hparams["loss.margin"]
            loss = losses.a_softmax_loss(features, kernel, labels, margin=margin, lam=lam)
        else:
            loss = losses.softmax_cross_entropy(logits, labels)
        return loss, (logits, features, mutated["batch_stats"])

    (loss, (logits, features, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # Mean |x| of the classifier's input: A-Softmax's failure mode is driving it to 0
        # (logits -> 0, loss -> log K, the final ReLUs dead), which this makes visible.
        "feature_norm": jnp.mean(losses.feature_norm(features.astype(jnp.float32))),
    }
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
        if not config.cross_device_bn:
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
    updates, opt_state = state.recipe.tx(hparams).update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = state.recipe.learning_rate(state.step, hparams)
    metrics["lambda"] = lam
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, metrics


def tencrop_logits(state: TrainState, images: jax.Array) -> jax.Array:
    """`(B, crops, 44, 44, 1)` -> `(B, classes)` logits, each the mean of its crops' (ten, or
    the centre one)."""
    b, crops = images.shape[:2]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        images.reshape((b * crops,) + images.shape[2:]),
        train=False,
    )
    return logits.reshape(b, crops, -1).mean(axis=1)


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the masked batch of `(B, K)` logits: 'confusion' `(K, K)` counts (rows true,
    columns predicted), 'loss' (summed cross-entropy) and 'count'."""
    num_classes = logits.shape[-1]
    mask = mask.astype(jnp.float32)
    truth = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "confusion": truth.T @ pred,
        "loss": jnp.sum(per_example * mask),
        "count": jnp.sum(mask),
    }


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None
) -> dict[str, jax.Array]:
    """Evaluation of `{'image': (B, crops, 44, 44, 1), 'label': (B,), 'mask': (B,)}`.

    The logits of each image's crops (ten, or the centre one) are averaged. Returns
    `eval_sums`, reduced over devices.
    """
    logits = tencrop_logits(state, batch["image"])
    out = eval_sums(logits, batch["label"], batch["mask"])
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


def replica_eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    axis_name: str | None,
    replica_map: str = "vmap",
) -> dict[str, jax.Array]:
    """`eval_step` of a stacked `(K, ...)` state: each replica's sums (leading axis K) and
    'ensemble_confusion' / 'ensemble_loss' of the K replicas' ten-crop probabilities averaged.
    `replica_map`: `fer_jax.replicas.map_over`'s kind."""
    logits = replicas.map_over(tencrop_logits, replica_map, (0, None))(state, batch["image"])
    out = jax.vmap(eval_sums, in_axes=(0, None, None))(logits, batch["label"], batch["mask"])
    probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    # log p as logits: the cross-entropy is -log p(label), the argmax that of p.
    ensemble = eval_sums(jnp.log(jnp.maximum(probs, 1e-30)), batch["label"], batch["mask"])
    out = {**out, "ensemble_confusion": ensemble["confusion"], "ensemble_loss": ensemble["loss"]}
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


INPUT_PIPELINES = ("device", "tf_data")
EVAL_CROPS = (NUM_CROPS, 1)  # ten-crop (the paper's evaluation) or the centre crop alone


def select_crops(config: ml_collections.ConfigDict) -> int:
    """Crops of the per-epoch model-selection evaluation (`config.select_crops`): 10, as the
    report, or 1, the centre crop: a tenth of the compute, for CPU runs where ten-crop
    selection would cost a third of each epoch. The final report is ten-crop either way."""
    crops = config.get("select_crops", NUM_CROPS)
    if crops not in EVAL_CROPS:
        raise ValueError(f"config.select_crops must be one of {EVAL_CROPS}, got {crops!r}")
    return crops


def input_pipeline(config: ml_collections.ConfigDict) -> str:
    """`config.input_pipeline`, '' meaning 'device': the fast path on an H200, and as fast as
    tf.data on CPU (experiments/results/input_pipeline_cpu/), with no TensorFlow needed."""
    mode = config.get("input_pipeline", "") or "device"
    if mode not in INPUT_PIPELINES:
        raise ValueError(
            f"config.input_pipeline must be one of {INPUT_PIPELINES} (or '' for the default), "
            f"got {mode!r}"
        )
    return mode


@dataclasses.dataclass
class Trainer:
    """The compiled steps of one training job, shared by training and CV folds.

    With `input_pipeline == 'device'` the data live on the devices (`fer_jax.device_input`):
    a training call runs a chunk of steps and an evaluation call a whole split; with
    'tf_data' the tf.data pipelines feed one batch per call.
    """

    config: ml_collections.ConfigDict
    parallel: DataParallel
    model: ResNet18
    input_pipeline: str
    _train_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_arrays: list[tuple[np.ndarray, np.ndarray, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> Trainer:
        parallel = DataParallel(config.parallelism)
        n = parallel.num_devices
        if config.batch_size % n or config.eval_batch_size % n:
            raise ValueError(
                f"config.batch_size ({config.batch_size}) and config.eval_batch_size "
                f"({config.eval_batch_size}) must be divisible by the {parallel.num_devices} "
                "devices"
            )
        mode = input_pipeline(config)
        replicas.check(config)
        replicas.map_kind(config, parallel.devices[0].platform)
        if config.steps_per_dispatch < 0:
            raise ValueError(
                f"config.steps_per_dispatch must be >= 0 (0: per platform), got "
                f"{config.steps_per_dispatch}"
            )
        model = create_model(config, axis_name=parallel.axis_name)
        return cls(config, parallel, model, mode)

    @property
    def replicas(self) -> int:
        """K: the number of replicas the steps run over (1: no replica axis)."""
        return replicas.count(self.config)

    @property
    def replica_map(self) -> str:
        """'vmap' or 'unroll' (`fer_jax.replicas.map_kind`)."""
        return replicas.map_kind(self.config, self.parallel.devices[0].platform)

    def _over_replicas(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step(state, batch, *, axis_name)` of one replica -> of the stacked state and
        per-replica batches (leading axis K), when there are replicas."""
        if self.replicas == 1:
            return step
        kind = self.replica_map

        def over_replicas(state, batch, *, axis_name):
            one = functools.partial(step, axis_name=axis_name)
            return replicas.map_over(one, kind, (0, 0))(state, batch)

        return over_replicas

    @property
    def steps_per_dispatch(self) -> int:
        """Training steps per call: 1 with tf.data; `config.steps_per_dispatch` on the device,
        0 meaning 64 on accelerators and 1 on CPU (`configs/common.py`)."""
        if self.input_pipeline == "tf_data":
            return 1
        if self.config.steps_per_dispatch:
            return self.config.steps_per_dispatch
        return 1 if self.parallel.devices[0].platform == "cpu" else 64

    def train_fn(self, layout: device_input.Layout | None = None) -> Compiled:
        """tf_data: `fn(state, batch)`; device: `fn(state, images, labels, plan)` for data of
        `layout`. Both return `(state, metrics)`. With replicas the batch is `(K, B, ...)` and
        the plan `(L, K, B)`, and metrics have a trailing replica axis."""
        fn = self._train_fns.get(layout)
        if fn is None:
            step = self._over_replicas(functools.partial(train_step, config=self.config))
            if layout is None:
                fn = self.parallel.compile(step, split_axes=(0 if self.replicas == 1 else 1,))
            else:
                chunk = device_input.train_chunk_fn(step, layout)
                fn = self.parallel.compile(chunk, split_axes=(0, None, None))
            self._train_fns[layout] = fn
        return fn

    def _eval_fn(self, layout: device_input.Layout | None, crops: int) -> Compiled:
        fn = self._eval_fns.get((layout, crops))
        if fn is None:
            step = eval_step
            if self.replicas > 1:
                step = functools.partial(replica_eval_step, replica_map=self.replica_map)
            if layout is None:
                fn = self.parallel.compile(step, donate_state=False, replicated_out=1)
            else:
                evaluate_split = device_input.eval_split_fn(step, layout, crops)
                fn = self.parallel.compile(
                    evaluate_split, split_axes=(1, 1, 1), donate_state=False, replicated_out=1
                )
            self._eval_fns[(layout, crops)] = fn
        return fn

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent compiling so far: {'train': ..., 'eval': ...}."""
        return {
            "train": sum(f.compile_seconds for f in self._train_fns.values()),
            "eval": sum(f.compile_seconds for f in self._eval_fns.values()),
        }

    def _device_eval_arrays(self, images: np.ndarray, labels: np.ndarray):
        for held_images, held_labels, arrays in self._eval_arrays:
            if held_images is images and held_labels is labels:
                return arrays
        arrays = device_input.put_eval_arrays(
            self.parallel,
            images,
            labels,
            self.config.eval_batch_size,
            normalize=self.config.normalize,
        )
        # Keep the few splits in use (select, report, a CV fold) on the devices.
        self._eval_arrays = [*self._eval_arrays[-2:], (images, labels, arrays)]
        return arrays

    def evaluate(
        self, state: TrainState, images: np.ndarray, labels: np.ndarray, crops: int = NUM_CROPS
    ) -> dict:
        """Metrics (`evaluate.metrics_from_confusion`) of replicated `state` on the ten crops
        (`crops=10`) or the centre crop alone (`crops=1`); with replicas
        `{'replicas': [metrics of each], 'ensemble': metrics}`."""
        if crops not in EVAL_CROPS:
            raise ValueError(f"crops must be one of {EVAL_CROPS}, got {crops!r}")
        if self.input_pipeline == "device":
            arrays = self._device_eval_arrays(images, labels)
            fn = self._eval_fn(arrays.layout, crops)
            totals = fn(state, arrays.images, arrays.labels, arrays.mask)
        else:
            import data_pipelines

            ds = data_pipelines.eval_dataset_from_arrays(
                images,
                labels,
                batch_size=self.config.eval_batch_size,
                num_devices=self.parallel.batch_shape_devices,
                normalize=self.config.normalize,
                crops="ten" if crops == NUM_CROPS else "centre",
            )
            if crops == 1:  # (..., B, c, c, C) -> (..., B, 1, c, c, C), as eval_step takes
                ds = ds.map(lambda b: {**b, "image": b["image"][..., None, :, :, :]})
            fn = self._eval_fn(None, crops)
            totals = None
            for batch in self.parallel.prefetch(ds.as_numpy_iterator()):
                out = fn(state, batch)
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = self.parallel.unreplicate(totals)
        counted = np.ravel(totals["count"])[0]
        if int(round(float(counted))) != len(labels):
            raise RuntimeError(f"evaluated {counted} examples, expected {len(labels)}")
        if self.replicas == 1:
            return evaluate.metrics_from_confusion(
                np.asarray(totals["confusion"]), loss_sum=float(totals["loss"])
            )
        return {
            "replicas": [
                evaluate.metrics_from_confusion(np.asarray(c), loss_sum=float(loss))
                for c, loss in zip(totals["confusion"], totals["loss"], strict=True)
            ],
            "ensemble": evaluate.metrics_from_confusion(
                np.asarray(totals["ensemble_confusion"]), loss_sum=float(totals["ensemble_loss"])
            ),
        }


def _log_train_metrics(
    writers: list[SummaryWriter], history: list[dict], step: int, images_per_s: float
) -> None:
    """Writes the mean of each metric over `history` (one dict per dispatch: scalars, or
    arrays with a leading step axis; with K replicas a trailing replica axis) to each
    replica's writer; a non-finite loss stops the run, naming its step (and replica)."""
    stacked = jax.device_get(history)
    k = len(writers)
    per_step = {  # (steps, K)
        name: np.concatenate([np.asarray(h[name], np.float64).reshape(-1, k) for h in stacked])
        for name in stacked[0]
    }
    bad_steps, bad_replicas = np.nonzero(~np.isfinite(per_step["loss"]))
    if bad_steps.size:
        first = step - len(per_step["loss"]) + int(bad_steps[0]) + 1
        value = per_step["loss"][bad_steps[0], bad_replicas[0]]
        which = f" of replica {int(bad_replicas[0])}" if k > 1 else ""
        raise FloatingPointError(
            f"non-finite training loss{which} ({value}) at step {first}; stopping. "
            "The last good checkpoint is kept in the workdir."
        )
    for replica, writer in enumerate(writers):
        summary = {f"train_{name}": float(np.mean(v[:, replica])) for name, v in per_step.items()}
        summary["train_images_per_second"] = images_per_s / k
        writer.write_scalars(step, summary)


def _per_replica(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """`Trainer.evaluate`'s result as one metrics dict per replica (one without replicas)."""
    return metrics["replicas"] if "replicas" in metrics else [metrics]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_changes: bool = False
) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Writes TensorBoard events, per-evaluation JSON metrics and confusion-matrix PNGs, and
    Orbax checkpoints (latest few + best by `config.select_split` accuracy). Returns the
    final summary (also `workdir/results.json`): the selected model's `config.report_split`
    metrics, and where it came from. (The JAFFE cross-validation that may follow is run by
    `fer_jax.main`, above both this module and `cross_validate`.)
    """
    workdir = checkpoint.prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    # config.json: written at the first start; a resume with another recipe is refused.
    run_config.save_or_compare(config, workdir, allow_changes=allow_config_changes)
    splits = input_data.load_splits(
        config, [config.train_split, config.select_split, config.report_split]
    )
    train_images, train_labels = splits[config.train_split]
    trainer = Trainer.create(config)
    summary = fit(
        trainer,
        workdir,
        train_images,
        train_labels,
        select=splits[config.select_split],
        select_name=config.select_split,
    )
    best = checkpoint.restore_best_or_latest(workdir, summary["template"])
    state = trainer.parallel.replicate(best.state)
    report = trainer.evaluate(state, *splits[config.report_split])
    centre = trainer.evaluate(state, *splits[config.report_split], crops=1)
    results = _results(config, best, report, summary["performance"], centre=centre)
    if is_main:
        eval_dir = os.path.join(workdir, "eval")
        name = f"{config.report_split}_selected"
        evaluate.write_report(eval_dir, name, results[config.report_split])
        evaluate.write_report(eval_dir, f"{name}_centre_crop", results["centre_crop"])
        if trainer.replicas > 1:
            for k, metrics in enumerate(report["replicas"]):
                evaluate.write_report(os.path.join(eval_dir, f"replica_{k}"), name, metrics)
            evaluate.write_report(eval_dir, f"{config.report_split}_ensemble", report["ensemble"])
        evaluate.write_json(os.path.join(workdir, "results.json"), results)
    logging.info(
        "%s accuracy of the model chosen on %s (step %d): %.4f",
        config.report_split,
        config.select_split,
        results["selected_step"],
        results[config.report_split]["accuracy"],
    )
    if trainer.replicas > 1:
        logging.info(
            "%d replicas: %s accuracy %.4f +- %.4f (ensemble %.4f)",
            trainer.replicas,
            config.report_split,
            results["mean_accuracy"],
            results["std_accuracy"],
            results["ensemble_accuracy"],
        )
    return results


def _results(
    config: ml_collections.ConfigDict,
    best: checkpoint.Restored,
    report: dict[str, Any],
    performance: dict[str, Any] | None,
    *,
    centre: dict[str, Any],
) -> dict[str, Any]:
    """`results.json`: the report split's ten-crop metrics of the model chosen on the select
    split (with replicas: of the replica that scored best there), its centre-crop metrics
    ('centre_crop', from `centre`), and per replica, their mean, standard deviation (ddof=1;
    None for one) and the ensemble's accuracy."""
    per = _per_replica(report)
    selections = checkpoint.replica_selections(best)
    chosen = checkpoint.chosen_replica(best.meta)
    entries = [
        {
            "replica": k,
            "seed": seed,
            "overrides": fields,
            **selections[k],
            config.report_split: metrics,
        }
        for k, (seed, fields, metrics) in enumerate(
            zip(replicas.seeds(config), replicas.overrides(config), per, strict=True)
        )
    ]
    accuracies = np.array([m["accuracy"] for m in per])
    results = {
        "report_split": config.report_split,
        "selected_on": config.select_split,
        **selections[chosen],
        config.report_split: per[chosen],
        "centre_crop": _per_replica(centre)[chosen],
        "replicas": entries,
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else None,
        "ensemble_accuracy": report.get("ensemble", per[0])["accuracy"],
        "performance": performance,
    }
    if len(per) > 1:
        results["selected_replica"] = chosen
        results["ensemble"] = report["ensemble"]
    return results


def _dispatches(
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    steps_per_dispatch: int,
    checkpoint_every_steps: int,
) -> Iterator[tuple[int, int]]:
    """`(first global step, steps)` of each device-mode call: at most `steps_per_dispatch`
    steps, ending at every epoch end and every multiple of `checkpoint_every_steps` (if > 0).
    A function of the step alone: a resumed run makes the same calls as an uninterrupted one
    from there on (so it ends bit-identical)."""
    step = start_step
    every = checkpoint_every_steps
    while step < total_steps:
        end = min(step + steps_per_dispatch, (step // steps_per_epoch + 1) * steps_per_epoch)
        if every > 0:
            end = min(end, (step // every + 1) * every)
        yield step, end - step
        step = end


def _train_feed(
    trainer: Trainer,
    images: np.ndarray,
    labels: np.ndarray,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
) -> Iterator[tuple[int, Callable[[TrainState], tuple[TrainState, dict]]]]:
    """`(steps, run)` per call of the compiled training function from `start_step` on, where
    `run(state) -> (state, metrics)` does `steps` optimizer steps; both input modes feed the
    same batches (`data_pipelines.plan.epoch_plan`), those of each replica's seed."""
    config, parallel = trainer.config, trainer.parallel
    seeds = replicas.seeds(config)
    if trainer.input_pipeline == "tf_data":
        import data_pipelines

        def pipeline(seed: int, num_devices: int | None):
            return data_pipelines.train_dataset_from_arrays(
                images,
                labels,
                batch_size=config.batch_size,
                seed=seed,
                start_epoch=start_step // steps_per_epoch,
                start_step=start_step % steps_per_epoch,
                num_epochs=config.num_epochs - start_step // steps_per_epoch,
                num_devices=num_devices,
                normalize=config.normalize,
            )

        fn = trainer.train_fn()
        if len(seeds) == 1:
            batches = pipeline(seeds[0], parallel.batch_shape_devices).as_numpy_iterator()
            split_axis = 0
        else:  # (K, B, ...): one batch per replica, from its own seed
            streams = [pipeline(seed, None).as_numpy_iterator() for seed in seeds]
            batches = (replicas.stack(bs) for bs in zip(*streams, strict=True))
            split_axis = 1
        for batch in parallel.prefetch(batches, split_axis=split_axis):
            yield 1, lambda s, b=batch: fn(s, b)
        return
    data = device_input.put_train_arrays(parallel, images, labels, normalize=config.normalize)
    fn = trainer.train_fn(data.layout)
    epoch, plan = -1, None
    calls = _dispatches(
        start_step,
        total_steps,
        steps_per_epoch,
        trainer.steps_per_dispatch,
        config.checkpoint_every_steps,
    )
    for first, steps in calls:
        if first // steps_per_epoch != epoch:
            epoch = first // steps_per_epoch
            plans = [
                epoch_plan(
                    len(labels),
                    config.batch_size,
                    seed=seed,
                    epoch=epoch,
                    image_shape=images.shape[1:3],
                )
                for seed in seeds
            ]
            # Replicas: (S, K, B) arrays, step-major like one replica's (S, B).
            plan = plans[0] if len(plans) == 1 else replicas.stack_plans(plans)
        rows = parallel.place(plan_chunk(plan, first % steps_per_epoch, steps), None)
        yield steps, lambda s, rows=rows: fn(s, data.images, data.labels, rows)


def fit(
    trainer: Trainer,
    workdir: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    select: tuple[np.ndarray, np.ndarray] | None = None,
    select_name: str = "",
) -> dict[str, Any]:
    """The training loop: resume, train `config.num_epochs`, evaluate, checkpoint.

    Returns `{'state': final host state, 'template': host template for restores,
    'performance': speed figures of this process's training (`performance` keys)}`.
    """
    config = trainer.config
    parallel = trainer.parallel
    wall_start = time.perf_counter()
    steps_per_epoch = plan_steps_per_epoch(len(train_labels), config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    template = create_train_state(config, trainer.model, steps_per_epoch)
    manager = checkpoint.Checkpoints(workdir, config)

    restored = manager.restore_latest(template)
    if restored is not None:
        host_state, meta = restored.state, restored.meta
        logging.info(
            "Resuming from step %d (epoch %d, step %d of it).",
            restored.step,
            meta["epoch"],
            meta["step_in_epoch"],
        )
    else:
        host_state = template
        if config.init_from:
            host_state = checkpoint.init_from(config.init_from, template, config)
        meta = {"epoch": 0, "step_in_epoch": 0}
    start_step = int(np.ravel(host_state.step)[0])  # replicas step together
    if start_step >= total_steps:
        logging.info("Training already finished (%d steps).", start_step)
        manager.close()
        return {"state": host_state, "template": template, "performance": None}

    is_main = jax.process_index() == 0
    writer = SummaryWriter(workdir, enabled=is_main)
    # Training curves: one writer per replica (TensorBoard runs replica_<k>), else `writer`.
    num_replicas = trainer.replicas
    curves = [writer]
    if num_replicas > 1:
        curves = [
            SummaryWriter(os.path.join(workdir, f"replica_{k}"), enabled=is_main)
            for k in range(num_replicas)
        ]
    writers = [writer] if num_replicas == 1 else [writer, *curves]
    if start_step == 0:
        params = host_state.params
        _log_parameter_count(replicas.take(params, 0) if num_replicas > 1 else params)
        writer.write_hparams(_flat_hparams(config))
        if num_replicas > 1:
            for curve, one in zip(curves, replicas.replica_configs(config), strict=True):
                curve.write_hparams(_flat_hparams(one))
    state = parallel.replicate(host_state)
    timer = _Timer(trainer)
    history: list[dict] = []
    t_log, step = time.perf_counter(), start_step
    feed = _train_feed(
        trainer, train_images, train_labels, start_step, total_steps, steps_per_epoch
    )
    stop = StopSignal()
    try:
        for steps, run in feed:
            state, metrics = run(state)
            history.append(metrics)
            step += steps
            timer.steps += steps
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            end_of_epoch = step_in_epoch == 0
            crossed_log = step // config.log_every_steps > (step - steps) // config.log_every_steps
            if crossed_log or end_of_epoch:
                dt = time.perf_counter() - t_log
                history = parallel.unreplicate(history)  # pmap: drop the device axis
                images = sum(np.size(h["loss"]) for h in history) * config.batch_size
                _log_train_metrics(curves, history, step, images / dt)
                logging.info(
                    "epoch %d/%d, step %d/%d (global %d/%d)",
                    epoch + (not end_of_epoch),
                    config.num_epochs,
                    step_in_epoch or steps_per_epoch,
                    steps_per_epoch,
                    step,
                    total_steps,
                )
                history, t_log = [], time.perf_counter()
            completed_epochs = epoch
            eval_now = (
                end_of_epoch
                and select is not None
                and config.eval_every_epochs > 0
                and (completed_epochs % config.eval_every_epochs == 0 or step == total_steps)
            )
            stop_now = stop.agreed()  # SIGTERM / Ctrl-C: checkpoint this step, then stop
            save_now = (
                (end_of_epoch and completed_epochs % config.checkpoint_every_epochs == 0)
                or (config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0)
                or step == total_steps
                or stop_now
            )
            if not (eval_now or save_now):
                continue
            timer.pause(state)
            select_accuracy = None
            if eval_now:
                crops = select_crops(config)
                select_metrics = trainer.evaluate(state, *select, crops=crops)
                timer.evaluated(len(select[1]) * crops)
                per_replica = _per_replica(select_metrics)
                for k, (metrics, curve) in enumerate(zip(per_replica, curves, strict=True)):
                    if is_main:
                        replica_dir = f"replica_{k}" if num_replicas > 1 else ""
                        evaluate.write_report(
                            os.path.join(workdir, "eval", replica_dir),
                            f"{select_name}_epoch{completed_epochs:03d}",
                            metrics,
                        )
                    scalars = evaluate.scalar_metrics(metrics)
                    curve.write_scalars(
                        step, {f"{select_name}_{name}": v for name, v in scalars.items()}
                    )
                if num_replicas > 1:
                    ensemble = select_metrics["ensemble"]["accuracy"]
                    writer.write_scalars(step, {f"{select_name}_ensemble_accuracy": ensemble})
                select_accuracy = [m["accuracy"] for m in per_replica]
            if history:  # check the steps since the last log before saving anything
                _log_train_metrics(curves, parallel.unreplicate(history), step, float("nan"))
                history = []
            host_state = parallel.unreplicate(state)
            meta = {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "steps_per_epoch": steps_per_epoch,
            }
            if save_now:
                manager.save(step, host_state, meta)
            if select_accuracy is not None:
                manager.maybe_save_best(step, host_state, meta, select_accuracy)
            for w in writers:
                w.flush()
            if stop_now:
                manager.close()  # waits for the checkpoint to be written
                raise Interrupted(stop.signum, step)
            timer.resume()
            t_log = time.perf_counter()
    finally:
        stop.restore()
    timer.pause(state)
    manager.close()
    performance = timer.performance(config, steps_per_epoch, time.perf_counter() - wall_start)
    writer.write_scalars(step, _performance_scalars(performance))
    for w in writers:
        w.close()
    return {"state": parallel.unreplicate(state), "template": template, "performance": performance}


class Interrupted(Exception):
    """The loop stopped on a signal after checkpointing step `step`; rerun to resume."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, which is "
            "checkpointed: run the same command again to resume"
        )


class StopSignal:
    """SIGTERM or Ctrl-C (SIGINT) asks the training loop to stop after the step in flight
    (a second one stops at once). Installed from the main thread only; `restore` puts the
    previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        logging.warning(
            "%s: finishing the step in flight, then checkpointing and stopping (send it "
            "again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self) -> bool:
        """Whether to stop now: on any process, when several train together (every one then
        checkpoints the same step)."""
        mine = self.signum is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils

        signums = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).ravel()
        if not mine and signums.any():
            self.signum = int(signums[signums > 0][0])
        return bool(signums.any())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class _Timer:
    """Splits the loop's wall clock into training, evaluation and the rest (compiles, saves).

    Training time runs from `resume` to `pause` (which waits for the dispatched steps), less
    the compiles inside; evaluation time is that of `Trainer.evaluate`, less its compiles.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.steps = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.evaluations = 0
        self.evaluated_crops = 0
        self._compiles = trainer.compile_seconds
        self._start: float | None = time.perf_counter()

    def _compiled_since(self, kind: str) -> float:
        now = self.trainer.compile_seconds[kind]
        spent, self._compiles[kind] = now - self._compiles[kind], now
        return spent

    def pause(self, state: Any) -> None:
        if self._start is not None:
            jax.block_until_ready(state)
            self.train_seconds += time.perf_counter() - self._start
            self.train_seconds -= self._compiled_since("train")
            self._start = None
        self._eval_start = time.perf_counter()

    def evaluated(self, num_crops: int) -> None:
        """One selection evaluation of `num_crops` crops (images x crops each) has ended."""
        self.eval_seconds += time.perf_counter() - self._eval_start - self._compiled_since("eval")
        self.evaluations += 1
        self.evaluated_crops += num_crops

    def resume(self) -> None:
        self._start = time.perf_counter()

    def performance(
        self, config: ml_collections.ConfigDict, steps_per_epoch: int, wall_seconds: float
    ) -> dict[str, Any]:
        """The speed figures of `results.json`'s 'performance' (README: Speed); images
        are counted over all replicas (aggregate throughput)."""
        num_replicas = replicas.count(config)
        images = self.steps * config.batch_size * num_replicas
        train_ips = images / self.train_seconds if self.train_seconds > 0 else None
        busy = self.train_seconds + self.eval_seconds
        total_ips = images / busy if busy > 0 else None
        device = self.trainer.parallel.devices[0]
        compile_s = self.trainer.compile_seconds
        peak = config.get("peak_tflops", 0.0) or flops.peak_tflops(device.device_kind)
        per_image = _model_flops(config)
        num_devices = self.trainer.parallel.num_devices

        def mfu(ips):
            if ips is None or not peak or per_image is None:
                return None
            return ips * per_image["train"] / (peak * 1e12 * num_devices)

        epochs = self.steps / steps_per_epoch
        projected = None
        if epochs > 0:
            projected = self.train_seconds / epochs * config.num_epochs
            if self.evaluations and config.eval_every_epochs > 0:
                evals = -(-config.num_epochs // config.eval_every_epochs)
                projected += self.eval_seconds / self.evaluations * evals
            projected += compile_s["train"] + compile_s["eval"]
        return {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "num_devices": num_devices,
            "input_pipeline": self.trainer.input_pipeline,
            "steps_per_dispatch": self.trainer.steps_per_dispatch,
            "half_precision": bool(config.half_precision),
            "replicas": num_replicas,
            "replica_map": self.trainer.replica_map if num_replicas > 1 else None,
            "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "num_epochs": config.num_epochs,
            "eval_every_epochs": config.eval_every_epochs,
            "steps_timed": self.steps,
            "epochs_timed": epochs,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "evaluations": self.evaluations,
            "train_images_per_s": train_ips,
            "images_per_s_including_eval": total_ips,
            "select_crops": select_crops(config),
            "eval_crops_per_s": (
                self.evaluated_crops / self.eval_seconds if self.eval_seconds > 0 else None
            ),
            "compile_seconds": compile_s,
            "peak_device_memory_gib": _peak_device_memory_gib(device),
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "flops_per_image": per_image,
            "peak_tflops": peak or None,
            "mfu_train": mfu(train_ips),
            "mfu_including_eval": mfu(total_ips),
            "projected_full_recipe_s": projected,
            "wall_seconds": wall_seconds,
        }


def _model_flops(config: ml_collections.ConfigDict) -> dict[str, float] | None:
    try:
        return flops.model_flops_per_image(config.model)
    except Exception as e:  # noqa: BLE001 - a failed count must not lose a finished run
        logging.error("Could not count the model's FLOPs: %s: %s", type(e).__name__, e)
        return None


def _peak_device_memory_gib(device: jax.Device) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):  # not every backend reports memory
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _performance_scalars(performance: dict[str, Any]) -> dict[str, float]:
    keys = (
        "train_images_per_s",
        "images_per_s_including_eval",
        "eval_crops_per_s",
        "mfu_train",
        "mfu_including_eval",
        "peak_device_memory_gib",
        "projected_full_recipe_s",
    )
    out = {f"perf_{k}": performance[k] for k in keys if performance[k] is not None}
    out.update({f"perf_compile_{k}_s": v for k, v in performance["compile_seconds"].items()})
    return out


def _log_parameter_count(params: Any) -> None:
    sizes = {k: sum(np.size(x) for x in jax.tree.leaves(v)) for k, v in params.items()}
    logging.info(
        "%d parameters: %s", sum(sizes.values()), ", ".join(f"{k} {v}" for k, v in sizes.items())
    )


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                walk(name + ".", value)
            elif isinstance(value, int | float | str | bool):
                flat[name] = value
            else:
                flat[name] = json.dumps(value, default=str)

    walk("", config)
    return flat
