"""TensorFlow for this package's tf.data pipelines and TFDS builders, with every GPU hidden.

JAX owns the accelerator; tf.data runs on the CPU. Every module of this package that uses
TensorFlow (`pipelines`, `loading` with the TFDS builders) imports it through this
module, so the GPUs are hidden from TensorFlow before it can touch them, whichever is first.
"""

from __future__ import annotations

import logging

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError) as e:  # TensorFlow had already initialised its devices.
    logging.getLogger(__name__).warning("Could not hide GPUs from TensorFlow: %s", e)

__all__ = ["tf"]
