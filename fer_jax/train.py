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
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from fer_jax import checkpoint, evaluate, input_data, losses, optim
from fer_jax.parallel import DataParallel
from fer_jax.resnet import ResNet18, model_from_config


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
    apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False)
    # A-Softmax's lambda as a function of `step` (`lambda_schedule`).
    lambda_schedule: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False)


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
    """Fresh state from `config.seed`: random init (the paper), the configured optimizer."""
    # The 'rbg' generator compiles the ~100 initialisers several times faster than threefry
    # on XLA:CPU; it is as deterministic for a given seed.
    init_key = jax.random.key(config.seed, impl="rbg")
    dropout_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    variables = jax.jit(functools.partial(model.init, train=False))(
        init_key, jnp.zeros((1, 44, 44, 1), jnp.float32)
    )
    tx, schedule = optim.create_optimizer(config, steps_per_epoch)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        dropout_key=dropout_key,
        apply_fn=model.apply,
        tx=tx,
        schedule=schedule,
        lambda_schedule=lambda_schedule(config.loss, steps_per_epoch),
    )


LAMBDA_UNITS = ("step", "epoch")


def lambda_schedule(
    loss_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[[jax.Array], jax.Array]:
    """A-Softmax's annealed lambda as a function of the global step (config: `loss` section).

    `max(lambda_min, lambda_base * (1 + lambda_gamma * t) ** -lambda_power)` (SphereFace), with
    t counted in optimizer steps (`lambda_per='step'`, as SphereFace and its PyTorch port) or in
    epochs (`'epoch'`, t = step / steps_per_epoch, fractional).
    """
    c = loss_config
    if c.lambda_per not in LAMBDA_UNITS:
        raise ValueError(
            f"config.loss.lambda_per must be one of {LAMBDA_UNITS}, got {c.lambda_per!r}"
        )
    per = 1.0 if c.lambda_per == "step" else 1.0 / steps_per_epoch

    def schedule(step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32) * per
        return losses.sphereface_lambda(
            t, c.lambda_base, c.lambda_gamma, c.lambda_power, c.lambda_min
        )

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
    lam = state.lambda_schedule(state.step)

    def loss_fn(params):
        (logits, features), mutated = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            return_features=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        if config.model.head == "a_softmax":
            loss = losses.a_softmax_loss(
                features, params["linear"]["kernel"], labels, margin=config.loss.margin, lam=lam
            )
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
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = state.schedule(state.step)
    metrics["lambda"] = lam
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, metrics


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None
) -> dict[str, jax.Array]:
    """Ten-crop evaluation of `{'image': (B, 10, 44, 44, 1), 'label': (B,), 'mask': (B,)}`.

    The 10 logits of each image are averaged. Returns sums over the (masked) batch, reduced
    over devices: 'confusion' `(K, K)` counts (rows true, columns predicted), 'loss' (summed
    cross-entropy of the averaged logits) and 'count'.
    """
    images = batch["image"]
    b, crops = images.shape[:2]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        images.reshape((b * crops,) + images.shape[2:]),
        train=False,
    )
    logits = logits.reshape(b, crops, -1).mean(axis=1)
    num_classes = logits.shape[-1]
    mask = batch["mask"].astype(jnp.float32)
    truth = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    out = {
        "confusion": truth.T @ pred,
        "loss": jnp.sum(per_example * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


@dataclasses.dataclass
class Trainer:
    """The compiled steps and data of one training job, shared by training and CV folds."""

    config: ml_collections.ConfigDict
    parallel: DataParallel
    model: ResNet18
    p_train_step: Callable[..., Any]
    p_eval_step: Callable[..., Any]

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
        model = create_model(config, axis_name=parallel.axis_name)
        p_train = parallel.compile(functools.partial(train_step, config=config))
        p_eval = parallel.compile(eval_step, donate_state=False, replicated_out=1)
        return cls(config, parallel, model, p_train, p_eval)

    def evaluate(self, state: TrainState, images: np.ndarray, labels: np.ndarray) -> dict:
        """Ten-crop metrics (`evaluate.metrics_from_confusion`) of replicated `state`."""
        import data_pipelines

        ds = data_pipelines.eval_dataset_from_arrays(
            images,
            labels,
            batch_size=self.config.eval_batch_size,
            num_devices=self.parallel.batch_shape_devices,
            normalize=self.config.normalize,
        )
        totals = None
        for batch in self.parallel.prefetch(ds.as_numpy_iterator()):
            out = self.p_eval_step(state, batch)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = self.parallel.unreplicate(totals)
        if int(round(float(totals["count"]))) != len(labels):
            raise RuntimeError(f"evaluated {totals['count']} examples, expected {len(labels)}")
        return evaluate.metrics_from_confusion(
            np.asarray(totals["confusion"]), loss_sum=float(totals["loss"])
        )


def _log_train_metrics(writer, history: list[dict], step: int, images_per_s: float) -> None:
    stacked = jax.device_get(history)
    losses_seen = np.array([float(np.mean(h["loss"])) for h in stacked])
    bad = np.flatnonzero(~np.isfinite(losses_seen))
    if bad.size:
        first = step - len(stacked) + int(bad[0]) + 1
        raise FloatingPointError(
            f"non-finite training loss ({losses_seen[bad[0]]}) at step {first}; stopping. "
            "The last good checkpoint is kept in the workdir."
        )
    summary = {f"train_{k}": float(np.mean([np.mean(h[k]) for h in stacked])) for k in stacked[0]}
    summary["train_images_per_second"] = images_per_s
    writer.write_scalars(step, summary)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Writes TensorBoard events, per-evaluation JSON metrics and confusion-matrix PNGs, and
    Orbax checkpoints (latest few + best by `config.select_split` accuracy). Returns the
    final summary (also `workdir/results.json`): the selected model's `config.report_split`
    metrics, and where it came from. (The JAFFE cross-validation that may follow is run by
    `fer_jax.main`, above both this module and `cross_validate`.)
    """
    workdir = checkpoint.prepare_workdir(workdir)
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
    evaluate.write_report(os.path.join(workdir, "eval"), f"{config.report_split}_selected", report)
    results = {
        "report_split": config.report_split,
        "selected_on": config.select_split,
        "selected_step": best.step,
        "selected_epoch": best.meta.get("epoch"),
        "select_accuracy": best.meta.get("select_accuracy"),
        config.report_split: report,
    }
    evaluate.write_json(os.path.join(workdir, "results.json"), results)
    logging.info(
        "%s accuracy of the model chosen on %s (step %d): %.4f",
        config.report_split,
        config.select_split,
        best.step,
        report["accuracy"],
    )
    return results


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

    Returns `{'state': final host state, 'template': host template for restores}`.
    """
    import data_pipelines

    config = trainer.config
    parallel = trainer.parallel
    steps_per_epoch = data_pipelines.steps_per_epoch(len(train_labels), config.batch_size)
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
    start_step = int(host_state.step)
    if start_step >= total_steps:
        logging.info("Training already finished (%d steps).", start_step)
        return {"state": host_state, "template": template}

    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if start_step == 0:
        parameter_overview.log_parameter_overview(host_state.params)
        writer.write_hparams(_flat_hparams(config))
    state = parallel.replicate(host_state)
    ds = data_pipelines.train_dataset_from_arrays(
        train_images,
        train_labels,
        batch_size=config.batch_size,
        seed=config.seed,
        start_epoch=start_step // steps_per_epoch,
        start_step=start_step % steps_per_epoch,
        num_epochs=config.num_epochs - start_step // steps_per_epoch,
        num_devices=parallel.batch_shape_devices,
        normalize=config.normalize,
    )
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_secs=30.0
    )
    history: list[dict] = []
    t_log, step = time.perf_counter(), start_step
    for batch in parallel.prefetch(ds.as_numpy_iterator()):
        state, metrics = trainer.p_train_step(state, batch)
        history.append(metrics)
        step += 1
        report_progress(step)
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        end_of_epoch = step_in_epoch == 0
        if step % config.log_every_steps == 0 or end_of_epoch:
            dt = time.perf_counter() - t_log
            _log_train_metrics(writer, history, step, len(history) * config.batch_size / dt)
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
        select_metrics = None
        if eval_now:
            select_metrics = trainer.evaluate(state, *select)
            evaluate.write_report(
                os.path.join(workdir, "eval"),
                f"{select_name}_epoch{completed_epochs:03d}",
                select_metrics,
            )
            writer.write_scalars(
                step,
                {
                    f"{select_name}_{k}": v
                    for k, v in evaluate.scalar_metrics(select_metrics).items()
                },
            )
        save_now = (
            (end_of_epoch and completed_epochs % config.checkpoint_every_epochs == 0)
            or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
            or step == total_steps
        )
        if save_now or select_metrics is not None:
            if history:  # check the steps since the last log before saving anything
                _log_train_metrics(writer, history, step, float("nan"))
                history = []
            host_state = parallel.unreplicate(state)
            meta = {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "steps_per_epoch": steps_per_epoch,
            }
            if save_now:
                manager.save(step, host_state, meta)
            if select_metrics is not None:
                manager.maybe_save_best(step, host_state, meta, select_metrics["accuracy"])
        writer.flush()
    manager.close()
    writer.close()
    return {"state": parallel.unreplicate(state), "template": template}


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
