"""Replicas: K independent runs of one network, trained by one compiled program.

A layer over the plain step (`fer_jax.training.step`), chosen where `config.replicas = K > 1`:
`Replicas` has `step.OneModel`'s interface. Every leaf of the train state carries a leading
replica axis `(K, ...)` and the train and eval steps are mapped over it (`map_over`: `jax.vmap`
or unrolled; inside the data parallelism: replica axis x data axis). Replica k has its own
seed (initialisation, data order, dropout): `config.seed + k`, unless `config.replica_seeds`
lists the K seeds. Its scalar hyperparameters may differ too: `config.replica_overrides` lists
K dicts of the `OVERRIDABLE` fields, which the state carries as arrays
(`ReplicaState.hparams`), so they change values but not the program: each replica's optimizer
and schedules are built from them inside the step (`step.create_recipe`), where a plain run builds
them once from the config. What each field may hold is `fer_jax.training.config_schema`'s to
check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fer_jax.model.resnet import ResNet18
from fer_jax.training import step as plain
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


def replica_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One plain (K = 1) config per replica: its seed and overrides applied."""
    out = []
    for seed, fields in zip(seeds(config), overrides(config), strict=True):
        one = ml_collections.ConfigDict(config.to_dict())
        one.replicas, one.replica_seeds, one.replica_overrides = 1, (), ()
        one.seed = seed
        for name, value in fields.items():
            section, key = name.split(".")
            old = one[section][key]
            one[section][key] = type(old)(value) if isinstance(old, int | float) else value
        out.append(one)
    return out


def hparams(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The `OVERRIDABLE` values of a plain config as float32 scalars (the step's `hparams`)."""
    return {name: np.float32(plain.field(config, name)) for name in OVERRIDABLE}


MAPS = ("vmap", "unroll")


def map_kind(config: ml_collections.ConfigDict, platform: str) -> str:
    """How the steps run over replicas (`config.replica_map`, '' = per platform): 'vmap' (one
    batched program: fills an accelerator) or 'unroll' (K copies of the step in one program:
    XLA:CPU runs vmapped, i.e. grouped, convolutions 2-3x slower than K plain ones)."""
    return config.get("replica_map", "") or ("unroll" if platform == "cpu" else "vmap")


def map_over(fn: Callable[..., Any], kind: str, in_axes: tuple[int | None, ...]) -> Callable:
    """`jax.vmap(fn, in_axes)` ('vmap'), or the same function unrolled ('unroll'): `fn` called
    once per replica on slice k of the mapped arguments, outputs stacked. K is the leading
    size of the first mapped argument's leaves."""
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


def stack(trees: Sequence[Any]) -> Any:
    """K host pytrees -> one with a leading replica axis `(K, ...)` on every leaf."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take(tree: Any, k: int) -> Any:
    """Replica k of a stacked host pytree."""
    return jax.tree.map(lambda x: np.asarray(x)[k], tree)


def stack_plans(plans: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """K epoch plans (`(S, B)` arrays) -> one `(S, K, B)` plan, step-major like one's."""
    return {key: np.stack([plan[key] for plan in plans], axis=1) for key in plans[0]}


@flax.struct.dataclass
class ReplicaState(plain.TrainState):
    """A replica's `TrainState` (stacked: K of them) with its `OVERRIDABLE` values as float32
    arrays (`hparams`, not checkpointed) and the static `recipe_of(hparams) -> Recipe`
    (`recipe` is None outside the step)."""

    hparams: dict[str, jax.Array]
    recipe_of: Callable[[dict[str, jax.Array]], plain.Recipe] = flax.struct.field(pytree_node=False)


def create_train_state(
    config: ml_collections.ConfigDict, model: ResNet18, steps_per_epoch: int
) -> ReplicaState:
    """K fresh states (`replica_configs`: own seeds and hyperparameters), each exactly as a
    plain run of its config would start, stacked along a leading replica axis."""
    configs = replica_configs(config)
    parts = plain.optimizer_parts(configs)
    recipe_of = functools.partial(plain.create_recipe, config, steps_per_epoch, parts=parts)
    fields = []
    for one in configs:  # one by one: a vmapped 'rbg' init would not match a plain run's
        values = hparams(one)
        fields.append({**plain.init_fields(one, model, recipe_of(values).tx), "hparams": values})
    return ReplicaState(**stack(fields), apply_fn=model.apply, recipe=None, recipe_of=recipe_of)


def _replica_train_step(state: ReplicaState, batch, *, config, axis_name):
    """`step.train_step` of one replica (a slice of the stacked state), its recipe built from
    its `hparams` inside the trace."""
    one = state.replace(recipe=state.recipe_of(state.hparams))
    new, metrics = plain.train_step(one, batch, config=config, axis_name=axis_name)
    return new.replace(recipe=None), metrics


def replica_eval_step(
    state: ReplicaState,
    batch: dict[str, jax.Array],
    *,
    axis_name: str | None,
    replica_map: str = "vmap",
) -> dict[str, EvalMetrics]:
    """`step.eval_step` of a stacked `(K, ...)` state: 'replicas', each replica's `EvalMetrics`
    (stacked, leading axis K), and 'ensemble', those of the K replicas' probabilities
    averaged. `replica_map`: `map_over`'s kind."""
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
    """`step.OneModel`'s interface for K replicas: stacked states, steps mapped over them,
    batches and epoch plans with a replica axis (`(K, B, ...)`, plans `(S, K, B)`)."""

    config: ml_collections.ConfigDict
    platform: str

    @property
    def count(self) -> int:
        return count(self.config)

    @property
    def map_kind(self) -> str:
        """'vmap' or 'unroll' (`map_kind`)."""
        return map_kind(self.config, self.platform)

    def create_state(self, model: ResNet18, steps_per_epoch: int) -> ReplicaState:
        return create_train_state(self.config, model, steps_per_epoch)

    def train_step(self) -> Callable[..., Any]:
        kind, config = self.map_kind, self.config

        def over_replicas(state, batch, *, axis_name):
            one = functools.partial(_replica_train_step, config=config, axis_name=axis_name)
            return map_over(one, kind, (0, 0))(state, batch)

        return over_replicas

    def eval_step(self) -> Callable[..., Any]:
        return functools.partial(replica_eval_step, replica_map=self.map_kind)

    def gather(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """One batch per replica from plan rows `(K, B)`."""
        return jax.vmap(fn)

    def epoch_plan(self, plan_of: Callable[[int], dict[str, np.ndarray]]):
        """Each replica's plan (`plan_of(seed)`), stacked step-major: `(S, K, B)`."""
        return stack_plans([plan_of(seed) for seed in seeds(self.config)])

    def batches(self, stream_of: Callable[[int], Any]) -> Any:
        """One batch per replica (`stream_of(seed)`), stacked: `(K, B, ...)`."""
        streams = [stream_of(seed) for seed in seeds(self.config)]
        return (stack(batch) for batch in zip(*streams, strict=True))
