"""Shared test fixtures. Tests run on the CPU with width-reduced models to stay fast."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the whole session and its subprocesses: runs of the
# same config (resume, CLI) then compile once.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fer_jax_test_jax_cache")
)
