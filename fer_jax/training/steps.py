"""The pure step functions: `train_step` (one SGD step) and `eval_step` /
`replica_eval_step` (ten-crop or centre-crop evaluation of a batch), which
`fer_jax.training.parallel.DataParallel` compiles for one or many devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fer_jax.model import losses
from fer_jax.training import (
    replicas,
)
from fer_jax.training.metrics import EvalMetrics, eval_metrics
from fer_jax.training.state import TrainState, update_ema


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
    metrics = {  # the training metrics, named here only: `metrics.train_summaries` averages each
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
    new_state = new_state.replace(ema=update_ema(new_state, config.get("ema_decay", 0.0)))
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


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None
) -> EvalMetrics:
    """Evaluation of `{'image': (B, crops, 44, 44, 1), 'label': (B,), 'mask': (B,)}`.

    The logits of each image's crops (ten, or the centre one) are averaged. Returns the
    batch's `EvalMetrics`, summed over devices.
    """
    logits = tencrop_logits(state, batch["image"])
    out = eval_metrics(logits, batch["label"], batch["mask"])
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


def replica_eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    axis_name: str | None,
    replica_map: str = "vmap",
) -> dict[str, EvalMetrics]:
    """`eval_step` of a stacked `(K, ...)` state: 'replicas', each replica's `EvalMetrics`
    (stacked, leading axis K), and 'ensemble', those of the K replicas' probabilities
    averaged. `replica_map`: `fer_jax.training.replicas.map_over`'s kind."""
    logits = replicas.map_over(tencrop_logits, replica_map, (0, None))(state, batch["image"])
    each = jax.vmap(eval_metrics, in_axes=(0, None, None))(logits, batch["label"], batch["mask"])
    probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    # log p as logits: the cross-entropy is -log p(label), the argmax that of p.
    ensemble = eval_metrics(jnp.log(jnp.maximum(probs, 1e-30)), batch["label"], batch["mask"])
    out = {"replicas": each, "ensemble": ensemble}
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out
