"""Shared test fixtures. Tests run on the CPU with width-reduced models to stay fast."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
