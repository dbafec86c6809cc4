"""Replicas: K independent runs of one network, trained by one compiled program.

A layer over the plain step (`fer_jax.training.step`), chosen where `config.replicas = K > 1`:
`Replicas` has `step.OneModel`'s interface. Every leaf of the train state carries a leading
replica axis `(K, ...)` and the steps are mapped over it (`map_over`: `jax.vmap` or unrolled).
Replica k has its own seed (`config.seed + k`, or `config.replica_seeds[k]`) and may override
the `OVERRIDABLE` scalars (`config.replica_overrides[k]`), which the state carries as arrays
(`ReplicaState.hparams`): each replica's optimizer and schedules are built from them inside the
step, where a plain run builds them once.

The host side of a replica run is here too: its reports, checkpoints (`Checkpoints`: the best
of each replica), writers (`RunWriters`: a TensorBoard run and report directory per replica)
and `results` (`results.json`, whose layout, one entry per replica, is every run's).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fer_jax.model.resnet import ResNet18, matmul_bf16
from fer_jax.training import checkpoint, evaluate, metrics, run_writers
from fer_jax.training import step as plain
from fer_jax.training.checkpoint import stack, take
from fer_jax.training.metrics import EvalMetrics, eval_metrics

# Config fields a replica may override: scalars the step takes as traced arrays.
OVERRIDABLE = (
    "optimizer.learning_rate",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.grad_clip",
    "optimizer.decay_rate",
    "loss.margin",
    "loss.lambda_base",
    "loss.lambda_gamma",
    "loss.lambda_power",
    "loss.lambda_min",
    "model.dropout_rate",
)


def count(config: ml_collections.ConfigDict) -> int:
    """K, the number of replicas (1: a plain run)."""
    return int(config.get("replicas", 1))


def seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The seed of each replica: `config.replica_seeds`, else `config.seed + k`."""
    listed = list(config.get("replica_seeds", []) or [])
    return [int(s) for s in listed] or [config.seed + k for k in range(count(config))]


def overrides(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The overridden fields of each replica (`{}` where none)."""
    listed = list(config.get("replica_overrides", []) or [])
    return [dict(d) for d in listed] or [{} for _ in range(count(config))]


def with_fields(
    config: ml_collections.ConfigDict, fields: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted `fields` set: numbers as the field's type, arrays
    (traced: `ReplicaState.hparams`) as they are."""
    out = ml_collections.ConfigDict(config.to_dict())
    with out.ignore_type():
        for name, value in fields.items():
            section, key = name.split(".")
            old = out[section][key]
            number = isinstance(old, int | float) and not isinstance(value, jax.Array)
            out[section][key] = type(old)(value) if number else value
    return out


def replica_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One plain (K = 1) config per replica: its seed and overrides applied."""
    plain_fields = {"replicas": 1, "replica_seeds": (), "replica_overrides": ()}
    return [
        with_fields(ml_collections.ConfigDict({**config.to_dict(), **plain_fields, "seed": s}), f)
        for s, f in zip(seeds(config), overrides(config), strict=True)
    ]


def hparams(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The `OVERRIDABLE` values of a plain config as float32 scalars (the step's `hparams`)."""
    fields = (name.split(".") for name in OVERRIDABLE)
    return {f"{section}.{key}": np.float32(config[section][key]) for section, key in fields}


MAPS = ("vmap", "unroll")


def map_kind(config: ml_collections.ConfigDict, platform: str) -> str:
    """`config.replica_map`, '' meaning 'vmap' (fills an accelerator) or on CPU 'unroll' (K
    copies of the step: XLA:CPU runs grouped convolutions 2-3x slower than K plain ones)."""
    return config.get("replica_map", "") or ("unroll" if platform == "cpu" else "vmap")


def map_over(fn: Callable[..., Any], kind: str, in_axes: tuple[int | None, ...]) -> Callable:
    """`jax.vmap(fn, in_axes)` ('vmap'), or unrolled ('unroll'): `fn` once per slice k of the
    mapped arguments, outputs stacked."""
    if kind == "vmap":
        return jax.vmap(fn, in_axes=in_axes)

    def unrolled(*args):
        mapped = next(a for a, axis in zip(args, in_axes, strict=True) if axis is not None)
        k = jax.tree.leaves(mapped)[0].shape[0]
        outs = [
            fn(
                *(
                    a if axis is None else jax.tree.map(lambda x, i=i: x[i], a)
                    for a, axis in zip(args, in_axes, strict=True)
                )
            )
            for i in range(k)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return unrolled


def stack_plans(plans: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """K epoch plans (`(S, B)` arrays) -> one `(S, K, B)` plan, step-major like one's."""
    return {key: np.stack([plan[key] for plan in plans], axis=1) for key in plans[0]}


@flax.struct.dataclass
class ReplicaState(plain.TrainState):
    """K stacked `TrainState`s with their `OVERRIDABLE` values as float32 arrays (`hparams`,
    not checkpointed) and the static `recipe_of(hparams) -> Recipe`, the recipe of the config
    holding them (`recipe`: None outside the step)."""

    hparams: dict[str, jax.Array]
    recipe_of: Callable[[dict[str, jax.Array]], plain.Recipe] = flax.struct.field(pytree_node=False)


def create_train_state(
    config: ml_collections.ConfigDict, model: ResNet18, steps_per_epoch: int
) -> ReplicaState:
    """K fresh states (`replica_configs`), each as a plain run of its config starts, stacked."""
    configs = replica_configs(config)
    parts = plain.optimizer_parts(configs)

    def recipe_of(values: Mapping[str, Any]) -> plain.Recipe:
        return plain.create_recipe(with_fields(config, values), steps_per_epoch, parts)

    fields = []
    for one in configs:  # one by one: a vmapped 'rbg' init would not match a plain run's
        values = hparams(one)
        fields.append({**plain.init_fields(one, model, recipe_of(values).tx), "hparams": values})
    return ReplicaState(**stack(fields), apply_fn=model.apply, recipe=None, recipe_of=recipe_of)


def replica_eval_step(
    state: ReplicaState,
    batch: dict[str, jax.Array],
    *,
    axis_name: str | None,
    replica_map: str = "vmap",
) -> dict[str, EvalMetrics]:
    """`step.eval_step` of a stacked state: 'replicas', each replica's `EvalMetrics` (stacked),
    and 'ensemble', those of the replicas' mean probabilities."""
    logits = map_over(plain.tencrop_logits, replica_map, (0, None))(state, batch["image"])
    each = jax.vmap(eval_metrics, in_axes=(0, None, None))(logits, batch["label"], batch["mask"])
    probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    # log p as logits: the cross-entropy is -log p(label), the argmax that of p.
    ensemble = eval_metrics(jnp.log(jnp.maximum(probs, 1e-30)), batch["label"], batch["mask"])
    out = {"replicas": each, "ensemble": ensemble}
    if axis_name is not None:
        out = jax.lax.psum(out, axis_name)
    return out


@dataclasses.dataclass(frozen=True)
class Replicas:
    """`step.OneModel`'s interface for K replicas: batches `(K, B, ...)`, plans `(S, K, B)`."""

    config: ml_collections.ConfigDict
    platform: str

    @property
    def count(self) -> int:
        return count(self.config)

    @property
    def map_kind(self) -> str:
        return map_kind(self.config, self.platform)

    def create_state(self, model: ResNet18, steps_per_epoch: int) -> ReplicaState:
        return create_train_state(self.config, model, steps_per_epoch)

    def train_step(self) -> Callable[..., Any]:
        """`step.train_step` over the replicas, each one's recipe built from its `hparams`."""
        kind, config = self.map_kind, self.config

        def over_replicas(state, batch, *, axis_name):
            def one(state, batch):
                state = state.replace(recipe=state.recipe_of(state.hparams))
                new, metrics = plain.train_step(state, batch, config=config, axis_name=axis_name)
                return new.replace(recipe=None), metrics

            return map_over(one, kind, (0, 0))(state, batch)

        return over_replicas

    def eval_step(self) -> Callable[..., Any]:
        return functools.partial(replica_eval_step, replica_map=self.map_kind)

    def gather(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return jax.vmap(fn)

    def epoch_plan(self, plan_of: Callable[[int], dict[str, np.ndarray]]):
        return stack_plans([plan_of(seed) for seed in seeds(self.config)])

    def batches(self, stream_of: Callable[[int], Any]) -> Any:
        streams = [stream_of(seed) for seed in seeds(self.config)]
        return (stack(batch) for batch in zip(*streams, strict=True))

    @staticmethod
    def report(totals: Mapping[str, EvalMetrics], num_examples: int) -> dict[str, Any]:
        """`{'replicas': [report of each], 'ensemble': report}` of `replica_eval_step`'s."""
        each, k = totals["replicas"], np.shape(totals["replicas"].loss.count)[0]
        return {
            "replicas": [metrics.report(take(each, i), num_examples) for i in range(k)],
            "ensemble": metrics.report(totals["ensemble"], num_examples),
        }


# --- The host side: reports, checkpoints, writers, results ---------------------------------


def per_replica(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A `report` as one report per replica (one without replicas)."""
    return report["replicas"] if "replicas" in report else [report]


def named_reports(name: str, report: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    """`{name + suffix: report}`; a replica run's as `{name}_replica_<k>{suffix}` and
    `{name}_ensemble{suffix}`."""
    if "replicas" not in report:
        return {f"{name}{suffix}": report}
    out = {f"{name}_replica_{k}{suffix}": one for k, one in enumerate(report["replicas"])}
    return {**out, f"{name}_ensemble{suffix}": report["ensemble"]}


class Checkpoints(checkpoint.Checkpoints):
    """A replica run's checkpoints: the best holds each replica at its own best select-split
    accuracy (`meta['select_accuracy']`, `['replica_steps']`, `['replica_epochs']`: K each)."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        super().__init__(workdir, config)
        self.best_accuracy = np.resize(self.best_accuracy, self.replicas)
        self._best_state: Any = None  # the best state, read back when first needed

    def maybe_save_best(self, step: int, state: Any, meta: dict[str, Any], report: dict) -> None:
        """Each replica whose accuracy in `report` beats its best so far replaces its slice of
        the best checkpoint."""
        accuracy = np.array([m["accuracy"] for m in report["replicas"]], np.float64)
        improved = accuracy > self.best_accuracy
        if not improved.any():
            return
        self.best_accuracy = np.where(improved, accuracy, self.best_accuracy)
        if not improved.all():
            if self._best_state is None:  # after a resume: read back once
                self._best_state = self.restore_best(state)

            def merge(new, old):
                return np.where(improved.reshape((-1,) + (1,) * (np.ndim(new) - 1)), new, old)

            state = jax.tree.map(merge, state, self._best_state)
        steps = np.where(improved, step, self.best_meta.get("replica_steps", step))
        epochs = np.where(
            improved, meta["epoch"], self.best_meta.get("replica_epochs", meta["epoch"])
        )
        meta = {
            **meta,
            "select_accuracy": self.best_accuracy.tolist(),
            "replica_steps": steps.tolist(),
            "replica_epochs": epochs.tolist(),
        }
        self._best_state, self.best_meta = state, meta
        self._save(self.best, step, state, meta)


class RunWriters(run_writers.RunWriters):
    """A replica run's writers: a TensorBoard run and report directory per replica
    (`workdir/replica_<k>`, `workdir/eval/replica_<k>`) beside the main writer."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, enabled: bool):
        super().__init__(workdir, config, enabled=enabled)
        self.dirs = [f"replica_{k}" for k in range(count(config))]
        writer = run_writers.SummaryWriter
        self.curves = [writer(os.path.join(workdir, d), enabled=enabled) for d in self.dirs]
        self.writers = [self.main, *self.curves]

    def write_start(self, params: Any) -> None:
        super().write_start(take(params, 0))
        for curve, one in zip(self.curves, replica_configs(self.config), strict=True):
            curve.write_hparams(run_writers.flat_hparams(one))

    def write_train(
        self, step: int, summaries: Sequence[Mapping[str, float]], images_per_s: float
    ) -> None:
        """Each replica's summary, and its share of all replicas' images/s."""
        for curve, summary in zip(self.curves, summaries, strict=True):
            speed = images_per_s / len(self.curves)
            curve.write_scalars(step, {**summary, "train_images_per_second": speed})

    def write_evaluation(self, step: int, split: str, epoch: int, report: dict[str, Any]) -> None:
        name = f"{split}_epoch{epoch:03d}"
        for one, curve, directory in zip(report["replicas"], self.curves, self.dirs, strict=True):
            self.write_report(curve, directory, step, name, split, one)
        accuracy = report["ensemble"]["accuracy"]
        self.main.write_scalars(step, {f"{split}_ensemble_accuracy": accuracy})


def write_final_reports(workdir: str, split: str, report: dict[str, Any]) -> None:
    """Beside `run_writers.write_final_reports`: each replica's report
    (`eval/replica_<k>/<split>_selected.json`) and the ensemble's (`eval/<split>_ensemble`)."""
    eval_dir = os.path.join(workdir, "eval")
    for k, one in enumerate(report["replicas"]):
        evaluate.write_report(os.path.join(eval_dir, f"replica_{k}"), f"{split}_selected", one)
    evaluate.write_report(eval_dir, f"{split}_ensemble", report["ensemble"])


def selections(restored: checkpoint.Restored) -> list[dict[str, Any]]:
    """Per replica of a (best) checkpoint: `selected_step`, `selected_epoch`, `select_accuracy`
    (None where it was not selected on an evaluation)."""
    meta, k = restored.meta, checkpoint.replica_count(restored.meta)
    selected = meta.get("select_accuracy")  # a list of K, or (K = 1) a number
    return [
        {"selected_step": step, "selected_epoch": epoch, "select_accuracy": accuracy}
        for step, epoch, accuracy in zip(
            meta.get("replica_steps", [restored.step] * k),
            meta.get("replica_epochs", [meta.get("epoch")] * k),
            [selected] if k == 1 else selected or [None] * k,
            strict=True,
        )
    ]


def results(
    config: ml_collections.ConfigDict,
    best: checkpoint.Restored,
    report: dict[str, Any],
    performance: dict[str, Any] | None,
    *,
    centre: dict[str, Any],
) -> dict[str, Any]:
    """`results.json` of any run: the report split's ten-crop and ('centre_crop') centre-crop
    metrics of the model chosen on the select split, and per replica (one for a plain run),
    their mean, standard deviation (ddof=1; None for one) and the ensemble's accuracy."""
    per = per_replica(report)
    chosen, picked = checkpoint.chosen_replica(best.meta), selections(best)
    entries = [
        {"replica": k, "seed": seed, "overrides": fields, **picked[k], config.report_split: one}
        for k, (seed, fields, one) in enumerate(
            zip(seeds(config), overrides(config), per, strict=True)
        )
    ]
    accuracies = np.array([m["accuracy"] for m in per])
    out = {
        "report_split": config.report_split,
        "selected_on": config.select_split,
        **picked[chosen],
        config.report_split: per[chosen],
        "centre_crop": per_replica(centre)[chosen],
        "replicas": entries,
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else None,
        "ensemble_accuracy": report.get("ensemble", per[0])["accuracy"],
        # What `model.matmul_dtype` ('auto' depends on the CPU) resolved to where this ran.
        "matmul_dtype_resolved": (
            "bfloat16" if matmul_bf16(config.model.get("matmul_dtype", "float32")) else "float32"
        ),
        "performance": performance,
    }
    if len(per) > 1:
        out["selected_replica"] = chosen
        out["ensemble"] = report["ensemble"]
        spread = [out[k] for k in ("mean_accuracy", "std_accuracy", "ensemble_accuracy")]
        message = "%d replicas: %s accuracy %.4f +- %.4f (ensemble %.4f)"
        logging.info(message, len(per), config.report_split, *spread)
    return out
