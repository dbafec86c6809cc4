"""Experiments on oneDNN's convolutions (issue 34): ``microbench`` (per-shape timings).

The convolutions themselves are ``fer_jax.model.onednn_conv`` (built by ``python -m
fer_jax.model.onednn_conv``); whole train steps: ``python -m experiments.benchmark
--conv_impls auto:bf16+eigen auto:bf16+eigen+no_onednn ...``. Design and figures:
docs/cpu_performance.md, "oneDNN convolutions".
"""
