"""fer_jax: facial expression recognition in JAX/Flax (Wen et al., ICAIS 2020)."""

__version__ = "0.1.0"
