"""Varying mesh axes for custom VJPs inside `jax.shard_map`.

A replicated parameter combined with sharded activations is an implicit
``pcast(param, to="varying")``, whose transpose psums the parameter's gradient. A `custom_vjp`
must see that cast explicitly: its bwd returns a per-shard gradient, and JAX then inserts the
psum as it does for the plain operations.
"""

from __future__ import annotations

import jax
from jax import lax


def match_varying_axes(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays, each marked varying over the union of their varying mesh axes.

    Outside shard_map (or with `check_vma=False`, where no array carries axis types) they are
    returned unchanged.
    """
    types = [jax.typeof(a).manual_axis_type for a in arrays]
    if any(t is None for t in types):  # outside shard_map
        return arrays
    union = frozenset().union(*(t.varying for t in types))
    return tuple(
        lax.pcast(a, tuple(sorted(union - t.varying)), to="varying") if union - t.varying else a
        for a, t in zip(arrays, types, strict=True)
    )
