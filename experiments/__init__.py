"""Reproduction scripts: the paper's tables, benchmarks and the prepared GPU run."""
