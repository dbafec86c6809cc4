"""Data parallelism: a layer over `step.OneDevice` (same interface), chosen where a job sees
more than one device. `config.parallelism`: 'shard_map' (the default, as JAX recommends:
`jax.jit(jax.shard_map(step))` over a 1-D mesh 'data', the state replicated, batches split
along axis 0) or 'pmap' (a leading device axis on the state, batches `(devices, B / devices,
...)`). One device compiles a plain `jax.jit(step)` in either mode. Step functions take an
`axis_name` keyword (None or 'data') for their collectives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fer_jax.model import conv
from fer_jax.training.step import Compiled, OneDevice

AXIS = "data"
MODES = ("shard_map", "pmap")


def _spec(split_axis: int | None) -> P:
    return P() if split_axis is None else P(*([None] * split_axis), AXIS)


class DataParallel(OneDevice):
    """Compiles step functions for `mode` over `devices` and places state and batches."""

    def __init__(self, mode: str, devices: list[jax.Device] | None = None):
        self.mode = mode
        self.devices = list(devices if devices is not None else jax.devices())
        self.num_devices = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.axis_name = AXIS if self.num_devices > 1 else None

    def compile(
        self,
        step: Callable[..., Any],
        *,
        split_axes: tuple[int | None, ...] = (0,),
        donate_state: bool = True,
        replicated_out: int = 2,
    ) -> Compiled:
        """`step(state, *data, *, axis_name)` -> compiled `fn(state, *data)`, data argument i
        split over the devices along `split_axes[i]` (None: replicated; `place`); outputs must
        be replicated (reduced with collectives)."""
        if self.num_devices == 1:
            return super().compile(step, donate_state=donate_state)
        donate = (0,) if donate_state else ()
        fn = functools.partial(step, axis_name=self.axis_name)
        # On CPU: Eigen convolutions (fer_jax.model.conv.cpu_compiler_options); jax.pmap takes none.
        options = conv.cpu_compiler_options(self.devices[0].platform)
        if self.mode == "pmap":
            return Compiled(
                jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate)
            )
        out_specs = tuple(P() for _ in range(replicated_out)) if replicated_out > 1 else P()
        in_specs = (P(),) + tuple(_spec(axis) for axis in split_axes)
        # check_vma=False: gradients of the replicated parameters come out per device, as under
        # pmap, and the step averages them with pmean. (With varying-axis checking, shard_map's
        # autodiff would already psum them, and the explicit pmean would then leave the sum.)
        mapped = jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return Compiled(jax.jit(mapped, donate_argnums=donate, compiler_options=options))

    def replicate(self, tree: Any) -> Any:
        """Host or device pytree -> a fresh copy (the step donates it) in the steps' layout."""
        if self.num_devices == 1:
            return super().replicate(tree)
        tree = jax.device_get(tree)
        if self.mode == "pmap":
            sharding = NamedSharding(self.mesh, P(AXIS))
            return jax.tree.map(
                lambda x: jax.device_put(
                    np.broadcast_to(np.asarray(x), (self.num_devices,) + np.shape(x)), sharding
                ),
                tree,
            )
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def unreplicate(self, tree: Any) -> Any:
        """Compiled-step layout -> host numpy pytree (one copy)."""
        if self.mode == "pmap" and self.num_devices > 1:
            tree = jax.tree.map(lambda x: x[0], tree)
        return jax.device_get(tree)

    def place(self, tree: Any, split_axis: int | None) -> Any:
        """Host numpy pytree -> device arrays split along `split_axis` (None: replicated; pmap:
        a leading device axis). Every process passes the same global arrays."""
        if split_axis is None or self.num_devices == 1:
            return self.replicate(tree)
        if self.mode == "pmap":
            sharding = NamedSharding(self.mesh, P(AXIS))

            def to_device_major(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x)
                shape = x.shape[:split_axis] + (self.num_devices, -1) + x.shape[split_axis + 1 :]
                return np.moveaxis(x.reshape(shape), split_axis, 0)

            return jax.tree.map(lambda x: self._put(to_device_major(x), sharding, 0), tree)
        sharding = NamedSharding(self.mesh, _spec(split_axis))
        return jax.tree.map(lambda x: self._put(np.asarray(x), sharding, split_axis), tree)

    def _put(self, x: np.ndarray, sharding: NamedSharding, axis: int) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        # Every process holds the same global array and contributes its contiguous slice.
        count, index = jax.process_count(), jax.process_index()
        size = x.shape[axis] // count
        part = np.take(x, np.arange(index * size, (index + 1) * size), axis=axis)
        return jax.make_array_from_process_local_data(sharding, part, x.shape)
