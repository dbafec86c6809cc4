"""`fer_jax.host_memory`: XLA:CPU's scratch memory stays mapped between executions.

Each check runs in a fresh subprocess: the dispatch setting only takes effect when JAX creates
its CPU client, and the allocator settings last for the life of the process.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

import jax
import pytest

from fer_jax import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]

# A jitted function whose scratch (a (2048, 8192) float32 intermediate, 64 MB) is above glibc's
# largest mmap threshold (32 MB); prints the minor page faults of each of 6 calls after 8
# warm-up calls.
_FAULTS_PER_CALL = """
import json, resource, sys
import jax, jax.numpy as jnp
from fer_jax import host_memory
took = host_memory.reuse_scratch_memory() if sys.argv[1] == "reuse" else None
f = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T)
x, w = jnp.ones((2048, 64)) / 64, jnp.ones((64, 8192)) / 64
compiled = f.lower(x, w).compile()
for _ in range(8):
    compiled(x, w).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults,
                  "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _faults(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CALL, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_scratch_pages_are_reused_between_executions():
    default, reuse = _faults("default"), _faults("reuse")
    assert default["temp_bytes"] >= 48 * 2**20  # the 64 MB intermediate is scratch
    if min(default["faults"]) < 4_000:
        pytest.skip(f"this allocator does not fault the scratch in per call: {default}")
    assert reuse["took"] is True and reuse["async"] is False
    # 64 MB of 4 KiB pages is 16,384 faults per call when mapped afresh. Reused, the heap grows
    # a few times first (the aligned request does not fit the freed chunk until free chunks have
    # coalesced), then stays.
    assert sorted(reuse["faults"])[3] < min(default["faults"]) / 10, (default, reuse)


def test_nothing_changes_without_glibc(monkeypatch):
    before = jax.config.read("jax_cpu_enable_async_dispatch")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    try:
        assert host_memory.reuse_scratch_memory() is False
        assert jax.config.read("jax_cpu_enable_async_dispatch") == before
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", before)
