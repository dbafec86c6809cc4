"""One per-device step function, compiled for one device or data-parallel over many.

Modes (`config.parallelism`):
- 'shard_map' (the default): `jax.jit(jax.shard_map(step))` over a 1-D mesh named 'data';
  the state is replicated, the batch `(B, ...)` is split along its first axis. JAX has put
  `pmap` in maintenance mode and recommends this for new code.
- 'pmap': `jax.pmap(step)` over the named axis 'data'; the state carries a leading device
  axis and the batch is shaped `(devices, B / devices, ...)`.
With a single device both compile to a plain `jax.jit(step)` without collectives, so one
device trains exactly the same program whatever the mode. Step functions take an
`axis_name` keyword (None or 'data') for their collectives (gradient and metric averaging,
cross-device BatchNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fer_jax import conv

AXIS = "data"
MODES = ("shard_map", "pmap")


class DataParallel:
    """Compiles step functions for `mode` over `devices` and places state and batches."""

    def __init__(self, mode: str, devices: list[jax.Device] | None = None):
        if mode not in MODES:
            raise ValueError(f"config.parallelism must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.devices = list(devices if devices is not None else jax.devices())
        self.num_devices = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.axis_name = AXIS if self.num_devices > 1 else None

    @property
    def batch_shape_devices(self) -> int | None:
        """`num_devices` argument of the input pipelines: device-major batches for pmap."""
        return self.num_devices if self.mode == "pmap" and self.num_devices > 1 else None

    def compile(
        self, step: Callable[..., Any], *, donate_state: bool = True, replicated_out: int = 2
    ) -> Callable[..., Any]:
        """`step(state, batch, *, axis_name)` -> compiled `fn(state, batch)`.

        Outputs must be replicated across devices (averaged or summed with collectives).
        """
        donate = (0,) if donate_state else ()
        fn = functools.partial(step, axis_name=self.axis_name)
        # On CPU: Eigen convolutions (fer_jax.conv.cpu_compiler_options); jax.pmap takes none.
        options = conv.cpu_compiler_options(self.devices[0].platform)
        if self.num_devices == 1:
            return jax.jit(fn, donate_argnums=donate, compiler_options=options)
        if self.mode == "pmap":
            return jax.pmap(fn, axis_name=AXIS, devices=self.devices, donate_argnums=donate)
        out_specs = tuple(P() for _ in range(replicated_out)) if replicated_out > 1 else P()
        # check_vma=False: gradients of the replicated parameters come out per device, as under
        # pmap, and the step averages them with pmean. (With varying-axis checking, shard_map's
        # autodiff would already psum them, and the explicit pmean would then leave the sum.)
        mapped = jax.shard_map(
            fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs, check_vma=False
        )
        return jax.jit(mapped, donate_argnums=donate, compiler_options=options)

    def replicate(self, tree: Any) -> Any:
        """Host or device pytree -> a fresh copy in the layout compiled steps take.

        Always a copy: the compiled train step donates its state, which must not delete the
        caller's arrays.
        """
        tree = jax.device_get(tree)
        if self.num_devices == 1:
            return jax.device_put(tree, self.devices[0])
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

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host batch from the pipeline -> device arrays split over the devices."""
        if self.num_devices == 1:
            return jax.device_put(batch, self.devices[0])
        sharding = NamedSharding(self.mesh, P(AXIS))
        if jax.process_count() > 1:
            # Every process builds the same global batch (same seed and epoch plan) and
            # contributes its own contiguous slice of it.
            count, index = jax.process_count(), jax.process_index()

            def local(x: np.ndarray) -> jax.Array:
                size = x.shape[0] // count
                part = x[index * size : (index + 1) * size]
                return jax.make_array_from_process_local_data(sharding, part, x.shape)

            return jax.tree.map(local, batch)
        return jax.device_put(batch, sharding)

    def prefetch(self, batches: Iterator[dict[str, np.ndarray]], size: int = 2) -> Iterator[Any]:
        """Puts the next `size` batches on the devices ahead of use (transfers overlap compute)."""
        queue: list[Any] = []
        for batch in batches:
            queue.append(self.shard_batch(batch))
            if len(queue) > size:
                yield queue.pop(0)
        yield from queue
