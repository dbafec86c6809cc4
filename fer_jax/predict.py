"""`python -m fer_jax.predict photo.jpg ...`: the command of `fer_jax.inference.predict`."""

import sys

from fer_jax import host_memory
from fer_jax.inference.predict import main

if __name__ == "__main__":
    host_memory.reuse_scratch_memory()
    sys.exit(main())
