"""Replicas: K independent runs of one network, trained by one compiled program.

With `config.replicas = K > 1` every leaf of the train state carries a leading replica axis
`(K, ...)` and the train and eval steps are `jax.vmap`ped over it (inside the data
parallelism: replica axis x data axis). Replica k has its own seed (initialisation, data
order, dropout): `config.seed + k`, unless `config.replica_seeds` lists the K seeds. Its
scalar hyperparameters may differ too: `config.replica_overrides` lists K dicts of the
`OVERRIDABLE` fields, which the step takes as arrays (`hparams`), so they change values but
not the program. K = 1 is a plain run: no replica axis anywhere. What each field may hold is
`fer_jax.training.config_schema`'s to check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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


def field(config: ml_collections.ConfigDict, path: str) -> Any:
    """The value of dotted `path` (e.g. 'optimizer.learning_rate') in `config`."""
    node = config
    for part in path.split("."):
        node = node[part]
    return node


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
    return {name: np.float32(field(config, name)) for name in OVERRIDABLE}


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
