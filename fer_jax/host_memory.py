"""Keep XLA:CPU's per-step scratch memory mapped between steps, instead of faulting it in anew.

XLA:CPU allocates each execution's temporary buffer with ``malloc`` and frees it when the
execution ends: 626 MB for the full-width train step at batch 64. glibc serves an allocation
that large (above its mmap threshold, at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap``, so every step page-faults its whole scratch in again: 161,000 minor faults and
0.27 s of system time per step (2-core AMD EPYC; the step takes ~1.5 s of wall time).

:func:`reuse_scratch_memory` stops that, for a process that runs JAX on the CPU:

- ``jax_cpu_enable_async_dispatch`` off, so executions run on the calling (main) thread and
  their scratch comes from glibc's main heap (with asynchronous dispatch they run on a worker
  thread, whose arena maps memory that large directly whatever the settings below say). A
  training step takes ~1 s on a CPU, so nothing is lost by not dispatching ahead.
- ``mallopt(M_MMAP_MAX, 0)``: large allocations come from the heap, and
  ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``: freed memory at the heap's top stays mapped, so the
  next step reuses the same pages. The process keeps its peak heap until it exits.

Measured (the train step, batch 64, full width, 2-core AMD EPYC): 161,000 -> ~850 faults per
step, system time 0.27 -> 0.015 s per step; side by side in ``experiments/benchmark``
(``+fresh_scratch`` is without it) 35.0 -> 41.8 images/s. It is what ``python -m fer_jax.main``
does; call it before the first JAX computation (the dispatch setting takes effect when JAX
creates its CPU client). Elsewhere (another backend, another C library) it changes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import jax

# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREED_BYTES = 2**31 - 1


def reuse_scratch_memory() -> bool:
    """Sets up the process as the module docstring says; True if the allocator took it (CPU
    backend on Linux with glibc), False where there is nothing to do."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Before the backend check: it creates the CPU client, which reads this setting.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu":
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES) == 1
    if not ok:
        logging.getLogger(__name__).warning("glibc refused mallopt; XLA scratch is mapped per step")
    return ok
